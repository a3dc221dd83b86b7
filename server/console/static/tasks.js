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
      SLY.el("td", {}, SLY.el("span", { class: "badge state " + t.state }, t.state)),
      SLY.el("td", {}, a ? SLY.el("a", { href: `/nodes/${a.id}` }, a.name) : agentsComplete
        ? SLY.el("span", { class: "hint", title: `node #${t.agent_id}` }, "deleted node") : SLY.el("a", { href: `/nodes/${t.agent_id}` }, `#${t.agent_id}`)),
      SLY.el("td", {}, t.type),
      SLY.el("td", { class: "image" }, SLY.trunc(t.image || "—", "code")),
      SLY.el("td", { class: "progress" }, SLY.progress(t.progress)),
      SLY.el("td", {}, SLY.span(SLY.duration(t))),
      SLY.el("td", { class: "actions" }, stoppable
        ? SLY.el("button", { type: "button", class: "stop danger", "aria-label": `Stop task ${t.id}`, onclick: () => stop(t) }, "Stop") : ""));
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
  });

  let formLoaded = false;
  document.getElementById("new-task").addEventListener("toggle", async (ev) => {
    if (!ev.target.open) return;
    await loadAgents();  // fresh online status
    if (formLoaded) return;
    formLoaded = true;   // projects and models only when the form is opened
    try {
      const [p, m] = await Promise.all([SLY.api("GET", "/api/v1/projects"), SLY.api("GET", "/api/v1/models")]);
      document.getElementById("nt-project").append(...(p.items || []).map(x => SLY.el("option", { value: x.id }, `${x.name} (#${x.id})`)));
      document.getElementById("nt-model").append(...(m.items || []).map(x => SLY.el("option", { value: x.id }, `${x.name} (#${x.id})`)));
    } catch (e) { SLY.flash("Could not load projects/models: " + e.message, true); }
  });

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const err = document.getElementById("task-form-error");
    err.hidden = true;
    const v = id => document.getElementById(id).value.trim();
    let config;
    try { config = JSON.parse(v("nt-config") || "{}"); }
    catch (e) { err.textContent = "Config is not valid JSON: " + e.message; err.hidden = false; return; }
    if (!ntNode.value) { err.textContent = "Choose a node (an online one that allows this type)."; err.hidden = false; return; }
    const resources = {};
    if (v("nt-gpus") !== "") resources.gpus = Number(v("nt-gpus"));
    if (v("nt-cpus") !== "") resources.cpus = Number(v("nt-cpus"));
    if (v("nt-memory")) resources.memory = v("nt-memory");
    if (v("nt-shm")) resources.shm_size = v("nt-shm");
    const body = { agent_id: Number(ntNode.value), type: ntType.value, config, resources };
    if (v("nt-image")) body.image = v("nt-image");
    if (v("nt-command")) body.command = v("nt-command");
    if (v("nt-project")) body.project_id = Number(v("nt-project"));
    if (v("nt-model")) body.model_id = Number(v("nt-model"));
    if (v("nt-timeout")) body.timeout_s = Number(v("nt-timeout"));
    try {
      const t = await SLY.api("POST", "/api/v1/tasks", body);
      location.assign(`/tasks/${t.id}`);
    } catch (e) { err.textContent = "Refused: " + e.message; err.hidden = false; }
  });

  loadAgents().then(refresh, (e) => SLY.flash("Could not load nodes: " + e.message, true));
  setInterval(() => { if (!document.hidden) refresh(); }, 3000);
})();
