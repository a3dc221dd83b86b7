// Nodes page: summary strip, dense rows with live status and usage bars; add (token shown once),
// edit, rotate, delete, and removal of stale offline nodes.
"use strict";
(function () {
  const tbody = document.querySelector("#nodes-table tbody");
  const addPanel = document.getElementById("add-panel"), tokenPanel = document.getElementById("token-panel");
  const editPanel = document.getElementById("edit-panel");
  let agents = [];

  const stalePanel = document.getElementById("stale-panel");

  function show(panel) {
    for (const p of [addPanel, tokenPanel, editPanel, stalePanel]) p.hidden = p !== panel;
    if (panel) (panel.querySelector("input:not([type=hidden]):not([readonly]), select") || panel.querySelector("button")).focus();
  }

  const dash = () => SLY.el("span", { class: "hint" }, "—");

  function row(a) {
    const t = a.telemetry || {};
    const gpus = SLY.tele.gpus(t);
    const disks = SLY.tele.disks(t).filter(d => d.pct !== null);
    const running = Array.isArray(a.running_tasks) ? a.running_tasks.length : (a.running_tasks ?? 0);
    const status = a.status || "offline", online = status === "online";
    const seen = a.last_seen ? SLY.agoEl(a.last_seen, { class: "seen" }) : SLY.el("span", { class: "seen" }, "never seen");
    const types = a.allowed_task_types || [];
    return SLY.el("tr", { dataset: { id: a.id, status }, class: "node-row" },
      SLY.el("td", { class: "node" },
        SLY.el("a", { href: `/nodes/${a.id}`, class: "node-name trunc", title: a.name }, a.name),
        SLY.el("div", { class: "node-meta" }, SLY.el("span", { class: "dot " + status }),
          SLY.el("span", { class: "badge status " + status }, status), seen),
        SLY.el("div", { class: "types", title: "Task types it may run" }, types.length
          ? types.flatMap((x, i) => [i ? " " : "", SLY.el("span", { class: "chip" }, x)]) : SLY.el("span", { class: "hint" }, "no task types")),
        online && a.refusing ? SLY.el("div", { class: "refusing", role: "status", title: a.refusing }, "Takes no tasks: " + a.refusing) : null),
      SLY.el("td", { class: "running num" }, String(running)),
      SLY.el("td", { class: "cpu" }, online ? SLY.bar(SLY.tele.cpu(t)) : dash()),
      SLY.el("td", { class: "mem" }, online ? SLY.bar(SLY.tele.memory(t)) : dash()),
      SLY.el("td", { class: "disk" }, online && disks.length ? disks.flatMap(d => [SLY.bar(d.pct, `${Math.round(d.pct)}% of ${d.name}`), SLY.barTag(d.name)]) : dash()),
      SLY.el("td", { class: "gpu" }, online && gpus.length
        ? [...gpus.map(g => SLY.bar(g.util, `GPU ${g.index} ${g.name}: ${g.util === null ? "?" : Math.round(g.util)}% busy` +
            (g.mem !== null ? `, ${Math.round(g.mem)}% memory` : ""))),
           SLY.barTag([...new Set(gpus.map(g => g.name))].map(n => `${gpus.filter(g => g.name === n).length}× ${n}`).join(", "))]
        : online ? SLY.el("span", { class: "hint" }, "none") : dash()),
      SLY.el("td", { class: "actions" },
        SLY.el("button", { type: "button", class: "edit icon-btn", "aria-label": `Edit ${a.name}`, title: "Edit", onclick: () => edit(a) }, SLY.icon("edit")), " ",
        SLY.el("button", { type: "button", class: "rotate icon-btn", "aria-label": `Rotate token of ${a.name}`, title: "Rotate token", onclick: () => rotate(a) }, SLY.icon("key")), " ",
        SLY.el("button", { type: "button", class: "delete danger icon-btn", "aria-label": `Delete ${a.name}`, title: "Delete", onclick: () => remove(a) }, SLY.icon("trash"))));
  }

  // The fleet in numbers, as the server counts it (one page of rows need not hold every node).
  function summary(sum) {
    if (!sum) return;
    document.getElementById("sum-online").textContent = sum.online;
    document.getElementById("sum-offline").textContent = sum.offline;
    document.getElementById("sum-running").textContent = sum.tasks_running;
    document.getElementById("sum-gpus").textContent = sum.gpus_total ? `${sum.gpus_free} / ${sum.gpus_total}` : "0";
    // a fleet without GPUs has nothing to say about them (a task asking for one is refused anyway)
    document.getElementById("sum-gpus").closest("li").hidden = !sum.gpus_total;
  }

  // One page of PAGE nodes at a time. The server answers 304 to If-None-Match when the page is
  // unchanged, so a quiet fleet costs a few hundred bytes per refresh and no redraw.
  const PAGE = 100;
  let cursors = [null], pageNo = 0, etag = null, total = 0;
  async function fetchPage(cursor, lastEtag) {
    const qs = `?limit=${PAGE}` + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : "");
    const headers = lastEtag ? { "If-None-Match": lastEtag } : {};
    const r = await SLY.fetch("/api/v1/agents" + qs, { credentials: "same-origin", cache: "no-store", headers });
    if (r.status === 401) { SLY.signin(); throw new Error("not signed in"); }
    if (r.status === 304) return null;
    const data = await r.json().catch(() => null);
    if (!r.ok) throw new Error((data && (data.detail || data.error)) || `${r.status} ${r.statusText}`);
    return { data, etag: r.headers.get("etag") };
  }
  /** Every node, page by page (the stale-node removal decides on the whole fleet). */
  async function allAgents() {
    let out = [], cursor = null;
    do {
      const data = await SLY.api("GET", "/api/v1/agents?limit=1000" + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""));
      out = out.concat(data.items || []);
      cursor = data.next;
    } while (cursor);
    return out;
  }

  async function refresh(force) {
    try {
      const got = await fetchPage(cursors[pageNo], force ? null : etag);
      if (!got) return;   // unchanged since the last answer
      etag = got.etag;
      agents = got.data.items || [];
      if (!agents.length && pageNo > 0) { pageNo = 0; cursors = [null]; etag = null; return refresh(true); }
      cursors[pageNo + 1] = got.data.next;
      tbody.replaceChildren(...agents.map(row));
      summary(got.data.summary);
      total = got.data.summary ? got.data.summary.nodes : agents.length;
      document.getElementById("nodes-empty").hidden = total > 0;
      const first = pageNo * PAGE;
      document.getElementById("nodes-pager").hidden = !(pageNo > 0 || got.data.next);
      document.getElementById("nodes-range").textContent = `${first + 1}–${first + agents.length} of ${total}`;
      document.getElementById("nodes-prev").disabled = pageNo === 0;
      document.getElementById("nodes-next").disabled = !got.data.next;
    } catch (e) { SLY.flash("Could not load nodes: " + e.message, true); }
  }
  document.getElementById("nodes-prev").addEventListener("click", () => { if (pageNo > 0) { pageNo--; refresh(true); } });
  document.getElementById("nodes-next").addEventListener("click", () => { if (cursors[pageNo + 1]) { pageNo++; refresh(true); } });

  // --- remove stale nodes: offline ones last seen (or, never seen, added) before the threshold ---
  const staleAge = document.getElementById("stale-age");
  let removing = false;
  function stale(list) {
    const cutoff = Date.now() - Number(staleAge.value) * 1000;
    return list.filter(a => a.status !== "online" && (SLY.ms(a.last_seen ?? a.created_at) ?? 0) < cutoff);
  }
  let everyone = [];
  async function loadStale() {
    try { everyone = await allAgents(); } catch (e) { SLY.flash("Could not load nodes: " + e.message, true); return; }
    previewStale();
  }
  function previewStale() {
    const hit = stale(everyone), label = staleAge.selectedOptions[0].textContent;
    document.getElementById("stale-count").textContent = hit.length
      ? `${hit.length} offline node${hit.length === 1 ? "" : "s"} last seen more than ${label} ago:`
      : `No offline node was last seen more than ${label} ago.`;
    document.getElementById("stale-list").replaceChildren(...hit.map(a => SLY.el("li", { dataset: { id: a.id } },
      a.name, " ", SLY.el("span", { class: "hint" }, a.last_seen ? `last seen ${SLY.ago(a.last_seen)}` : `never seen, added ${SLY.ago(a.created_at)}`))));
    const go = document.getElementById("stale-go");
    go.disabled = !hit.length;
    go.textContent = hit.length ? `Remove ${hit.length} node${hit.length === 1 ? "" : "s"}` : "Remove";
  }
  document.getElementById("stale-open").addEventListener("click", () => {
    document.getElementById("stale-run").hidden = true;
    show(stalePanel);
    loadStale();
  });
  staleAge.addEventListener("change", previewStale);
  document.getElementById("stale-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (removing) return;
    const label = staleAge.selectedOptions[0].textContent;
    // Decide on a fresh list: a node may have come back since the preview was drawn.
    let hit;
    try { hit = stale(await allAgents()); }
    catch (e) { SLY.flash("Could not load nodes: " + e.message, true); return; }
    if (!hit.length) { refresh(); return; }
    if (!confirm(`Remove ${hit.length} offline node${hit.length === 1 ? "" : "s"} last seen more than ${label} ago? ` +
                 "Their tokens stop working; a removed node's agent must be added again.")) return;
    removing = true;
    const prog = document.getElementById("stale-progress"), status = document.getElementById("stale-status");
    document.getElementById("stale-run").hidden = false;
    document.getElementById("stale-go").disabled = true;
    prog.max = hit.length; prog.value = 0;
    const failed = [];
    for (const [i, a] of hit.entries()) {
      status.textContent = `${i} / ${hit.length}: ${a.name}`;
      try { await SLY.api("DELETE", `/api/v1/agents/${a.id}`); }
      catch (e) { if (e.status !== 404) failed.push(`${a.name} (${e.message})`); }   // 404: removed meanwhile
      prog.value = i + 1;
    }
    const done = hit.length - failed.length;
    status.textContent = `${done} / ${hit.length} removed`;
    removing = false;
    SLY.flash(failed.length ? `Removed ${done} of ${hit.length} nodes; not removed: ${failed.join(", ")}`
      : `Removed ${done} offline node${done === 1 ? "" : "s"}.`, failed.length > 0);
    await refresh(true);
    await loadStale();
  });

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

  // --- a name another node has already: a warning under the field (the server accepts it, but two
  // nodes of one name are easy to confuse in lists, the task form and the logs). The whole fleet's
  // names are read when a form opens (a page of 1,000 per request), then checked as you type. ---
  let names = null;
  async function loadNames() {
    names = null;
    try { names = (await allAgents()).map(a => ({ id: a.id, name: a.name })); } catch (e) { names = null; }
    for (const f of ["add", "edit"]) checkName(f);
  }
  function checkName(form) {
    const input = document.getElementById(`${form}-name`), warn = document.getElementById(`${form}-name-warn`);
    const name = input.value.trim().toLowerCase(), self = form === "edit" ? document.getElementById("edit-id").value : null;
    const same = name && names ? names.find(a => a.name.trim().toLowerCase() === name && String(a.id) !== self) : null;
    warn.hidden = !same;
    warn.textContent = same ? `A node named “${same.name}” exists already (#${same.id}): another name keeps them apart.` : "";
  }
  for (const f of ["add", "edit"]) document.getElementById(`${f}-name`).addEventListener("input", () => checkName(f));

  document.getElementById("add-node").addEventListener("click", () => {
    document.getElementById("add-form").reset(); checkName("add"); show(addPanel); loadNames();
  });
  document.getElementById("add-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    const body = { name: document.getElementById("add-name").value.trim(), allowed_task_types: [...f.querySelectorAll("[name=types]:checked")].map(c => c.value) };
    if (document.getElementById("add-gpus").checked) body.gpus = true;
    try {
      const answer = await SLY.api("POST", "/api/v1/agents", body);
      showToken(answer.name || body.name, answer);
      refresh(true);
    } catch (e) { SLY.flash("Could not add the node: " + e.message, true); }
  });
  document.querySelector("#token-panel .copy").addEventListener("click", (ev) => SLY.copy(document.getElementById("token-value").value, ev.target));
  const tokenClose = document.getElementById("token-close");
  tokenClose.addEventListener("click", () => {
    document.getElementById("token-value").value = "";
    document.getElementById("run-commands").replaceChildren();
    show(null);
    refresh(true);   // the agent may have been started meanwhile
  });
  for (const c of document.querySelectorAll(".panel .cancel")) c.addEventListener("click", () => show(null));
  // Esc closes the open panel as its Cancel (or, for the token, Done) button does.
  document.addEventListener("keydown", (ev) => {
    if (ev.key !== "Escape" || ev.defaultPrevented) return;
    if (!tokenPanel.hidden) tokenClose.click();
    else if ([addPanel, editPanel, stalePanel].some(p => !p.hidden)) show(null);
  });

  function edit(a) {
    const f = document.getElementById("edit-form");
    document.getElementById("edit-id").value = a.id; document.getElementById("edit-name").value = a.name;
    for (const c of f.querySelectorAll("[name=types]")) c.checked = (a.allowed_task_types || []).includes(c.value);
    document.getElementById("edit-title").textContent = `Edit node ${a.name}`;
    checkName("edit");
    show(editPanel);
    loadNames();
  }
  document.getElementById("edit-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    const body = { name: document.getElementById("edit-name").value.trim(), allowed_task_types: [...f.querySelectorAll("[name=types]:checked")].map(c => c.value) };
    try {
      await SLY.api("PATCH", `/api/v1/agents/${document.getElementById("edit-id").value}`, body);
      show(null);
      SLY.flash(`Saved ${body.name}.`);
      refresh(true);
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
      refresh(true);
    } catch (e) { SLY.flash("Could not delete: " + e.message, true); }
  }

  // At most every 5 s, and only while the tab is visible; at once when it becomes visible again.
  let timer = null;
  async function tick() {
    clearTimeout(timer);
    if (document.visibilityState === "visible") await refresh(false);
    timer = setTimeout(tick, 5000);
  }
  document.addEventListener("visibilitychange", () => { if (document.visibilityState === "visible") tick(); else clearTimeout(timer); });
  refresh(true).then(() => { timer = setTimeout(tick, 5000); });
})();
