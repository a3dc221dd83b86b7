// Node page: system info, telemetry charts over the last hour (inline SVG), the node's tasks.
"use strict";
(function () {
  const id = document.getElementById("node").dataset.id;
  const HOUR = 3600;
  let samples = [], lastTs = null;

  function sysinfo(si) {
    const dl = document.getElementById("sysinfo");
    si = si || {};
    const rows = [];
    const add = (k, v) => { if (v !== undefined && v !== null && v !== "") rows.push(SLY.el("dt", {}, k), SLY.el("dd", {}, String(v))); };
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

  const figs = {};
  function fig(key) {
    if (!figs[key]) { figs[key] = SLY.el("figure", { id: "chart-" + key }); document.getElementById("charts").append(figs[key]); }
    return figs[key];
  }
  function draw() {
    const cutoff = Date.now() - HOUR * 1000;
    samples = samples.filter(s => SLY.ms(s.ts) >= cutoff);
    document.getElementById("charts-empty").hidden = samples.length > 0;
    if (!samples.length) return;
    const pts = f => samples.map(s => [SLY.ms(s.ts), f(s)]).filter(p => p[1] !== null && p[1] !== undefined && !isNaN(p[1]));
    SLY.chart(fig("cpu"), "CPU", [{ name: "cpu", points: pts(SLY.tele.cpu) }], 100);
    SLY.chart(fig("memory"), "Memory", [{ name: "memory", points: pts(SLY.tele.memory) }], 100);
    const diskNames = [...new Set(samples.flatMap(s => SLY.tele.disks(s).map(d => d.name)))];
    SLY.chart(fig("disk"), "Disk", diskNames.map(n => ({ name: n, points: pts(s => (SLY.tele.disks(s).find(d => d.name === n) || {}).pct ?? null) })), 100);
    const gpuIdx = [...new Set(samples.flatMap(s => SLY.tele.gpus(s).map(g => g.index)))];
    if (gpuIdx.length) {
      const g = (s, i) => SLY.tele.gpus(s).find(x => x.index === i) || {};
      SLY.chart(fig("gpu-util"), "GPU utilisation", gpuIdx.map(i => ({ name: `GPU ${i}`, points: pts(s => g(s, i).util ?? null) })), 100);
      SLY.chart(fig("gpu-mem"), "GPU memory", gpuIdx.map(i => ({ name: `GPU ${i}`, points: pts(s => g(s, i).mem ?? null) })), 100);
    }
  }

  async function refreshTelemetry() {
    const since = lastTs !== null ? lastTs : Date.now() / 1000 - HOUR;
    try {
      const data = await SLY.api("GET", `/api/v1/agents/${id}/telemetry?since=${since}`);
      const fresh = (data.items || []).map(s => (s.sample ? Object.assign({ ts: s.ts }, s.sample) : s)).filter(s => lastTs === null || SLY.ms(s.ts) > lastTs * 1000);
      if (fresh.length) { samples = samples.concat(fresh); lastTs = SLY.ms(fresh[fresh.length - 1].ts) / 1000; }
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
      document.getElementById("node-seen").textContent = SLY.ago(a.last_seen);
      document.getElementById("node-running").textContent = Array.isArray(a.running_tasks) ? a.running_tasks.length : (a.running_tasks ?? 0);
      sysinfo(a.system_info);
    } catch (e) { SLY.flash("Could not load the node: " + e.message, true); }
    try {
      const t = await SLY.api("GET", `/api/v1/tasks?agent_id=${id}`);
      const items = t.items || [];
      document.querySelector("#node-tasks tbody").replaceChildren(...(items.length ? [] : [SLY.el("tr", {}, SLY.el("td", { colspan: 5 }, "No tasks yet."))]), ...items.map(x => SLY.el("tr", {},
        SLY.el("td", {}, SLY.el("a", { href: `/tasks/${x.id}` }, `#${x.id}`)), SLY.el("td", {}, x.type),
        SLY.el("td", {}, SLY.el("span", { class: "badge " + x.state }, x.state)), SLY.el("td", {}, SLY.progress(x.progress)),
        SLY.el("td", {}, SLY.span(SLY.duration(x))))));
    } catch (e) { /* shown by the flash above if the API is down */ }
  }

  refreshNode(); refreshTelemetry();
  setInterval(() => { if (!document.hidden) { refreshNode(); refreshTelemetry(); } }, 5000);
})();
