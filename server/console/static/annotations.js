// Supervisely annotations drawn over an image: one SVG per image whose viewBox is the annotation's
// pixel size, laid over the <img> with the same "contain" fit, so any thumbnail size lines up.
// Each label is one <g class="lbl"> (rectangle, polygon with holes, line, point, bitmap), in its
// class colour. Bitmaps are base64(zlib(PNG)): inflated in the browser (DecompressionStream),
// decoded (createImageBitmap) and tinted on a canvas; the result is a data: URL (img-src allows it).
// A mask is decoded straight to at most MASK_SIDE pixels a side and tinted at that size (a task's
// 13000 x 13000 mask took 7.7 s per tile at full size); one over MASK_MAX_PIXELS is not decoded:
// its outline is drawn.
"use strict";
SLY.Ann = (function () {
  const NS = "http://www.w3.org/2000/svg";
  const BITMAPS = ["bitmap", "alpha_mask"];
  const DRAWN = ["rectangle", "polygon", "line", "point", ...BITMAPS];
  const FALLBACK = ["#e8772e", "#2f7ed8", "#1a9c5b", "#9b51e0", "#d6336c", "#8a6d00"];
  const MASK_SIDE = 1024;           // the large view's size; the grid's tiles are smaller
  const MASK_MAX_PIXELS = 25e6;

  function svgEl(tag, attrs) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, v);
    return e;
  }

  /** title -> {color, shape} from a project meta; classes missing from the meta get a stable colour. */
  function classMap(meta) {
    const m = new Map();
    for (const c of (meta && meta.classes) || []) m.set(c.title, { color: c.color || "#e8772e", shape: c.shape || "any" });
    m.colorOf = function (title) {
      if (m.has(title)) return m.get(title).color;
      let h = 0; for (const ch of String(title)) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
      return FALLBACK[h % FALLBACK.length];
    };
    return m;
  }

  function shapeOf(o) { return o.geometryType || o.shape || (o.bitmap ? "bitmap" : "polygon"); }
  function drawable(o) { return DRAWN.includes(shapeOf(o)); }

  function ring(points) {
    return (points || []).map((p, i) => `${i ? "L" : "M"}${+p[0]} ${+p[1]}`).join("") + "Z";
  }

  // Masks are decoded once per (data, colour): the grid and the large view share them.
  const masks = new Map();
  function maskURL(b64, color) {
    const key = color + b64;
    if (!masks.has(key)) masks.set(key, decodeMask(b64, color));
    return masks.get(key);
  }
  async function decodeMask(b64, color) {
    const bin = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const png = await new Response(new Blob([bin]).stream().pipeThrough(new DecompressionStream("deflate"))).blob();
    const ihdr = new DataView(await png.slice(0, 24).arrayBuffer());
    const width = ihdr.getUint32(16), height = ihdr.getUint32(20);
    if (width * height > MASK_MAX_PIXELS) return { url: null, width, height, pixels: 0 };
    const scale = Math.min(1, MASK_SIDE / Math.max(width, height));
    const w = Math.max(1, Math.round(width * scale)), h = Math.max(1, Math.round(height * scale));
    // Smoothing keeps a one-pixel line of a large mask visible once shrunk (any alpha counts as on).
    const bmp = await createImageBitmap(new Blob([png], { type: "image/png" }),
      { premultiplyAlpha: "none", resizeWidth: w, resizeHeight: h, resizeQuality: "medium" });
    const cv = document.createElement("canvas");
    cv.width = w; cv.height = h;
    const ctx = cv.getContext("2d");
    ctx.drawImage(bmp, 0, 0);
    const img = ctx.getImageData(0, 0, cv.width, cv.height), px = img.data;
    // The SDK's reader takes the PNG's alpha as the mask; a mask saved without alpha counts its non-black pixels.
    let hasAlpha = false;
    for (let i = 3; i < px.length; i += 4) if (px[i] < 255) { hasAlpha = true; break; }
    const [r, g, b] = [1, 3, 5].map(i => parseInt(color.slice(i, i + 2), 16));
    const on = new Uint8Array(w * h);
    for (let i = 0, j = 0; i < px.length; i += 4, j++) on[j] = (hasAlpha ? px[i + 3] > 0 : px[i] + px[i + 1] + px[i + 2] > 0) ? 1 : 0;
    // The mask's edge in near-black (as the casing of vector shapes): k pixels of it, about 1/300 of
    // the mask's side, so it still shows once the mask is shrunk to a thumbnail. Four probes a pixel.
    const k = Math.max(1, Math.ceil(Math.max(w, h) / 300));
    const at = (x, y) => x >= 0 && y >= 0 && x < w && y < h && on[y * w + x] === 1;
    for (let y = 0, j = 0; y < h; y++) {
      for (let x = 0; x < w; x++, j++) {
        const i = 4 * j;
        if (!on[j]) { px[i + 3] = 0; continue; }
        const edge = !at(x - k, y) || !at(x + k, y) || !at(x, y - k) || !at(x, y + k);
        px[i] = edge ? 17 : r; px[i + 1] = edge ? 17 : g; px[i + 2] = edge ? 17 : b; px[i + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    bmp.close();
    return { url: cv.toDataURL("image/png"), width, height, pixels: w * h };
  }

  /** The SVG elements of one label (a <g class="lbl">); a bitmap's image is filled in when decoded. */
  function label(o, index, color, size, pending) {
    const shape = shapeOf(o);
    const g = svgEl("g", { class: "lbl s-" + shape, "data-index": index, "data-class": o.classTitle, "data-shape": shape,
      fill: color, stroke: color });
    const ext = (o.points && o.points.exterior) || [];
    if (shape === "rectangle" && ext.length >= 2) {
      const [[x0, y0], [x1, y1]] = ext;
      // Supervisely's rectangle corners are inclusive pixels: the box covers x1 and y1 too.
      g.append(svgEl("rect", { x: Math.min(x0, x1), y: Math.min(y0, y1), width: Math.abs(x1 - x0) + 1, height: Math.abs(y1 - y0) + 1 }));
    } else if (shape === "polygon") {
      g.append(svgEl("path", { d: ring(ext) + ((o.points && o.points.interior) || []).map(ring).join(""), "fill-rule": "evenodd" }));
    } else if (shape === "line") {
      g.append(svgEl("polyline", { points: ext.map(p => `${+p[0]},${+p[1]}`).join(" "), fill: "none" }));
    } else if (shape === "point" && ext.length) {
      const r = Math.max(2, Math.max(size.width || 0, size.height || 0) / 70);
      g.append(svgEl("circle", { cx: ext[0][0], cy: ext[0][1], r }));
    } else if (BITMAPS.includes(shape) && o.bitmap && o.bitmap.data) {
      const [ox, oy] = o.bitmap.origin || [0, 0];
      const im = svgEl("image", { x: ox, y: oy, preserveAspectRatio: "none" });
      g.append(im);
      pending.push(maskURL(o.bitmap.data, color).then(m => {
        g.dataset.px = m.pixels;      // pixels decoded and tinted for this label
        if (m.url) {
          im.setAttribute("width", m.width); im.setAttribute("height", m.height); im.setAttribute("href", m.url);
        } else {
          g.classList.add("too-large");
          g.append(svgEl("rect", { x: ox, y: oy, width: m.width, height: m.height, fill: "none", "stroke-dasharray": "8 4",
            "vector-effect": "non-scaling-stroke" }));
        }
      }, () => { g.classList.add("broken"); }));
    } else {
      return null;
    }
    // A dark casing under each vector shape: the class colour alone vanishes on an image painted in
    // that colour (the demo's are); the casing contrasts on light and colourful pixels, the colour on dark.
    const drawnShape = g.firstChild;
    if (drawnShape && drawnShape.tagName !== "image") {
      const casing = drawnShape.cloneNode();
      casing.setAttribute("class", "case");
      g.insertBefore(casing, drawnShape);
    }
    g.append(svgEl("title", {}));
    g.lastChild.textContent = `${o.classTitle} (${shape})`;
    return g;
  }

  /** An <svg class="ann"> drawing every label of `ann` that has a drawable shape. Its `ready`
   * promise settles when the bitmaps are decoded; data-drawn holds the number of labels drawn. */
  function overlay(ann, classes) {
    const size = (ann && ann.size) || {};
    const w = size.width || 1, h = size.height || 1;
    const svg = svgEl("svg", { class: "ann", viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "xMidYMid meet", "aria-hidden": "true" });
    const pending = [];
    let drawn = 0;
    ((ann && ann.objects) || []).forEach((o, i) => {
      const g = label(o, i, classes.colorOf(o.classTitle), size, pending);
      if (g) { svg.append(g); drawn++; }
    });
    svg.dataset.drawn = drawn;
    svg.ready = Promise.all(pending).then(() => { svg.dataset.ready = "1"; });
    return svg;
  }

  /** A tag as text: "name" or "name: value". */
  function tagText(t) { return t.value === null || t.value === undefined || t.value === "" ? t.name : `${t.name}: ${t.value}`; }

  /** A small colour square (the class or tag colour), set through CSSOM. */
  function swatch(color) {
    const s = SLY.el("span", { class: "swatch", "aria-hidden": "true" });
    s.style.background = color;
    return s;
  }

  return { classMap, overlay, shapeOf, drawable, tagText, swatch };
})();
