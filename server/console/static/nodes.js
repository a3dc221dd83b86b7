// Nodes page: list with live status and usage bars; add (token shown once), edit, rotate, delete.
"use strict";
(function () {
  const tbody = document.querySelector("#nodes-table tbody");
  const addPanel = document.getElementById("add-panel"), tokenPanel = document.getElementById("token-panel");
  const editPanel = document.getElementById("edit-panel");
  let agents = [];

  function show(panel) {
    for (const p of [addPanel, tokenPanel, editPanel]) p.hidden = p !== panel;
    if (panel) (panel.querySelector("input:not([type=hidden]):not([readonly])") || panel.querySelector("button")).focus();
  }

  function row(a) {
    const t = a.telemetry || {};
    const gpus = SLY.tele.gpus(t);
    const disk = SLY.tele.disks(t);
    const diskMax = disk.reduce((m, d) => (d.pct !== null && (m === null || d.pct > m.pct) ? d : m), null);
    const running = Array.isArray(a.running_tasks) ? a.running_tasks.length : (a.running_tasks ?? 0);
    const online = a.status === "online";
    return SLY.el("tr", { dataset: { id: a.id }, class: "node-row" },
      SLY.el("td", {}, SLY.el("a", { href: `/nodes/${a.id}`, class: "node-name" }, a.name)),
      SLY.el("td", {}, SLY.el("span", { class: "badge status " + (a.status || "offline") }, a.status || "offline"),
        online && a.refusing ? SLY.el("div", { class: "refusing", role: "status" }, "Takes no tasks: " + a.refusing) : null),
      SLY.el("td", {}, a.last_seen ? SLY.el("time", { datetime: new Date(SLY.ms(a.last_seen)).toISOString(), title: SLY.time(a.last_seen) }, SLY.ago(a.last_seen)) : "never"),
      SLY.el("td", { class: "running" }, String(running)),
      SLY.el("td", { class: "cpu" }, online ? SLY.bar(SLY.tele.cpu(t)) : "—"),
      SLY.el("td", { class: "mem" }, online ? SLY.bar(SLY.tele.memory(t)) : "—"),
      SLY.el("td", { class: "disk" }, online && diskMax ? SLY.bar(diskMax.pct, `${Math.round(diskMax.pct)}% ${diskMax.name}`) : "—"),
      SLY.el("td", { class: "gpu" }, online && gpus.length ? gpus.map(g => SLY.bar(g.util, `${g.util === null ? "?" : Math.round(g.util)}% ${g.name}`)) : "—"),
      SLY.el("td", { class: "types" }, (a.allowed_task_types || []).join(", ")),
      SLY.el("td", { class: "actions" },
        SLY.el("button", { type: "button", class: "edit", "aria-label": `Edit ${a.name}`, onclick: () => edit(a) }, "Edit"), " ",
        SLY.el("button", { type: "button", class: "rotate", "aria-label": `Rotate token of ${a.name}`, onclick: () => rotate(a) }, "Rotate token"), " ",
        SLY.el("button", { type: "button", class: "delete danger", "aria-label": `Delete ${a.name}`, onclick: () => remove(a) }, "Delete")));
  }

  async function refresh() {
    try {
      const data = await SLY.api("GET", "/api/v1/agents");
      agents = data.items || [];
      tbody.replaceChildren(...agents.map(row));
      document.getElementById("nodes-empty").hidden = agents.length > 0;
    } catch (e) { SLY.flash("Could not load nodes: " + e.message, true); }
  }

  function commands(rc) {
    // run_command is a string or {docker: "...", run_sh: "..."}
    const forms = typeof rc === "string" ? { "Run": rc } : (rc || {});
    const box = document.getElementById("run-commands");
    box.replaceChildren();
    Object.entries(forms).forEach(([k, cmd], i) => {
      const id = "cmd-" + i;
      const label = { docker: "Docker", run_sh: "run.sh", runsh: "run.sh", shell: "run.sh" }[k] || k;
      box.append(SLY.el("h3", { id: id + "-h" }, label),
        SLY.el("pre", { class: "cmd", id, "aria-labelledby": id + "-h", dataset: { form: k } }, cmd),
        SLY.el("p", {}, SLY.el("button", { type: "button", class: "copy", onclick: (ev) => SLY.copy(cmd, ev.target) }, `Copy ${label} command`)));
    });
  }

  function showToken(name, answer) {
    document.getElementById("token-node").textContent = name;
    document.getElementById("token-value").value = answer.token;
    commands(answer.run_command);
    show(tokenPanel);
  }

  document.getElementById("add-node").addEventListener("click", () => { document.getElementById("add-form").reset(); show(addPanel); });
  document.getElementById("add-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    const body = { name: document.getElementById("add-name").value.trim(), allowed_task_types: [...f.querySelectorAll("[name=types]:checked")].map(c => c.value) };
    try {
      const answer = await SLY.api("POST", "/api/v1/agents", body);
      showToken(answer.name || body.name, answer);
      refresh();
    } catch (e) { SLY.flash("Could not add the node: " + e.message, true); }
  });
  document.querySelector("#token-panel .copy").addEventListener("click", (ev) => SLY.copy(document.getElementById("token-value").value, ev.target));
  document.getElementById("token-close").addEventListener("click", () => {
    document.getElementById("token-value").value = "";
    document.getElementById("run-commands").replaceChildren();
    show(null);
    refresh();   // the agent may have been started meanwhile
  });
  for (const c of document.querySelectorAll(".panel .cancel")) c.addEventListener("click", () => show(null));

  function edit(a) {
    const f = document.getElementById("edit-form");
    document.getElementById("edit-id").value = a.id; document.getElementById("edit-name").value = a.name;
    for (const c of f.querySelectorAll("[name=types]")) c.checked = (a.allowed_task_types || []).includes(c.value);
    document.getElementById("edit-title").textContent = `Edit node ${a.name}`;
    show(editPanel);
  }
  document.getElementById("edit-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    const body = { name: document.getElementById("edit-name").value.trim(), allowed_task_types: [...f.querySelectorAll("[name=types]:checked")].map(c => c.value) };
    try {
      await SLY.api("PATCH", `/api/v1/agents/${document.getElementById("edit-id").value}`, body);
      show(null);
      SLY.flash(`Saved ${body.name}.`);
      refresh();
    } catch (e) { SLY.flash("Could not save: " + e.message, true); }
  });

  async function rotate(a) {
    if (!confirm(`Rotate the token of ${a.name}? The running agent will be refused until it is restarted with the new token.`)) return;
    try {
      const answer = await SLY.api("POST", `/api/v1/agents/${a.id}/token`);
      showToken(a.name, answer);
    } catch (e) { SLY.flash("Could not rotate: " + e.message, true); }
  }
  async function remove(a) {
    if (!confirm(`Delete node ${a.name}? Its agent will be refused from now on.`)) return;
    try {
      await SLY.api("DELETE", `/api/v1/agents/${a.id}`);
      SLY.flash(`Deleted ${a.name}.`);
      refresh();
    } catch (e) { SLY.flash("Could not delete: " + e.message, true); }
  }

  refresh();
  setInterval(() => { if (!document.hidden) refresh(); }, 5000);
})();
