// Tasks page: filtered list (refreshed), Stop buttons, and the "New task" form.
"use strict";
(function () {
  const tbody = document.querySelector("#tasks-table tbody");
  const fNode = document.getElementById("f-node"), fState = document.getElementById("f-state");
  const q = new URLSearchParams(location.search);
  let agents = [], agentsById = {}, agentsComplete = false;   // complete: every node is in `agents`
  let next = null, extra = [];

  function row(t) {
    const a = agentsById[t.agent_id];
    const stoppable = !SLY.FINAL_STATES.includes(t.state);
    return SLY.el("tr", { dataset: { id: t.id, state: t.state }, class: "task-row" },
      SLY.el("td", {}, SLY.el("a", { href: `/tasks/${t.id}` }, `#${t.id}`)),
      SLY.el("td", { class: "state-cell" }, SLY.el("span", { class: "badge state " + t.state }, t.state), waitingLine(t)),
      SLY.el("td", {}, a ? SLY.el("a", { href: `/nodes/${a.id}` }, a.name) : agentsComplete
        ? SLY.el("span", { class: "hint", title: `node #${t.agent_id}` }, "deleted node") : SLY.el("a", { href: `/nodes/${t.agent_id}` }, `#${t.agent_id}`)),
      SLY.el("td", {}, t.type),
      SLY.el("td", { class: "image" }, SLY.trunc(t.image || "—", "code")),
      // before its container starts, a task's progress counts input downloads: not shown as its progress
      SLY.el("td", { class: "progress" }, SLY.ran(t) ? SLY.progress(t.progress)
        : SLY.el("span", { class: "hint" }, SLY.FINAL_STATES.includes(t.state) ? "never ran" : "—")),
      SLY.el("td", {}, SLY.span(SLY.duration(t))),
      SLY.el("td", { class: "actions" }, stoppable
        ? SLY.el("button", { type: "button", class: "stop danger", "aria-label": `Stop task ${t.id}`, onclick: () => stop(t) }, "Stop") : ""));
  }

  // --- why a queued task waits, under its state. The list does not carry the reason (the server
  // decides it per task, from its node: server/tasks/waiting.py); the first QUEUED_EXPLAINED queued
  // rows ask GET /api/v1/tasks/ID, each at most every WAIT_TTL_MS, so a long queue costs a bounded
  // number of requests. A list that carries `waiting` itself is used as it is. ---
  const QUEUED_EXPLAINED = 20, WAIT_TTL_MS = 10000;
  const waits = new Map();   // task id -> {at, waiting}
  function waitingLine(t) {
    const w = t.waiting || (waits.get(t.id) || {}).waiting;
    if (t.state !== "queued" || !w) return null;
    return SLY.el("div", { class: "waiting small", title: w.detail, dataset: { reason: w.reason } }, SLY.trunc(w.detail));
  }
  async function explainQueued(items) {
    const now = Date.now();
    const ask = items.filter(t => t.state === "queued" && !t.waiting).slice(0, QUEUED_EXPLAINED)
      .filter(t => !waits.has(t.id) || now - waits.get(t.id).at > WAIT_TTL_MS);
    if (!ask.length) return;
    await Promise.all(ask.map(t => SLY.api("GET", `/api/v1/tasks/${t.id}`).then(
      full => { waits.set(t.id, { at: now, waiting: full.waiting }); },
      () => { waits.set(t.id, { at: now, waiting: null }); })));
    for (const t of ask) {
      const cell = tbody.querySelector(`tr[data-id="${t.id}"][data-state="queued"] td.state-cell`);
      if (!cell) continue;
      cell.querySelector(".waiting")?.remove();
      const line = waitingLine(t);
      if (line) cell.append(line);
    }
  }

  async function stop(t) {
    if (!confirm(`Stop task ${t.id}?`)) return;
    try { await SLY.api("POST", `/api/v1/tasks/${t.id}/stop`); SLY.flash(`Stop requested for task ${t.id}.`); refresh(); }
    catch (e) { SLY.flash("Could not stop: " + e.message, true); }
  }

  function query(cursor) {
    const p = new URLSearchParams();
    if (fNode.value) p.set("agent_id", fNode.value);
    if (fState.value) p.set("state", fState.value);
    if (cursor) p.set("cursor", cursor);
    return p.toString();
  }

  async function loadAgents() {
    const data = await SLY.api("GET", "/api/v1/agents?limit=1000");
    agents = data.items || [];
    agentsComplete = !data.next;
    agentsById = Object.fromEntries(agents.map(a => [a.id, a]));
    const keep = fNode.value || q.get("agent_id") || "";
    fNode.replaceChildren(SLY.el("option", { value: "" }, "all"),
      ...agents.map(a => SLY.el("option", { value: a.id }, a.name)));
    fNode.value = keep;
    fillNodes();
  }

  async function refresh() {
    try {
      const data = await SLY.api("GET", "/api/v1/tasks?" + query());
      const items = (data.items || []).concat(extra);
      next = data.next;
      tbody.replaceChildren(...items.map(row));
      document.getElementById("tasks-empty").hidden = items.length > 0;
      document.getElementById("more").hidden = !next;
      for (const id of waits.keys()) if (!items.some(t => t.id === id && t.state === "queued")) waits.delete(id);
      explainQueued(items);
    } catch (e) { SLY.flash("Could not load tasks: " + e.message, true); }
  }
  document.getElementById("more").addEventListener("click", async () => {
    const data = await SLY.api("GET", "/api/v1/tasks?" + query(next));
    extra = extra.concat(data.items || []);
    next = data.next;
    refresh();
  });

  document.getElementById("filters").addEventListener("change", () => {
    extra = [];
    history.replaceState(null, "", "/tasks" + (query() ? "?" + query() : ""));
    refresh();
  });
  if (q.get("state")) fState.value = q.get("state");

  // --- New task form: only online nodes that allow the chosen type are offered ---
  const form = document.getElementById("task-form");
  const ntType = document.getElementById("nt-type"), ntNode = document.getElementById("nt-node");
  function fillNodes() {
    const keep = ntNode.value;
    const ok = agents.filter(a => a.status === "online" && (a.allowed_task_types || []).includes(ntType.value));
    ntNode.replaceChildren(...(ok.length ? ok.map(a => SLY.el("option", { value: a.id }, a.name))
      : [SLY.el("option", { value: "" }, "no online node allows this type")]));
    if (ok.some(a => String(a.id) === keep)) ntNode.value = keep;
  }
  ntType.addEventListener("change", () => {
    fillNodes();
    document.getElementById("nt-image").required = ntType.value !== "cleanup";   // cleanup runs no container
    // An App takes a dataset of its project and a modal state; it has no input model.
    const app = ntType.value === "app";
    document.getElementById("nt-dataset-box").hidden = !app;
    document.getElementById("nt-app-hint").hidden = !app;
    document.getElementById("nt-model-box").hidden = app;
    if (app) document.getElementById("nt-model").value = "";
    document.getElementById("nt-config-label").textContent = app ? "Modal state (JSON)" : "Config (JSON)";
    fillDatasets();
  });

  // --- the datasets of the chosen project (an App's DATASET_ID), read when the project changes ---
  const ntProject = document.getElementById("nt-project"), ntDataset = document.getElementById("nt-dataset");
  const datasetsOf = {};   // project id -> promise of [{id, name, items_count}]
  async function fillDatasets(want) {
    const pid = ntProject.value;
    const keep = want !== undefined ? want : ntDataset.value;
    ntDataset.replaceChildren(SLY.el("option", { value: "" }, "— (all)"));
    ntDataset.disabled = !pid;
    if (!pid || ntType.value !== "app") return;
    datasetsOf[pid] = datasetsOf[pid] || SLY.api("GET", `/api/v1/projects/${pid}`).then(p => p.datasets || [], () => []);
    const list = await datasetsOf[pid];
    if (ntProject.value !== pid) return;   // another project was chosen meanwhile
    ntDataset.append(...list.filter(d => d.id !== undefined && d.id !== null)
      .map(d => SLY.el("option", { value: d.id }, `${d.name} (${d.items_count ?? "?"} images)`)));
    if (keep !== null && keep !== undefined && keep !== "") {
      if (![...ntDataset.options].some(o => o.value === String(keep))) ntDataset.append(SLY.el("option", { value: keep }, `dataset #${keep}`));
      ntDataset.value = String(keep);
    }
  }
  ntProject.addEventListener("change", () => fillDatasets(""));

  // --- the config / modal state: a JSON object, checked as it is typed and again before submit ---
  const ntConfig = document.getElementById("nt-config"), configError = document.getElementById("nt-config-error");
  function parseConfig() {
    const text = ntConfig.value.trim() || "{}";
    let value;
    try { value = JSON.parse(text); }
    catch (e) { return { error: "not valid JSON: " + e.message }; }
    if (value === null || typeof value !== "object" || Array.isArray(value)) return { error: "must be a JSON object ({...})" };
    return { value };
  }
  function checkConfig() {
    const got = parseConfig();
    configError.hidden = !got.error;
    configError.textContent = got.error ? `${ntType.value === "app" ? "Modal state" : "Config"} ${got.error}` : "";
    ntConfig.setAttribute("aria-invalid", String(!!got.error));
    return got;
  }
  ntConfig.addEventListener("input", checkConfig);

  // Projects, models and the images of recent tasks load only when the form is first opened.
  let formReady = null;
  function loadForm() {
    if (!formReady) formReady = (async () => {
      try {
        const [p, m, recent] = await Promise.all([SLY.api("GET", "/api/v1/projects"), SLY.api("GET", "/api/v1/models"),
          SLY.api("GET", "/api/v1/tasks?limit=200")]);
        document.getElementById("nt-project").append(...(p.items || []).map(x => SLY.el("option", { value: x.id }, `${x.name} (#${x.id})`)));
        document.getElementById("nt-model").append(...(m.items || []).map(x => SLY.el("option", { value: x.id }, `${x.name} (#${x.id})`)));
        // images used before, the most recent first
        const images = [...new Set((recent.items || []).map(t => t.image).filter(Boolean))];
        document.getElementById("nt-images").replaceChildren(...images.map(i => SLY.el("option", { value: i })));
      } catch (e) { formReady = null; SLY.flash("Could not load projects/models: " + e.message, true); }
    })();
    return formReady;
  }
  document.getElementById("new-task").addEventListener("toggle", async (ev) => {
    if (!ev.target.open) return;
    await loadAgents();  // fresh online status
    await loadForm();
  });

  // --- Clone / Re-run (/tasks?clone=ID): the form filled with that task's settings ---
  let cloned = null;   // {text, value}: the command as shown, and as the task had it (a list stays a list)
  function choose(select, oid, label) {
    if (oid === null || oid === undefined) { select.value = ""; return; }
    if (![...select.options].some(o => o.value === String(oid))) select.append(SLY.el("option", { value: oid }, label));
    select.value = String(oid);
  }
  async function cloneFrom(tid) {
    let t;
    try { t = await SLY.api("GET", `/api/v1/tasks/${tid}`); }
    catch (e) { SLY.flash(`Could not load task ${tid} to clone: ` + e.message, true); return; }
    const box = document.getElementById("new-task");
    box.open = true;
    await loadAgents(); await loadForm();
    ntType.value = t.type; ntType.dispatchEvent(new Event("change"));
    if (![...ntNode.options].some(o => o.value === String(t.agent_id)))
      ntNode.append(SLY.el("option", { value: t.agent_id }, `#${t.agent_id} (offline or does not allow ${t.type})`));
    ntNode.value = String(t.agent_id);
    const set = (i, v) => { document.getElementById(i).value = v === null || v === undefined ? "" : v; };
    set("nt-image", t.image);
    cloned = { text: SLY.commandText(t.command), value: t.command };
    set("nt-command", cloned.text);
    choose(document.getElementById("nt-project"), t.project_id, `project #${t.project_id}`);
    await fillDatasets(t.dataset_id ?? "");
    choose(document.getElementById("nt-model"), t.model_id, `model #${t.model_id}`);
    const r = t.resources || {};
    set("nt-gpus", r.gpus ?? 0); set("nt-cpus", r.cpus); set("nt-memory", r.memory); set("nt-shm", r.shm_size);
    set("nt-timeout", t.timeout_s);
    set("nt-config", JSON.stringify(t.config || {}, null, 2));
    document.getElementById("nt-config").rows = Math.min(16, Math.max(3, document.getElementById("nt-config").value.split("\n").length));
    const note = document.getElementById("clone-note");
    note.replaceChildren("Cloned from ", SLY.el("a", { href: `/tasks/${t.id}` }, `task #${t.id}`), ": change what you need, then Start task.");
    note.hidden = false;
    document.getElementById("nt-image").focus();
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const err = document.getElementById("task-form-error");
    err.hidden = true;
    const v = id => document.getElementById(id).value.trim();
    const parsed = checkConfig();
    if (parsed.error) { err.textContent = configError.textContent; err.hidden = false; ntConfig.focus(); return; }
    const config = parsed.value;
    if (!ntNode.value) { err.textContent = "Choose a node (an online one that allows this type)."; err.hidden = false; return; }
    const resources = {};
    if (v("nt-gpus") !== "") resources.gpus = Number(v("nt-gpus"));
    if (v("nt-cpus") !== "") resources.cpus = Number(v("nt-cpus"));
    if (v("nt-memory")) resources.memory = v("nt-memory");
    if (v("nt-shm")) resources.shm_size = v("nt-shm");
    const body = { agent_id: Number(ntNode.value), type: ntType.value, config, resources };
    if (v("nt-image")) body.image = v("nt-image");
    if (v("nt-command")) body.command = cloned && v("nt-command") === cloned.text ? cloned.value : v("nt-command");
    if (v("nt-project")) body.project_id = Number(v("nt-project"));
    if (v("nt-model")) body.model_id = Number(v("nt-model"));
    if (ntType.value === "app" && v("nt-dataset")) body.dataset_id = Number(v("nt-dataset"));
    if (v("nt-timeout")) body.timeout_s = Number(v("nt-timeout"));
    try {
      const t = await SLY.api("POST", "/api/v1/tasks", body);
      location.assign(`/tasks/${t.id}`);
    } catch (e) { err.textContent = "Refused: " + e.message; err.hidden = false; }
  });

  loadAgents().then(refresh, (e) => SLY.flash("Could not load nodes: " + e.message, true));
  if (q.get("clone")) cloneFrom(q.get("clone"));
  setInterval(() => { if (!document.hidden) refresh(); }, 3000);
})();
