// Model page: details, files, its config.json as a collapsible tree, the task that made it, and that
// task's checkpoints (each with its epoch and metrics; the final one and the task's chosen model marked).
"use strict";
(function () {
  const id = Number(document.getElementById("model").dataset.id);
  const fmt = v => typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4).replace(/\.?0+$/, "")) : String(v);

  // --- config.json: nested <details> per object/array, open two levels deep ---
  function leaf(v) {
    const kind = v === null ? "null" : typeof v;
    return SLY.el("span", { class: "j-" + kind }, JSON.stringify(v));
  }
  function node(key, v, depth) {
    const k = key === null ? null : SLY.el("span", { class: "j-key" }, typeof key === "number" ? `${key}` : JSON.stringify(key));
    if (v === null || typeof v !== "object") return SLY.el("li", {}, k, k && ": ", leaf(v));
    const arr = Array.isArray(v), entries = arr ? v.map((x, i) => [i, x]) : Object.entries(v);
    const open = arr ? "[" : "{", close = arr ? "]" : "}";
    if (!entries.length) return SLY.el("li", {}, k, k && ": ", SLY.el("span", { class: "j-punct" }, open + close));
    const det = SLY.el("details", { open: depth < 2 },
      SLY.el("summary", {}, k, k && ": ", SLY.el("span", { class: "j-punct" }, open),
        SLY.el("span", { class: "j-count" }, ` ${entries.length} ${arr ? "items" : entries.length === 1 ? "key" : "keys"} `),
        SLY.el("span", { class: "j-punct j-close" }, close)),
      SLY.el("ul", {}, entries.map(([ck, cv]) => node(ck, cv, depth + 1))),
      SLY.el("span", { class: "j-punct" }, close));
    return SLY.el("li", {}, det);
  }
  function config(m) {
    const box = document.getElementById("m-config");
    const hasFile = (m.files || []).find(f => f.path === "config.json");
    if (m.config === null || m.config === undefined) {
      box.replaceChildren(SLY.el("p", { class: "hint" }, hasFile
        ? "config.json is too large or not valid JSON to show here; download it from the file list."
        : "This model has no config.json at its top level."));
      return;
    }
    box.replaceChildren(SLY.el("ul", { class: "jtree", role: "tree" }, node(null, m.config, 0)));
    document.getElementById("cfg-tools").hidden = false;
    const all = open => box.querySelectorAll("details").forEach(d => { d.open = open; });
    document.getElementById("cfg-expand").onclick = () => all(true);
    document.getElementById("cfg-collapse").onclick = () => { all(false); box.querySelector("details").open = true; };
    document.getElementById("cfg-copy").onclick = ev => SLY.copy(JSON.stringify(m.config, null, 2), ev.currentTarget);
  }

  function metricsText(ms) {
    const e = Object.entries(ms || {});
    return e.length ? e.map(([k, v]) => `${k} ${fmt(v)}`).join(" · ") : "—";
  }

  function details(m) {
    document.getElementById("m-name").textContent = m.name;
    document.title = `${m.name} · sly-agent console`;
    const ck = m.checkpoint;
    document.getElementById("m-kind").replaceChildren(...(ck
      ? [SLY.el("span", { class: "badge checkpoint" }, `checkpoint${ck.epoch !== null && ck.epoch !== undefined ? " · epoch " + fmt(ck.epoch) : ""}`),
         ck.final ? SLY.el("span", { class: "badge finished" }, "final") : ""]
      : []));
    const t = m.task;
    document.getElementById("m-task").replaceChildren(t
      ? SLY.el("span", {}, SLY.el("a", { href: `/tasks/${t.id}`, id: "m-task-link" }, `task #${t.id}`), ` (${t.type}) `,
          SLY.el("span", { class: "badge " + t.state }, t.state))
      : m.task_id ? `task #${m.task_id} (deleted)` : "uploaded");
    document.getElementById("m-created").textContent = SLY.time(m.created_at);
    const files = m.files || [];
    document.getElementById("m-size").textContent = `${files.length} files, ${SLY.bytes(files.reduce((n, f) => n + f.size, 0))}`;
    const hash = document.getElementById("m-hash");
    hash.textContent = m.hash || "—"; hash.title = m.hash || "";
    document.getElementById("m-epoch").textContent = ck && ck.epoch !== null && ck.epoch !== undefined ? fmt(ck.epoch) : "—";
    document.getElementById("m-metrics").textContent = metricsText(ck && ck.metrics);
    document.querySelector("#m-files tbody").replaceChildren(...files.map(f => SLY.el("tr", {},
      SLY.el("td", { class: "path" }, SLY.el("a", { href: `/api/v1/blobs/${f.sha256}`, download: f.path.split("/").pop(), title: f.path, class: "trunc" }, f.path)),
      SLY.el("td", { class: "num" }, SLY.bytes(f.size)))));
  }

  // --- the task's checkpoints: GET /api/v1/models?task_id= (each has its checkpoint), ordered as the task saved them ---
  async function checkpoints(m) {
    if (!m.task_id) return;
    let task, models = [];
    try {
      task = await SLY.api("GET", `/api/v1/tasks/${m.task_id}`);
      for (let cursor = ""; ;) {
        const page = await SLY.api("GET", `/api/v1/models?task_id=${m.task_id}&limit=1000${cursor ? "&cursor=" + cursor : ""}`);
        models = models.concat(page.items || []);
        if (!page.next) break;
        cursor = page.next;
      }
    } catch (e) { SLY.flash("Could not load the task's checkpoints: " + e.message, true); return; }
    const r = task.results || {}, order = r.checkpoints || [];
    const byId = new Map(models.map(x => [x.id, x]));
    const rows = order.map(i => byId.get(i)).filter(Boolean);
    if (!rows.length) return;
    const names = [...new Set(rows.flatMap(x => Object.keys((x.checkpoint && x.checkpoint.metrics) || {})))];
    const card = document.getElementById("m-checkpoints-card");
    card.hidden = false;
    document.getElementById("m-ck-note").textContent = `saved by task #${task.id}, ${rows.length} in all`;
    const table = document.getElementById("m-checkpoints");
    table.tHead.replaceChildren(SLY.el("tr", {},
      SLY.el("th", { scope: "col" }, "Model"), SLY.el("th", { scope: "col", class: "num" }, "Epoch"),
      names.map(n => SLY.el("th", { scope: "col", class: "num metric" }, n)), SLY.el("th", { scope: "col" }, "")));
    // the best value per metric column is bold (lowest for loss-like names, else highest)
    const best = {};
    for (const n of names) {
      const vals = rows.map(x => x.checkpoint.metrics && x.checkpoint.metrics[n]).filter(v => typeof v === "number");
      best[n] = /loss|err|mae|mse|rmse/i.test(n) ? Math.min(...vals) : Math.max(...vals);
    }
    table.tBodies[0].replaceChildren(...rows.map(x => {
      const ck = x.checkpoint || {}, ms = ck.metrics || {};
      return SLY.el("tr", { class: x.id === id ? "current" : "", dataset: { model: x.id } },
        SLY.el("td", {}, x.id === id ? SLY.el("strong", {}, x.name) : SLY.el("a", { href: `/models/${x.id}` }, x.name),
          SLY.el("span", { class: "hint" }, ` #${x.id}`)),
        SLY.el("td", { class: "num epoch" }, ck.epoch !== null && ck.epoch !== undefined ? fmt(ck.epoch) : "—"),
        names.map(n => SLY.el("td", { class: "num" + (ms[n] === best[n] ? " best" : "") }, n in ms ? fmt(ms[n]) : "—")),
        SLY.el("td", { class: "marks" },
          ck.final ? SLY.el("span", { class: "badge finished" }, "final") : "",
          r.model_id === x.id ? SLY.el("span", { class: "badge queued", title: "the task's results.model_id" }, "task's model") : "",
          x.id === id ? SLY.el("span", { class: "badge" }, "this model") : ""));
    }));
  }

  async function load() {
    let m;
    try { m = await SLY.api("GET", `/api/v1/models/${id}`); }
    catch (e) { SLY.flash("Could not load the model: " + e.message, true); return; }
    details(m); config(m);
    checkpoints(m);
  }
  load();
})();
