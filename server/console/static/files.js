// Team files page: one folder of the team's file tree (GET /api/v1/files), with breadcrumbs, sizes,
// dates, the task that wrote each file and download links. The folder is in the URL (?path=/a/b/),
// so every folder has its own address and Back works; a path naming a file shows that file.
"use strict";
(function () {
  const PAGE = 200;   // entries per request; "Show more" asks for the next page
  const q = new URLSearchParams(location.search);
  let path = q.get("path") || "/";
  if (!path.startsWith("/")) path = "/" + path;
  const tbody = document.querySelector("#f-table tbody");
  let next = null, count = 0;

  const browse = p => `/files?path=${encodeURIComponent(p)}`;
  const download = p => `/api/v1/files/download?path=${encodeURIComponent(p)}`;

  /** Breadcrumbs: team files / a / b, each a link to its folder; the last one is where we are. */
  function crumbs(folder, file) {
    const names = folder.split("/").filter(Boolean);
    const parts = [SLY.el("a", { href: browse("/") }, "team files")];
    names.forEach((n, i) => {
      const here = "/" + names.slice(0, i + 1).join("/") + "/";
      parts.push(SLY.el("span", { class: "sep", "aria-hidden": "true" }, " / "),
        i === names.length - 1 && !file ? SLY.el("span", { "aria-current": "page" }, n) : SLY.el("a", { href: browse(here) }, n));
    });
    if (file) parts.push(SLY.el("span", { class: "sep", "aria-hidden": "true" }, " / "), SLY.el("span", { "aria-current": "page" }, file));
    document.getElementById("f-crumbs").replaceChildren(...parts);
  }

  function row(e) {
    if (e.type === "folder") {
      return SLY.el("tr", { class: "f-row folder", dataset: { path: e.path } },
        SLY.el("td", { class: "name" }, SLY.el("a", { href: browse(e.path), class: "folder-link", title: e.path }, SLY.icon("folder"),
          SLY.el("span", { class: "trunc" }, (e.name || e.path) + "/"))),
        SLY.el("td", { class: "num hint" }, "—"), SLY.el("td", {}, ""), SLY.el("td", {}, ""), SLY.el("td", {}, ""));
    }
    const name = e.name || e.path.split("/").pop();
    return SLY.el("tr", { class: "f-row file", dataset: { path: e.path } },
      SLY.el("td", { class: "name" }, SLY.trunc(name, "span", { title: `${e.path}\nsha256 ${e.sha256 || "?"}` })),
      SLY.el("td", { class: "num" }, SLY.bytes(e.size)),
      SLY.el("td", {}, SLY.el("time", { title: SLY.time(e.updated_at ?? e.created_at) }, SLY.ago(e.updated_at ?? e.created_at))),
      SLY.el("td", { class: "task" }, e.task_id !== null && e.task_id !== undefined ? SLY.el("a", { href: `/tasks/${e.task_id}` }, `task #${e.task_id}`)
        : SLY.el("span", { class: "hint" }, "—")),
      SLY.el("td", { class: "actions" }, SLY.el("a", { href: download(e.path), download: name, class: "button", "aria-label": `Download ${name}` }, "Download")));
  }

  async function load(cursor) {
    let data;
    try {
      data = await SLY.api("GET", `/api/v1/files?path=${encodeURIComponent(path)}&limit=${PAGE}` + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""));
    } catch (e) {
      if (e.status === 404) {
        crumbs(path.endsWith("/") ? path : path + "/");
        const m = document.getElementById("f-missing");
        m.replaceChildren(`No team file or folder ${path}. `, SLY.el("a", { href: browse("/") }, "All team files"));
        m.hidden = false;
        document.querySelector("#f-table").closest(".table-wrap").hidden = true;
        return;
      }
      SLY.flash("Could not list the files: " + e.message, true);
      return;
    }
    const items = data.items || [];
    if (data.type === "file") {
      const f = items[0] || { path };
      crumbs(f.path.slice(0, f.path.lastIndexOf("/") + 1), f.name || f.path.split("/").pop());
    } else if (!cursor) crumbs(data.path || path);
    if (!cursor) tbody.replaceChildren();
    tbody.append(...items.map(row));
    count += items.length;
    next = data.next;
    document.getElementById("f-more").hidden = !next;
    document.getElementById("f-empty").hidden = count > 0;
    document.getElementById("f-count").textContent = next ? `the first ${count} entries` : "";
  }
  document.getElementById("f-more").addEventListener("click", () => { if (next) load(next); });

  document.title = `${path === "/" ? "Team files" : path} · sly-agent console`;
  load(null);
})();
