// Node page: telemetry charts over a chosen window (uPlot), system info, the node's tasks.
"use strict";
(function () {
  const id = document.getElementById("node").dataset.id;
  const WINDOW_KEY = "sly.node.window";
  let windowS = Number(localStorage.getItem(WINDOW_KEY) ?? 3600);
  let samples = [], lastTs = null;   // every point the server keeps (docs/protocol.md: telemetry), oldest first

  function sysinfo(si) {
    const dl = document.getElementById("sysinfo");
    si = si || {};
    const rows = [];
    const add = (k, v) => { if (v !== undefined && v !== null && v !== "") rows.push(SLY.el("dt", {}, k), SLY.el("dd", {}, SLY.trunc(String(v)))); };
    add("Hostname", si.hostname);
    add("OS", si.os || si.platform);
    add("CPUs", si.cpus && typeof si.cpus === "object" ? `${si.cpus.logical ?? "?"} logical, ${si.cpus.physical ?? "?"} physical` : (si.cpus ?? si.cpu_count));
    add("Memory", typeof si.memory === "number" ? SLY.bytes(si.memory) : si.memory && SLY.bytes(si.memory.total));
    add("Docker", si.docker && (si.docker.version || si.docker.server_version || (typeof si.docker === "string" ? si.docker : JSON.stringify(si.docker))));
    add("Agent version", si.agent_version || si.version);
    for (const g of si.gpus || []) add(`GPU ${g.index ?? ""}`, `${g.name || ""} ${g.memory_total ? SLY.bytes(g.memory_total) : ""}`.trim());
    for (const d of si.disks || []) add(`Disk ${d.path || d.mount || ""}`, d.total ? SLY.bytes(d.total) : "");
    dl.replaceChildren(...rows);
  }

  // One chart per quantity; rebuilt only when its set of series (disks, GPUs) changes.
  const charts = {};
  function chart(key, title, labels) {
    const sig = labels.join("\n");
    let c = charts[key];
    if (c && c.sig === sig) return c;
    let fig = document.getElementById("chart-" + key);
    if (!fig) { fig = SLY.el("figure", { id: "chart-" + key }); document.getElementById("charts").append(fig); }
    if (c) c.destroy();
    c = charts[key] = new SLY.Chart(fig, { title, x: "time", unit: "%", range: [0, 100], fill: true,
      series: labels.map(label => ({ label })), window: () => windowS || null });
    c.sig = sig;
    return c;
  }

  // History points are compact: {t, cpu, mem, disks: [%], gpus: [[util %, memory %]]}; the series'
  // names (disk paths, GPU indices) come with each answer, in the order of the points' lists.
  let diskNames = [], gpuIdx = [];
  function draw() {
    const cutoff = windowS ? Date.now() / 1000 - windowS : -Infinity;
    const shown = samples.filter(s => s.t >= cutoff);
    document.getElementById("charts-empty").hidden = samples.length > 0;
    if (!samples.length) return;
    const xs = shown.map(s => s.t);
    const col = f => shown.map(s => { const v = f(s); return v === null || v === undefined || isNaN(v) ? null : v; });
    chart("cpu", "CPU", ["CPU"]).set([xs, col(s => s.cpu)]);
    chart("memory", "Memory", ["Memory"]).set([xs, col(s => s.mem)]);
    const nDisks = Math.max(0, ...samples.map(s => (s.disks || []).length));
    const disks = Array.from({ length: nDisks }, (_, i) => diskNames[i] || `disk ${i + 1}`);
    chart("disk", "Disk", disks).set([xs, ...disks.map((_, i) => col(s => (s.disks || [])[i]))]);
    const nGpus = Math.max(0, ...samples.map(s => (s.gpus || []).length));
    if (nGpus) {
      const labels = Array.from({ length: nGpus }, (_, i) => `GPU ${gpuIdx[i] ?? i}`);
      chart("gpu-util", "GPU utilisation", labels).set([xs, ...labels.map((_, i) => col(s => ((s.gpus || [])[i] || [])[0]))]);
      chart("gpu-mem", "GPU memory", labels).set([xs, ...labels.map((_, i) => col(s => ((s.gpus || [])[i] || [])[1]))]);
    }
  }

  function pickWindow(s) {
    windowS = s;
    localStorage.setItem(WINDOW_KEY, String(s));
    for (const b of document.querySelectorAll("#window button")) b.setAttribute("aria-pressed", String(Number(b.dataset.s) === s));
    for (const c of Object.values(charts)) c.zoomed = false;
    draw();
  }
  for (const b of document.querySelectorAll("#window button")) b.addEventListener("click", () => pickWindow(Number(b.dataset.s)));
  if (![...document.querySelectorAll("#window button")].some(b => Number(b.dataset.s) === windowS)) windowS = 3600;

  async function refreshTelemetry() {
    try {
      const data = await SLY.api("GET", `/api/v1/agents/${id}/telemetry` + (lastTs !== null ? `?since=${lastTs}` : ""));
      diskNames = data.disks || diskNames;
      gpuIdx = (data.gpus || []).map(g => g.index);
      const fresh = (data.items || []).map(s => Object.assign({}, s, { t: SLY.ms(s.ts) / 1000 }))
        .filter(s => lastTs === null || s.t > lastTs);
      if (fresh.length) { samples = samples.concat(fresh); lastTs = fresh[fresh.length - 1].t; }
      draw();
    } catch (e) { SLY.flash("Could not load telemetry: " + e.message, true); }
  }

  async function refreshNode() {
    try {
      const a = await SLY.api("GET", `/api/v1/agents/${id}`);
      document.getElementById("node-name").textContent = a.name;
      document.title = `${a.name} · sly-agent console`;
      const st = document.getElementById("node-status");
      st.textContent = a.status || "offline"; st.className = "badge " + (a.status || "offline");
      document.getElementById("node-seen").replaceChildren(SLY.agoEl(a.last_seen));
      document.getElementById("node-running").textContent = Array.isArray(a.running_tasks) ? a.running_tasks.length : (a.running_tasks ?? 0);
      sysinfo(a.system_info);
    } catch (e) { SLY.flash("Could not load the node: " + e.message, true); }
    try {
      const t = await SLY.api("GET", `/api/v1/tasks?agent_id=${id}`);
      const items = t.items || [];
      document.querySelector("#node-tasks tbody").replaceChildren(...(items.length ? [] : [SLY.el("tr", {}, SLY.el("td", { colspan: 5, class: "hint" }, "No tasks yet."))]), ...items.map(x => SLY.el("tr", {},
        SLY.el("td", {}, SLY.el("a", { href: `/tasks/${x.id}` }, `#${x.id}`)), SLY.el("td", {}, x.type),
        SLY.el("td", {}, SLY.el("span", { class: "badge " + x.state }, x.state)), SLY.el("td", {}, SLY.progress(x.progress)),
        SLY.el("td", {}, SLY.span(SLY.duration(x))))));
    } catch (e) { /* shown by the flash above if the API is down */ }
  }

  pickWindow(windowS);
  refreshNode(); refreshTelemetry();
  setInterval(() => { if (!document.hidden) { refreshNode(); refreshTelemetry(); } }, 5000);
})();
