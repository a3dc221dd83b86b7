// Project page: classes (colour, shape, objects), tags, and a paged grid of thumbnails with the
// labels drawn over each; a click opens the image large (the 1,024 px preview) with its labels and tags.
"use strict";
(function () {
  const id = document.getElementById("project").dataset.id;
  const PAGE = 48, GRID = 256, PREVIEW = 1024;
  const thumb = (sha, size) => `/api/v1/blobs/${sha}/thumb?size=${size}`;
  const grid = document.getElementById("gallery"), dsSelect = document.getElementById("g-dataset");
  const prev = document.getElementById("g-prev"), next = document.getElementById("g-next"), range = document.getElementById("g-range");
  const labelsBox = document.getElementById("g-labels");
  let project = null, classes = SLY.Ann.classMap(null), stats = null;
  let cursors = [""], pageNo = 0, items = [], hiddenClasses = new Set();

  const params = new URLSearchParams(location.search);

  // --- header, classes and tags ---
  function header(p) {
    document.getElementById("p-name").textContent = p.name;
    document.title = `${p.name} · sly-agent console`;
    const origin = document.getElementById("p-origin");
    if (p.task_id) {
      origin.hidden = false;
      origin.replaceChildren(SLY.el("span", { class: "badge predicted" }, "predictions"), " made by ",
        SLY.el("a", { href: `/tasks/${p.task_id}`, id: "p-task" }, `task #${p.task_id}`));
    }
    const total = p.datasets.reduce((n, d) => n + d.items_count, 0);
    for (const d of p.datasets) dsSelect.append(SLY.el("option", { value: d.name }, `${d.name} (${d.items_count})`));
    dsSelect.value = params.get("dataset") || "";
    if (dsSelect.value !== (params.get("dataset") || "")) dsSelect.value = "";
    summary(total);
  }

  function summary(total) {
    const box = document.getElementById("p-summary");
    const n = (v, l, cls) => SLY.el("li", { class: cls }, SLY.el("span", { class: "n" }, v), SLY.el("span", { class: "l" }, l));
    box.replaceChildren(
      n(total, "images", "s-running"),
      n(project.datasets.length, project.datasets.length === 1 ? "dataset" : "datasets", "s-offline"),
      n(stats ? stats.objects : "…", "labels", "s-gpus"),
      n(stats ? `${stats.labelled}` : "…", stats ? `images labelled (${total ? Math.round(100 * stats.labelled / total) : 0}%)` : "images labelled", "s-online"));
  }

  function classTable() {
    const tbody = document.querySelector("#p-classes tbody");
    const meta = (project.meta && project.meta.classes) || [];
    const counts = (stats && stats.classes) || {};
    // classes used by labels but absent from the meta still show (a result project may have them)
    const rows = meta.map(c => ({ title: c.title, shape: c.shape, color: c.color }))
      .concat(Object.keys(counts).filter(t => !meta.some(c => c.title === t)).map(t => ({ title: t, shape: "?", color: classes.colorOf(t) })));
    tbody.replaceChildren(...rows.map(c => {
      const k = counts[c.title] || { objects: 0, items: 0 };
      const box = SLY.el("input", { type: "checkbox", checked: !hiddenClasses.has(c.title), "aria-label": `Show ${c.title}` });
      box.addEventListener("change", () => { box.checked ? hiddenClasses.delete(c.title) : hiddenClasses.add(c.title); applyHidden(); });
      return SLY.el("tr", { dataset: { class: c.title } },
        SLY.el("td", {}, SLY.el("span", { class: "cls" }, SLY.Ann.swatch(c.color), SLY.trunc(c.title))),
        SLY.el("td", {}, SLY.el("span", { class: "chip" }, c.shape)),
        SLY.el("td", { class: "num objects" }, stats ? k.objects : "…"),
        SLY.el("td", { class: "num" }, stats ? k.items : "…"),
        SLY.el("td", { class: "num" }, box));
    }));
    document.getElementById("p-classes-empty").hidden = rows.length > 0;
  }

  function tagTable() {
    const tbody = document.querySelector("#p-tags tbody");
    const meta = (project.meta && project.meta.tags) || [];
    const imgs = (stats && stats.tags) || {}, objs = (stats && stats.object_tags) || {};
    tbody.replaceChildren(...meta.map(t => SLY.el("tr", { dataset: { tag: t.name } },
      SLY.el("td", {}, SLY.el("span", { class: "cls" }, SLY.Ann.swatch(t.color || "#888888"), SLY.trunc(t.name))),
      SLY.el("td", {}, SLY.trunc(t.value_type === "oneof_string" ? (t.values || []).join(", ") : (t.value_type || "").replace("_", " "), "span", { class: "trunc hint values" })),
      SLY.el("td", { class: "num" }, stats ? imgs[t.name] || 0 : "…"),
      SLY.el("td", { class: "num" }, stats ? objs[t.name] || 0 : "…"))));
    document.getElementById("p-tags-empty").hidden = meta.length > 0;
  }

  function applyHidden() {
    for (const g of document.querySelectorAll("svg.ann .lbl")) g.classList.toggle("off", hiddenClasses.has(g.dataset.class));
  }

  // --- the grid ---
  function card(it, index) {
    const ann = it.ann || {}, objs = ann.objects || [];
    const img = SLY.el("img", { src: thumb(it.sha256, GRID), alt: it.name, loading: "lazy", decoding: "async" });
    const svg = SLY.Ann.overlay(ann, classes);
    const frame = SLY.el("span", { class: "frame" }, img, svg);
    img.addEventListener("error", () => frame.classList.add("noimg"));
    const used = [...new Set(objs.map(o => o.classTitle))];
    const li = SLY.el("li", { class: "tile", dataset: { item: it.name, dataset: it.dataset, labels: objs.length } },
      SLY.el("button", { type: "button", class: "open", "aria-label": `Open ${it.name}: ${objs.length} labels`, onclick: () => openViewer(index) },
        frame,
        SLY.el("span", { class: "cap" },
          SLY.trunc(it.name, "span", { class: "iname" }),
          SLY.el("span", { class: "count", title: `${objs.length} labels` }, String(objs.length))),
        SLY.el("span", { class: "meta" },
          SLY.el("span", { class: "dots" }, used.slice(0, 6).map(t => SLY.Ann.swatch(classes.colorOf(t)))),
          SLY.trunc(it.dataset + ((ann.tags || []).length ? " · " + ann.tags.map(SLY.Ann.tagText).join(", ") : ""), "span", { class: "trunc hint" }))));
    svg.ready.then(() => { li.dataset.ready = "1"; });
    return li;
  }

  /** The cursor of page n (its `after`), walking on from the nearest page before it that is known
   * (a reload at page 5 knows page 5's cursor only). */
  async function cursorOf(n) {
    let k = n;
    while (cursors[k] === undefined) k--;
    for (; k < n; k++) {
      const q = new URLSearchParams({ limit: PAGE });
      if (dsSelect.value) q.set("dataset", dsSelect.value);
      if (cursors[k]) q.set("cursor", cursors[k]);
      cursors[k + 1] = (await SLY.api("GET", `/api/v1/projects/${id}/items?${q}`)).next;
    }
    return cursors[n];
  }

  /** The URL says the dataset, the page (with its cursor) and the image open in the viewer, so a
   * reload shows the same; opening the viewer is a history entry of its own (Back closes it). */
  function syncUrl(push) {
    const u = new URL(location.href), sp = u.searchParams;
    const put = (k, v) => (v === null || v === undefined || v === "" ? sp.delete(k) : sp.set(k, v));
    put("dataset", dsSelect.value);
    put("page", pageNo ? pageNo + 1 : null);
    put("after", pageNo ? cursors[pageNo] : null);
    put("image", dlg.open && items[shown] ? items[shown].id : null);
    if (u.href === location.href) return;
    if (push) history.pushState({ viewer: 1 }, "", u); else history.replaceState(history.state, "", u);
  }

  async function loadPage() {
    const ds = dsSelect.value;
    const q = new URLSearchParams({ limit: PAGE });
    if (ds) q.set("dataset", ds);
    if (cursors[pageNo]) q.set("cursor", cursors[pageNo]);
    grid.setAttribute("aria-busy", "true");
    try {
      const data = await SLY.api("GET", `/api/v1/projects/${id}/items?${q}`);
      items = data.items || [];
      cursors[pageNo + 1] = data.next;
      grid.replaceChildren(...items.map(card));
      applyHidden();
      const total = shownTotal();
      const first = pageNo * PAGE;
      range.textContent = items.length ? `${first + 1}–${first + items.length} of ${total}` : "";
      prev.disabled = pageNo === 0; next.disabled = !data.next;
      document.getElementById("g-empty").hidden = items.length > 0;
      grid.dataset.page = pageNo;
      if (!dlg.open) syncUrl(false);
    } catch (e) { SLY.flash("Could not load the images: " + e.message, true); }
    finally { grid.removeAttribute("aria-busy"); }
  }

  /** Page n (0-based), its cursor found first where a reload left it unknown. */
  async function goPage(n) {
    try { await cursorOf(n); } catch (e) { SLY.flash("Could not load the images: " + e.message, true); return false; }
    pageNo = n;
    await loadPage();
    return true;
  }
  prev.addEventListener("click", () => { if (pageNo > 0) goPage(pageNo - 1); });
  next.addEventListener("click", () => { if (cursors[pageNo + 1]) goPage(pageNo + 1); });
  dsSelect.addEventListener("change", () => {
    cursors = [""]; pageNo = 0;
    loadPage();
  });
  labelsBox.addEventListener("change", () => grid.classList.toggle("no-labels", !labelsBox.checked));

  /** Items in the chosen dataset, or in the project. */
  function shownTotal() {
    const ds = dsSelect.value;
    return ds ? (project.datasets.find(d => d.name === ds) || { items_count: 0 }).items_count
      : project.datasets.reduce((n, d) => n + d.items_count, 0);
  }

  // --- the large view ---
  const dlg = document.getElementById("viewer");
  let shown = -1, popping = false, closedByBack = false;
  function openViewer(index) {
    shown = index;
    const opening = !dlg.open;
    const it = items[index], ann = it.ann || {}, objs = ann.objects || [];
    document.getElementById("v-title").textContent = it.name;
    document.getElementById("v-title").title = it.name;
    document.getElementById("v-pos").textContent = `${pageNo * PAGE + index + 1} of ${shownTotal()}`;
    const img = SLY.el("img", { src: thumb(it.sha256, PREVIEW), alt: it.name });
    const svg = SLY.Ann.overlay(ann, classes);
    document.getElementById("v-stage").replaceChildren(SLY.el("span", { class: "frame" }, img, svg));
    const size = ann.size || {};
    const info = [["Dataset", it.dataset], ["Size", size.width ? `${size.width} × ${size.height} px` : "—"],
      ["File", SLY.bytes(it.size)], ["Labels", String(objs.length)]];
    document.getElementById("v-info").replaceChildren(...info.flatMap(([k, v]) => [SLY.el("dt", {}, k), SLY.el("dd", {}, v)]),
      SLY.el("dt", {}, "Original"), SLY.el("dd", {}, SLY.el("a", { href: `/api/v1/blobs/${it.sha256}`, download: it.name }, "download")));
    const tags = ann.tags || [];
    document.getElementById("v-tags").replaceChildren(...(tags.length
      ? tags.map(t => SLY.el("span", { class: "chip tag" }, SLY.Ann.tagText(t))) : [SLY.el("span", { class: "hint" }, "none")]));
    const list = document.getElementById("v-labels");
    list.replaceChildren(...objs.map((o, i) => {
      const li = SLY.el("li", { dataset: { index: i, class: o.classTitle }, tabindex: "0" },
        SLY.Ann.swatch(classes.colorOf(o.classTitle)),
        SLY.el("span", { class: "lname" }, o.classTitle),
        SLY.el("span", { class: "chip" }, SLY.Ann.shapeOf(o)),
        (o.tags || []).map(t => SLY.el("span", { class: "chip tag" }, SLY.Ann.tagText(t))));
      const hl = on => {
        svg.classList.toggle("focus", on);
        const g = svg.querySelector(`.lbl[data-index="${i}"]`);
        if (g) g.classList.toggle("hl", on);
      };
      li.addEventListener("mouseenter", () => hl(true)); li.addEventListener("mouseleave", () => hl(false));
      li.addEventListener("focus", () => hl(true)); li.addEventListener("blur", () => hl(false));
      return li;
    }));
    if (!objs.length) list.replaceChildren(SLY.el("li", { class: "hint" }, "no labels"));
    document.getElementById("v-prev").disabled = index === 0 && pageNo === 0;
    document.getElementById("v-next").disabled = index === items.length - 1 && !cursors[pageNo + 1];
    if (opening) dlg.showModal();
    syncUrl(opening && !popping);
  }
  // The viewer steps past the page's ends: the next page opens at its first image, the previous at its last.
  let stepping = false;
  async function step(d) {
    if (stepping || shown < 0) return;
    stepping = true;
    try {
      if (shown + d >= 0 && shown + d < items.length) openViewer(shown + d);
      else if (d > 0 && cursors[pageNo + 1]) { if (await goPage(pageNo + 1) && items.length) openViewer(0); }
      else if (d < 0 && pageNo > 0) { if (await goPage(pageNo - 1) && items.length) openViewer(items.length - 1); }
    } finally { stepping = false; }
  }
  document.getElementById("v-close").addEventListener("click", () => dlg.close());
  document.getElementById("v-prev").addEventListener("click", () => step(-1));
  document.getElementById("v-next").addEventListener("click", () => step(1));
  dlg.addEventListener("keydown", ev => {
    if (ev.key === "ArrowLeft") step(-1);
    if (ev.key === "ArrowRight") step(1);
  });
  // Closed (button, Esc, backdrop): leave the viewer's history entry, or drop `image` from the URL.
  dlg.addEventListener("close", () => {   // (fired after close(), as a task of its own)
    if (closedByBack) { closedByBack = false; return; }
    if (history.state && history.state.viewer) history.back();
    else syncUrl(false);
  });
  // Back (or Forward) with the viewer open or closed: show what the URL says.
  window.addEventListener("popstate", () => {
    const want = new URLSearchParams(location.search).get("image");
    popping = true;
    try {
      if (!want) {
        if (dlg.open) { closedByBack = true; dlg.close(); }
        syncUrl(false);   // the viewer may have moved to another page: the URL says the page shown
      } else if (want) { const i = items.findIndex(x => String(x.id) === want); if (i >= 0) openViewer(i); }
    } finally { popping = false; }
  });
  dlg.addEventListener("click", ev => { if (ev.target === dlg) dlg.close(); });   // a click on the backdrop

  async function load() {
    try {
      project = await SLY.api("GET", `/api/v1/projects/${id}`);
    } catch (e) { SLY.flash("Could not load the project: " + e.message, true); return; }
    classes = SLY.Ann.classMap(project.meta);
    header(project);
    classTable(); tagTable();
    // a reload keeps the page and the open image (?page=N&after=CURSOR&image=ID)
    const page = Number(params.get("page")) - 1, after = params.get("after");
    if (page > 0 && after && /^\d+$/.test(after)) { pageNo = page; cursors[pageNo] = after; }
    loadPage().then(() => {
      const want = params.get("image"), i = items.findIndex(x => String(x.id) === want);
      if (want && i >= 0) { popping = true; try { openViewer(i); } finally { popping = false; } }
    });
    try {
      stats = await SLY.api("GET", `/api/v1/projects/${id}/stats`);
      summary(project.datasets.reduce((n, d) => n + d.items_count, 0));
      classTable(); tagTable();
    } catch (e) { SLY.flash("Could not count the labels: " + e.message, true); }
  }
  load();
})();
