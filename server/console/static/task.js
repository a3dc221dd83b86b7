// Task page: live log over server-sent events, progress, state timeline, results, and one chart
// per metric (train and val as two series) with the checkpoints from the log marked on it.
"use strict";
(function () {
  const id = document.getElementById("task").dataset.id;
  const log = document.getElementById("log"), followNote = document.getElementById("log-follow");
  const bar = document.getElementById("t-progress"), barText = document.getElementById("t-progress-text");
  let lastSeq = -1, liveProgress = false, source = null, task = null, follow = true, ended = false, resultsKey = "";

  // Auto-scroll only while the reader is at the bottom; scrolling up pauses it, scrolling back resumes.
  const logBottom = document.getElementById("log-bottom");
  log.addEventListener("scroll", () => {
    follow = log.scrollHeight - log.scrollTop - log.clientHeight < 8;
    followNote.textContent = follow ? "" : "(paused: scroll to the bottom to follow)";
    logBottom.hidden = follow;
  });
  logBottom.addEventListener("click", () => { log.scrollTop = log.scrollHeight; log.focus(); });

  // --- the log's tools: filter (hides lines without the text), wrap, download, full screen ---
  const filterBox = document.getElementById("log-filter"), matches = document.getElementById("log-matches");
  let needle = "";
  function applyFilter(lines) {
    for (const el of lines) el.classList.toggle("nomatch", needle !== "" && !el.textContent.toLowerCase().includes(needle));
  }
  function countMatches() {
    matches.textContent = needle ? `${log.querySelectorAll(".line:not(.nomatch)").length} of ${shown} lines` : "";
  }
  filterBox.addEventListener("input", () => {
    needle = filterBox.value.trim().toLowerCase();
    applyFilter(log.querySelectorAll(".line"));
    countMatches();
    if (follow) log.scrollTop = log.scrollHeight;
  });
  const wrapBtn = document.getElementById("log-wrap");
  wrapBtn.addEventListener("click", () => {
    const wrap = log.classList.toggle("nowrap") === false;
    wrapBtn.setAttribute("aria-pressed", String(wrap));
  });
  const card = document.getElementById("log-card"), fullBtn = document.getElementById("log-full");
  function setFull(on) {
    card.classList.toggle("full", on);
    fullBtn.setAttribute("aria-pressed", String(on));
    fullBtn.textContent = on ? "Exit full screen" : "Full screen";
    if (follow) log.scrollTop = log.scrollHeight;
  }
  fullBtn.addEventListener("click", () => setFull(!card.classList.contains("full")));
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && card.classList.contains("full") && !ev.defaultPrevented) { ev.preventDefault(); setFull(false); }
  });
  /** One text line of the file: time (UTC, ISO), source and level where not the usual, the text. */
  function textLine(l) {
    const ms = SLY.ms(l.ts), stream = l.stream || "stdout", level = l.level || "info";
    return (ms ? new Date(ms).toISOString() + " " : "") + (stream !== "stdout" ? `[${stream}] ` : "")
      + (level !== "info" ? `${level.toUpperCase()}: ` : "") + (SLY.eventText(l) ?? l.message ?? "");
  }
  const DOWNLOAD_MAX_LINES = 1000000;   // a browser holds the file in memory: the API pages the rest
  const dlBtn = document.getElementById("log-download");
  dlBtn.addEventListener("click", async () => {
    dlBtn.disabled = true;
    const parts = [];
    let after = -1, n = 0;
    try {
      for (;;) {
        const page = await SLY.api("GET", `/api/v1/tasks/${id}/logs?after=${after}&limit=10000`);
        for (const l of page.lines || []) parts.push(textLine(l) + "\n");
        n += (page.lines || []).length;
        dlBtn.textContent = `Downloading… ${n} lines`;
        if (page.next === null || page.next === undefined || !(page.lines || []).length || n >= DOWNLOAD_MAX_LINES) break;
        after = page.next;
      }
      const a = SLY.el("a", { href: URL.createObjectURL(new Blob(parts, { type: "text/plain" })), download: `task-${id}.log` });
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 10000);
      if (n >= DOWNLOAD_MAX_LINES) SLY.flash(`The file holds the first ${n} lines; GET /api/v1/tasks/${id}/logs pages the rest.`);
    } catch (e) { SLY.flash("Could not download the log: " + e.message, true); }
    dlBtn.disabled = false; dlBtn.textContent = "Download";
  });

  function setProgress(p) {
    bar.hidden = false;
    if (task && !SLY.ran(task) && !liveProgress) {
      // Before the container starts, `progress` counts input downloads: never the task's progress.
      bar.hidden = true;
      barText.textContent = SLY.FINAL_STATES.includes(task.state) ? "none: the task never ran"
        : p && p.total ? `not started (inputs: ${p.current} of ${p.total} downloaded)` : "not started";
      return;
    }
    if (!p || !p.total) { bar.value = 0; barText.textContent = "none reported"; return; }
    bar.max = p.total; bar.value = Math.min(p.current, p.total);
    barText.textContent = `${p.current} / ${p.total} (${Math.round(100 * p.current / p.total)}%)`;
  }

  function isProgress(l) { return l.event_type === "progress" || l.event_type === "EventType.PROGRESS"; }
  function isCheckpoint(l) { return l.event_type === "checkpoint" || l.event_type === "EventType.CHECKPOINT"; }
  const checkpoints = [];   // checkpoint log lines, kept apart from the (trimmed) log view

  // Lines arrive one SSE event each; draw them in batches so a long log renders in few reflows.
  const MAX_LINES = 5000;   // the DOM keeps the newest lines only; the API has them all
  let pending = [], flushTimer = null, trimmed = 0, shown = 0;
  function queueLine(l) {
    pending.push(l);
    if (!flushTimer) flushTimer = setTimeout(flush, 30);
  }
  function flush() {
    flushTimer = null;
    const lines = pending; pending = [];
    const frag = document.createDocumentFragment();
    for (const l of lines) {
      if (l.seq <= lastSeq) continue;  // never show a line twice (reconnects resend from `after`)
      lastSeq = l.seq;
      const stream = l.stream || "stdout", level = l.level || "info";
      const event = SLY.eventText(l);   // progress, metrics, checkpoint: as the CLI prints them
      frag.append(SLY.el("div", { class: `line src-${stream} lvl-${level}` + (event !== null ? " ev" : ""), dataset: { seq: l.seq, stream, level } },
        SLY.el("span", { class: "ts" }, l.ts ? new Date(SLY.ms(l.ts)).toLocaleTimeString() : ""),
        stream !== "stdout" ? `[${stream}] ` : "", level !== "info" ? `${level.toUpperCase()}: ` : "", event ?? l.message ?? ""));
      if (isProgress(l) && typeof l.total === "number") { liveProgress = true; setProgress({ current: l.current, total: l.total }); }
      if (isCheckpoint(l)) checkpoints.push(l);
    }
    if (checkpoints.length !== marked) markCheckpoints();
    shown += frag.childNodes.length;
    if (needle) applyFilter(frag.childNodes);
    log.append(frag);
    if (needle) countMatches();
    if (shown > MAX_LINES) {
      let note = document.getElementById("log-trimmed");
      if (!note) { note = SLY.el("div", { id: "log-trimmed", class: "hint" }); log.prepend(note); }
      for (; shown > MAX_LINES; shown--, trimmed++) note.nextSibling.remove();
      note.textContent = `${trimmed} earlier lines not shown (GET /api/v1/tasks/${id}/logs has them all)`;
    }
    if (follow) log.scrollTop = log.scrollHeight;
  }

  function openStream() {
    if (ended) return;
    source = new EventSource(`/api/v1/tasks/${id}/logs?follow=1&after=${lastSeq}`);
    source.addEventListener("line", (ev) => queueLine(JSON.parse(ev.data)));
    source.addEventListener("end", () => { ended = true; source.close(); flush(); refresh(); });
    source.onerror = () => {
      // Reconnect ourselves from the last seq we drew (the browser's retry would not know it).
      source.close();
      if (!ended) setTimeout(openStream, 2000);
    };
  }

  function timeline(t) {
    const ol = document.getElementById("t-states");
    ol.replaceChildren(...SLY.states(t).map(s => SLY.el("li", { dataset: { state: s.state } },
      SLY.el("span", { class: "badge " + s.state }, s.state),
      SLY.el("time", { datetime: SLY.ms(s.ts) ? new Date(SLY.ms(s.ts)).toISOString() : "" }, SLY.time(s.ts)))));
  }

  const ARTIFACTS_SHOWN = 200;   // the first page of the task's artifacts; the API pages the rest

  async function results(t) {
    const r = t.results || {};
    const key = JSON.stringify(r);
    if (key === resultsKey) return;
    resultsKey = key;
    let files = [];
    if (r.artifacts_count) {
      try { files = (await SLY.api("GET", `/api/v1/tasks/${id}/artifacts?limit=${ARTIFACTS_SHOWN}`)).items; }
      catch (e) { resultsKey = ""; return; }   // the next refresh tries again
      if (key !== resultsKey) return;          // a newer refresh drew them meanwhile
    }
    const box = document.getElementById("t-results");
    const parts = [];
    if (r.model_id) parts.push(SLY.el("p", {}, "Model: ", SLY.el("a", { href: `/models/${r.model_id}`, id: "t-model" }, `#${r.model_id}`)));
    const cks = (r.checkpoints || []).filter(c => c !== r.model_id);
    if (cks.length) parts.push(SLY.el("p", { id: "t-checkpoints" }, "Checkpoints: ",
      cks.flatMap((c, i) => [i ? ", " : "", SLY.el("a", { href: `/models/${c}` }, `#${c}`)])));
    if (r.project_id) parts.push(SLY.el("p", {}, "Project: ", SLY.el("a", { href: `/projects/${r.project_id}`, id: "t-project" }, `#${r.project_id}`),
      " (browse its images and labels)"));
    if (files.length) {
      parts.push(SLY.el("p", { id: "t-artifacts" }, `Artifacts: ${r.artifacts_count}, ${SLY.bytes(r.artifacts_bytes || 0)}`,
        r.artifacts_count > files.length ? ` (the first ${files.length} by path)` : ""));
      parts.push(SLY.el("ul", { class: "artifacts" }, files.map(f => SLY.el("li", {},
        SLY.el("a", { href: `/api/v1/blobs/${f.sha256}`, download: f.path.split("/").pop() }, f.path),
        SLY.el("span", { class: "barlabel" }, SLY.bytes(f.size))))));
    }
    box.replaceChildren(...(parts.length ? parts : ["—"]));
    // names instead of ids ("Model #18"), each read once
    for (const a of box.querySelectorAll("a[href^='/models/'], a[href^='/projects/']")) {
      const [, kind, oid] = a.getAttribute("href").split("/");
      const name = (names[kind + oid] = names[kind + oid] || SLY.api("GET", `/api/v1/${kind}/${oid}`).then(x => x.name, () => null));
      name.then(n => { if (n) { a.textContent = n; a.title = `${kind.slice(0, -1)} #${oid}`; } });
    }
  }
  const names = {};

  // --- metrics: {seq, type, epoch, metrics} items -> one chart per metric name, one series per type ---
  const charts = {};
  let metricItems = [], metricsKey = "", marked = 0;
  const TYPE_ORDER = ["train", "val", "test"];

  /** Where a checkpoint sits on the epoch axis: its own epoch if it says, else the last epoch reported before it. */
  function checkpointEpoch(c) {
    for (const v of [c.epoch, (c.optional || {}).epoch, (c.optional_data || {}).epoch]) if (typeof v === "number") return v;
    let x = null;
    for (const [i, it] of metricItems.entries()) { if (it.seq > c.seq) break; x = it.epoch ?? i; }
    return x;
  }
  // Which checkpoints the charts mark (remembered in the browser): only the best (default: one line,
  // however many were saved), all (the others as small diamonds on the axis), or none.
  const CK_KEY = "sly.task.checkpoints";
  let ckMode = ["best", "all", "none"].includes(localStorage.getItem(CK_KEY)) ? localStorage.getItem(CK_KEY) : "best";
  function marks() {
    // The best is the last checkpoint that said best_now (a later one may be saved without beating it).
    const best = checkpoints.reduce((b, c) => (c.best_now ? c : b), null);
    const count = document.getElementById("ck-count");
    count.textContent = checkpoints.length ? `(${checkpoints.length})` : "";
    if (ckMode === "none") return [];
    return checkpoints.filter(c => ckMode === "all" || c === best)
      .map(c => ({ x: checkpointEpoch(c), label: `checkpoint ${c.id ?? c.subdir ?? c.seq}` + (c.best_now ? " (best)" : ""),
        best: c === best, minor: c !== best }))
      .filter(m => m.x !== null);
  }
  function pickCkMode(mode) {
    ckMode = mode;
    localStorage.setItem(CK_KEY, mode);
    for (const b of document.querySelectorAll("#ck-mode button")) b.setAttribute("aria-pressed", String(b.dataset.mode === mode));
    markCheckpoints();
  }
  for (const b of document.querySelectorAll("#ck-mode button")) b.addEventListener("click", () => pickCkMode(b.dataset.mode));
  function markCheckpoints() {
    marked = checkpoints.length;
    const m = marks();
    for (const c of Object.values(charts)) c.setMarks(m.filter(k => c.data[0].includes(k.x)));
  }

  async function metrics() {
    try {
      const m = await SLY.api("GET", `/api/v1/tasks/${id}/metrics?chain=1`);  // a continuation: the earlier runs too, one epoch axis
      metricItems = m.items || [];
    } catch (e) { return; /* metrics are optional */ }
    const key = metricItems.length + ":" + (metricItems.length ? metricItems[metricItems.length - 1].seq : "");
    if (!metricItems.length || key === metricsKey) return;
    metricsKey = key;
    // name -> type -> epoch -> value (a later report of the same epoch wins)
    const byName = {};
    metricItems.forEach((it, i) => {
      const x = it.epoch ?? i, type = it.type || "train";
      for (const [k, v] of Object.entries(it.metrics || {})) {
        if (typeof v !== "number" && isNaN(Number(v))) continue;
        ((byName[k] = byName[k] || {})[type] = byName[k][type] || new Map()).set(x, Number(v));
      }
    });
    const box = document.getElementById("t-metrics"), m = marks();
    for (const [name, types] of Object.entries(byName)) {
      const order = Object.keys(types).sort((a, b) => ((TYPE_ORDER.indexOf(a) + 1) || 99) - ((TYPE_ORDER.indexOf(b) + 1) || 99) || a.localeCompare(b));
      const xs = [...new Set(order.flatMap(t => [...types[t].keys()]))].sort((a, b) => a - b);
      const data = [xs, ...order.map(t => xs.map(x => (types[t].has(x) ? types[t].get(x) : null)))];
      const sig = order.join("\n");
      if (!charts[name] || charts[name].sig !== sig) {
        if (charts[name]) charts[name].destroy();
        let fig = box.querySelector(`figure[data-metric="${CSS.escape(name)}"]`);
        if (!fig) { fig = SLY.el("figure", { dataset: { metric: name } }); box.append(fig); }
        charts[name] = new SLY.Chart(fig, { title: name, x: "epoch", unit: "", series: order.map(label => ({ label })) });
        charts[name].sig = sig;
      }
      charts[name].set(data, m.filter(k => xs.includes(k.x)));
    }
    marked = checkpoints.length;
    document.getElementById("metrics-section").hidden = false;
  }

  /** Link to a project or model by name (fetched once), "#id" until it comes, "deleted" if gone. */
  function linkByName(box, kind, oid) {
    if (box.dataset.id === String(oid ?? "")) return;
    box.dataset.id = String(oid ?? "");
    if (oid === null || oid === undefined) { box.textContent = "—"; return; }
    const a = SLY.el("a", { href: `/${kind}s/${oid}` }, `#${oid}`);
    box.replaceChildren(a);
    SLY.api("GET", `/api/v1/${kind}s/${oid}`).then(x => { a.textContent = x.name; a.title = `${kind} #${oid}`; },
      e => { if (e.status === 404) box.replaceChildren(SLY.el("span", { class: "hint" }, `${kind} #${oid} (deleted)`)); });
  }
  function resourcesText(r) {
    if (!r) return "—";
    const parts = [];
    if (r.gpus !== null && r.gpus !== undefined) parts.push(`${r.gpus} GPU${r.gpus === 1 ? "" : "s"}`);
    if (r.cpus !== null && r.cpus !== undefined) parts.push(`${r.cpus} CPUs`);
    if (r.memory) parts.push(`memory ${r.memory}`);
    if (r.shm_size) parts.push(`shared memory ${r.shm_size}`);
    for (const [k, v] of Object.entries(r)) if (!["gpus", "cpus", "memory", "shm_size"].includes(k) && v !== null) parts.push(`${k} ${JSON.stringify(v)}`);
    return parts.length ? parts.join(", ") : "the node's defaults";
  }
  /** Exit codes over 128 are a signal: 137 is SIGKILL (after Stop, a timeout, or out of memory). */
  function exitText(t) {
    const c = t.exit_code;
    if (c === null || c === undefined) return "—";
    if (c === 137) return t.stop_requested || t.state === "stopped" ? "137 (killed by Stop: SIGKILL after the grace period)"
      : "137 (killed, SIGKILL: out of memory, a timeout or docker kill)";
    if (c === 143) return "143 (terminated, SIGTERM" + (t.stop_requested ? ": Stop)" : ")");
    if (c > 128 && c < 160) return `${c} (killed by signal ${c - 128})`;
    return String(c);
  }
  /** The retry policy and the resume chain (lost tasks continued elsewhere), when the task has them. */
  function chain(t) {
    const parts = [];
    if (t.retry && typeof t.retry === "object") {
      parts.push(SLY.el("span", { id: "t-retry" }, `retry on loss: attempt ${t.retry.attempt ?? 0} of ${t.retry.max ?? "?"}` +
        (Array.isArray(t.retry.agent_ids) && t.retry.agent_ids.length ? ` (nodes ${t.retry.agent_ids.map(a => "#" + a).join(", ")})` : "")));
    }
    if (t.resumed_from !== null && t.resumed_from !== undefined)
      parts.push(SLY.el("span", {}, "resumed from ", SLY.el("a", { href: `/tasks/${t.resumed_from}`, id: "t-resumed-from" }, `task #${t.resumed_from}`)));
    if (t.continued_by !== null && t.continued_by !== undefined)
      parts.push(SLY.el("span", {}, "continued by ", SLY.el("a", { href: `/tasks/${t.continued_by}`, id: "t-continued-by" }, `task #${t.continued_by}`)));
    const dd = document.getElementById("t-chain");
    dd.hidden = document.getElementById("t-chain-label").hidden = !parts.length;
    dd.replaceChildren(...parts.flatMap((p, i) => (i ? ["; ", p] : [p])));
  }
  /** An App's output (`api.task.set_output_*`): its project's page, its file's download, or its
   * folder in the team files browser. */
  let outputKey = null;
  function output(t) {
    const o = t.output, key = JSON.stringify(o ?? null);
    if (key === outputKey) return;
    outputKey = key;
    const box = document.getElementById("t-output");
    box.hidden = !o || typeof o !== "object";
    if (box.hidden) { box.replaceChildren(); return; }
    const path = typeof o.path === "string" ? o.path : "";
    const base = path.replace(/\/+$/, "").split("/").pop() || path;
    const files = dir => `/files?path=${encodeURIComponent(dir || "/")}`;
    let parts;
    if (o.type === "project" && o.project_id !== undefined && o.project_id !== null) {
      parts = ["Output project: ", SLY.el("a", { href: `/projects/${o.project_id}`, id: "t-output-link" }, o.name || `project #${o.project_id}`)];
    } else if (o.type === "file" && path) {
      const dir = path.slice(0, path.lastIndexOf("/") + 1) || "/";
      parts = ["Output file: ", SLY.el("a", { href: `/api/v1/files/download?path=${encodeURIComponent(path)}`, download: base, id: "t-output-link",
        title: path }, o.name || base), " ", SLY.el("a", { href: files(dir), class: "hint" }, `(in ${dir})`)];
    } else if (o.type === "directory" && path) {
      parts = ["Output folder: ", SLY.el("a", { href: files(path), id: "t-output-link", title: path }, o.name || path)];
    } else if (o.type === "text" && o.name) {
      parts = [SLY.el("span", { class: o.error ? "error" : "" }, "Output: ", SLY.el("span", { id: "t-output-link" }, o.name)),
        o.description ? SLY.el("span", { class: "hint" }, ` — ${o.description}`) : ""];
    } else {
      parts = ["Output: ", SLY.el("code", {}, key.slice(0, 300))];   // a shape this page does not know: shown as it is
    }
    box.dataset.type = o.type || "";
    box.replaceChildren(...parts);
  }
  /** An App's input dataset, by name (from its project's datasets). */
  function inputDataset(t) {
    const dd = document.getElementById("t-in-dataset"), has = t.dataset_id !== null && t.dataset_id !== undefined;
    dd.hidden = document.getElementById("t-in-dataset-label").hidden = !has;
    if (!has || dd.dataset.id === String(t.dataset_id)) return;
    dd.dataset.id = String(t.dataset_id);
    dd.textContent = `dataset #${t.dataset_id}`;
    if (t.project_id !== null && t.project_id !== undefined) SLY.api("GET", `/api/v1/projects/${t.project_id}`).then(p => {
      const d = (p.datasets || []).find(x => x.id === t.dataset_id);
      if (d) { dd.textContent = d.name; dd.title = `dataset #${t.dataset_id}`; }
    }, () => {});
  }

  let configKey = null;
  function details(t) {
    output(t);
    inputDataset(t);
    const cmd = SLY.commandText(t.command), c = document.getElementById("t-command");
    c.textContent = cmd || "(the image's own)"; c.title = cmd;
    linkByName(document.getElementById("t-in-project"), "project", t.project_id);
    linkByName(document.getElementById("t-in-model"), "model", t.model_id);
    document.getElementById("t-resources").textContent = resourcesText(t.resources);
    document.getElementById("t-timeout").textContent = t.timeout_s ? SLY.span(t.timeout_s) : "none";
    const cfg = JSON.stringify(t.config ?? {}, null, 2);
    if (cfg !== configKey) {
      configKey = cfg;
      document.getElementById("t-config").textContent = cfg;
      const n = Object.keys(t.config || {}).length;
      document.getElementById("t-config-size").textContent = n ? `(${n} key${n === 1 ? "" : "s"})` : "(empty)";
    }
    chain(t);
  }
  document.getElementById("t-config-copy").addEventListener("click", ev => SLY.copy(configKey || "{}", ev.target));

  async function refresh() {
    try { task = await SLY.api("GET", `/api/v1/tasks/${id}`); }
    catch (e) {
      if (e.status === 404) {   // no such task (or deleted): no progress, no log stream
        ended = true; clearInterval(timer);
        if (source) source.close();
        SLY.notFound(`Task ${id}`, "/tasks", "← Tasks");
        return;
      }
      SLY.flash("Could not load the task: " + e.message, true); return;
    }
    const st = document.getElementById("t-state");
    st.textContent = task.state; st.className = "badge " + task.state;
    const waits = document.getElementById("t-waiting");   // why a queued task waits (the server decides)
    waits.hidden = !task.waiting;
    const since = task.waiting && task.waiting.since;
    if (!task.waiting) waits.replaceChildren();
    else if (waits.dataset.text !== task.waiting.detail + since) {
      waits.replaceChildren("Waiting: " + task.waiting.detail, since ? [" · since ", SLY.agoEl(since)] : "");
    }
    waits.dataset.text = task.waiting ? task.waiting.detail + since : "";
    waits.dataset.reason = task.waiting ? task.waiting.reason : "";
    document.getElementById("t-type").textContent = task.type;
    const node = document.getElementById("t-node");
    if (!node.dataset.id) {   // the node's name, fetched once
      node.dataset.id = task.agent_id;
      node.replaceChildren(SLY.el("a", { href: `/nodes/${task.agent_id}` }, `#${task.agent_id}`));
      SLY.api("GET", `/api/v1/agents/${task.agent_id}`).then(a => { node.firstChild.textContent = a.name; },
        e => { if (e.status === 404) node.replaceChildren(SLY.el("span", { class: "hint", title: `node #${task.agent_id}` }, "deleted node")); });
    }
    const image = document.getElementById("t-image");
    image.textContent = task.image || "—"; image.title = task.image || "";
    document.getElementById("t-duration").textContent = SLY.span(SLY.duration(task));
    document.getElementById("t-exit").textContent = exitText(task);
    details(task);
    document.getElementById("t-error").textContent = task.error || "—";
    document.getElementById("t-stop").hidden = SLY.FINAL_STATES.includes(task.state);
    document.getElementById("t-delete").hidden = !SLY.FINAL_STATES.includes(task.state);
    if (task.progress || !liveProgress) setProgress(task.progress);
    timeline(task);
    results(task);
    if (["running", "uploading"].includes(task.state) || SLY.FINAL_STATES.includes(task.state)) metrics();
    if (SLY.FINAL_STATES.includes(task.state)) clearInterval(timer);
  }

  document.getElementById("t-stop").addEventListener("click", async () => {
    if (!confirm(`Stop task ${id}?`)) return;
    try { await SLY.api("POST", `/api/v1/tasks/${id}/stop`); SLY.flash("Stop requested."); refresh(); }
    catch (e) { SLY.flash("Could not stop: " + e.message, true); }
  });

  document.getElementById("t-delete").addEventListener("click", async () => {
    if (!confirm(`Delete task ${id} and its log? The models and projects it made are kept.`)) return;
    try {
      const a = await SLY.api("DELETE", `/api/v1/tasks/${id}`);
      const kept = [["model", a.kept.models], ["project", a.kept.projects]].filter(([, ids]) => ids.length)
        .map(([k, ids]) => `${k}${ids.length > 1 ? "s" : ""} ${ids.map(i => "#" + i).join(", ")}`);
      clearInterval(timer);
      SLY.flash(`Deleted task ${id}` + (kept.length ? `; kept ${kept.join(" and ")}.` : "."));
      setTimeout(() => location.assign("/tasks"), 1500);
    } catch (e) { SLY.flash("Could not delete: " + e.message, true); }
  });

  pickCkMode(ckMode);
  const timer = setInterval(() => { if (!document.hidden) refresh(); }, 2000);
  refresh().then(openStream);
})();
