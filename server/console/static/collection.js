// Projects and models pages: list, files with download links (loaded when opened), folder upload.
"use strict";
(function () {
  const kind = document.getElementById("collection").dataset.kind;  // "projects" | "models"
  const one = kind === "projects" ? "project" : "model";
  const tbody = document.querySelector("#items tbody");

  // A project may hold a million items: its first ones here (the project page pages them all).
  const ITEMS_SHOWN = 200;

  async function files(x) {
    // {list: [{path, sha256, size}], more}: a model's files; a project's items as <dataset>/<item name>
    if (kind === "models") return { list: (await SLY.api("GET", `/api/v1/models/${x.id}`)).files || [], more: false };
    const page = await SLY.api("GET", `/api/v1/projects/${x.id}/items?limit=${ITEMS_SHOWN}`);
    const list = (page.items || []).map(i => ({ path: `${i.dataset}/${i.name}`, sha256: i.sha256, size: i.size }));
    return { list, more: !!page.next };
  }
  function contents(x) {
    if (kind === "models") {
      const n = x.files ? x.files.length : x.files_count;
      return `${n ?? "?"} files` + (x.size !== undefined ? `, ${SLY.bytes(x.size)}` : "") + (x.hash ? `, hash ${x.hash.slice(0, 12)}…` : "");
    }
    const ds = x.datasets || [];
    return `${ds.length} datasets, ${ds.reduce((n, d) => n + (d.items ? d.items.length : (d.items_count || 0)), 0)} items`;
  }

  function row(x) {
    const det = SLY.el("details", { class: "files" }, SLY.el("summary", {}, "Files"));
    det.addEventListener("toggle", async () => {
      if (!det.open || det.dataset.loaded) return;
      det.dataset.loaded = "1";
      try {
        const got = await files(x);
        det.append(SLY.el("ul", {}, got.list.map(f => SLY.el("li", {},
          SLY.el("a", { href: `/api/v1/blobs/${f.sha256}`, download: f.path.split("/").pop() }, f.path),
          SLY.el("span", { class: "barlabel" }, SLY.bytes(f.size))))));
        if (got.more) det.append(SLY.el("p", { class: "hint" }, `The first ${ITEMS_SHOWN}; `, SLY.el("a", { href: `/${kind}/${x.id}` }, "the project page"), " shows them all."));
      } catch (e) { det.append(SLY.el("p", { class: "error" }, e.message)); }
    });
    return SLY.el("tr", { id: `${one}-${x.id}`, dataset: { id: x.id } },
      SLY.el("td", {}, `#${x.id}`), SLY.el("td", { class: "name" }, SLY.el("a", { href: `/${kind}/${x.id}` }, x.name),
        kind === "projects" && x.task_id ? SLY.el("span", { class: "badge predicted" }, "predictions") : ""), SLY.el("td", {}, contents(x)), SLY.el("td", {}, det));
  }

  async function refresh() {
    try {
      const data = await SLY.api("GET", `/api/v1/${kind}`);
      const items = data.items || [];
      tbody.replaceChildren(...items.map(row));
      document.getElementById("items-empty").hidden = items.length > 0;
    } catch (e) { SLY.flash(`Could not load ${kind}: ` + e.message, true); }
  }

  // --- upload: hash each file in the browser, PUT the blobs, then POST the project/model ---
  const form = document.getElementById("upload-form"), prog = document.getElementById("up-progress");
  const status = document.getElementById("up-status");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const chosen = [...document.getElementById("up-dir").files];
    if (!chosen.length) return;
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    const rel = f => (f.webkitRelativePath || f.name).split("/");
    const folder = rel(chosen[0]).length > 1 ? rel(chosen[0])[0] : one;
    const name = document.getElementById("up-name").value.trim() || folder;
    const total = chosen.reduce((n, f) => n + f.size, 0) || 1;
    let done = 0;
    prog.max = total; prog.value = 0;
    try {
      const entries = [];
      for (const f of chosen) {
        const parts = rel(f);
        const path = (parts.length > 1 ? parts.slice(1) : parts).join("/");
        status.textContent = `${path}…`;
        const buf = await f.arrayBuffer();
        const sha256 = await SLY.sha256(buf);
        const head = await fetch(`/api/v1/blobs/${sha256}`, { method: "HEAD", credentials: "same-origin" });
        if (head.status !== 200) await SLY.api("PUT", `/api/v1/blobs/${sha256}`, buf);  // never send a blob twice
        entries.push({ path, sha256, size: f.size });
        done += f.size; prog.value = done;
        status.textContent = `${Math.round(100 * done / total)}% (${SLY.bytes(done)} of ${SLY.bytes(total)})`;
      }
      let body;
      if (kind === "models") body = { name, files: entries };
      else {
        // Each top-level sub-folder is a dataset; files at the top go to dataset "ds0" (as the CLI does).
        const ds = {};
        for (const e of entries) {
          const i = e.path.indexOf("/");
          const [dname, item] = i < 0 ? ["ds0", e.path] : [e.path.slice(0, i), e.path.slice(i + 1)];
          (ds[dname] = ds[dname] || []).push({ name: item, sha256: e.sha256, size: e.size });
        }
        body = { name, datasets: Object.entries(ds).map(([n, items]) => ({ name: n, items })) };
      }
      const made = await SLY.api("POST", `/api/v1/${kind}`, body);
      prog.value = total;
      status.textContent = `Uploaded ${one} #${made.id} "${made.name || name}": ${entries.length} files, ${SLY.bytes(done)}.`;
      form.reset();
      refresh();
    } catch (e) {
      status.textContent = "Upload failed: " + e.message;
    } finally { button.disabled = false; }
  });

  refresh();
})();
