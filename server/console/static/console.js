// Shared helpers of the console pages: API calls with the session cookie, DOM building,
// formatting, usage bars, icons and SHA-256 for uploads. No dependencies (charts: charts.js).
"use strict";
const SLY = {};

SLY.TASK_TYPES = ["train", "inference", "custom", "cleanup"];
SLY.FINAL_STATES = ["finished", "failed", "stopped", "lost"];

// --- the connection: one "reconnecting" notice while the server cannot be reached ---
// A fetch that throws (server down, network gone) or a gateway's 502/503/504 marks the connection
// lost; the next answer marks it back. While it is lost, error flashes are not shown (the notice
// says it once), and an error flash left from before clears itself when the server answers again.
SLY.net = {
  lost: false,
  down() {
    if (SLY.net.lost) return;
    SLY.net.lost = true;
    document.body.classList.add("offline");
    let n = document.getElementById("conn");
    if (!n) {
      n = SLY.el("p", { id: "conn", role: "status", "aria-live": "polite" }, "Connection lost, reconnecting…");
      const main = document.getElementById("main") || document.body;
      main.prepend(n);
    }
    n.hidden = false;
  },
  up() {
    if (!SLY.net.lost) return;
    SLY.net.lost = false;
    document.body.classList.remove("offline");
    const n = document.getElementById("conn");
    if (n) n.hidden = true;
    const f = document.getElementById("flash");
    if (f && f.classList.contains("error") && f.dataset.net) f.hidden = true;
  },
};
/** fetch(), keeping SLY.net up to date. */
SLY.fetch = async function (url, init) {
  let r;
  try { r = await fetch(url, init); }
  catch (e) { SLY.net.down(); throw e; }
  if ([502, 503, 504].includes(r.status)) SLY.net.down(); else SLY.net.up();
  return r;
};

/** Where sign-in sends back to: this page (path and query). */
SLY.signin = function () {
  location.assign("/signin?next=" + encodeURIComponent(location.pathname + location.search));
};

/** Call the user API with the session cookie; returns decoded JSON (or null); 401 -> sign-in. */
SLY.api = async function (method, path, body, opts) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined && body !== null) {
    if (body instanceof Blob || body instanceof ArrayBuffer || ArrayBuffer.isView(body)) {
      init.body = body; init.headers["content-type"] = "application/octet-stream";
    } else {
      init.body = JSON.stringify(body); init.headers["content-type"] = "application/json";
    }
  }
  const r = await SLY.fetch(path, Object.assign(init, opts || {}));
  if (r.status === 401 && !(opts && opts.noRedirect)) {
    SLY.signin();
    throw new Error("not signed in");
  }
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!r.ok) {
    const err = new Error((data && (data.detail || data.error)) || r.status + " " + r.statusText);
    err.status = r.status; err.code = data && data.error;
    throw err;
  }
  return data;
};

/** Build an element: SLY.el("a", {href: "/x", class: "y"}, "text", child). */
SLY.el = function (tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v;   // CSSOM: the CSP refuses style attributes
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
};

SLY.flash = function (msg, isError) {
  const f = document.getElementById("flash");
  if (!f) return;
  if (isError && SLY.net.lost) { f.dataset.net = "1"; f.hidden = true; return; }   // the notice says it
  delete f.dataset.net;
  f.textContent = msg; f.hidden = !msg; f.className = isError ? "error" : "";
  clearTimeout(SLY._flashTimer);
  if (msg && !isError) SLY._flashTimer = setTimeout(() => { f.hidden = true; }, 6000);
};

/** Timestamps come as epoch seconds (number) or ISO strings; answer milliseconds or null. */
SLY.ms = function (ts) {
  if (ts === null || ts === undefined || ts === "") return null;
  if (typeof ts === "number") return ts > 1e12 ? ts : ts * 1000;
  const n = Number(ts);
  if (!isNaN(n)) return SLY.ms(n);
  const s = /[zZ]|[+-]\d\d:?\d\d$/.test(ts) ? ts : ts + "Z";  // naive ISO strings are UTC
  const v = Date.parse(s);
  return isNaN(v) ? null : v;
};
SLY.time = function (ts) { const m = SLY.ms(ts); return m ? new Date(m).toLocaleString() : "—"; };
SLY.span = function (seconds) {
  if (seconds === null || seconds === undefined || isNaN(seconds)) return "—";
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor(seconds / 60) % 60, s = seconds % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
};
SLY.ago = function (ts) { const m = SLY.ms(ts); return m ? SLY.span((Date.now() - m) / 1000) + " ago" : "never"; };
/** A <time> saying how long ago `ts` was, kept counting every second (also while the server is away). */
SLY.agoEl = function (ts, attrs) {
  const m = SLY.ms(ts);
  if (!m) return SLY.el("span", attrs || {}, "never");
  return SLY.el("time", Object.assign({ datetime: new Date(m).toISOString(), title: SLY.time(ts), dataset: { ago: m } }, attrs || {}),
    SLY.ago(m));
};
setInterval(() => {
  for (const t of document.querySelectorAll("[data-ago]")) {
    const text = SLY.ago(Number(t.dataset.ago));
    if (t.textContent !== text) t.textContent = text;
  }
}, 1000);
SLY.bytes = function (n) {
  if (n === null || n === undefined) return "—";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
};

/** A task's {state: ts} timeline, whichever shape the server sends (list or mapping). */
SLY.states = function (task) {
  const s = task.states || task.timeline || [];
  if (Array.isArray(s)) return s.map(x => ({ state: x.state, ts: x.ts || x.at || x.time }));
  return Object.entries(s).map(([state, ts]) => ({ state, ts }));
};
/** Seconds a task ran (first non-queued state to its final state, or to now). */
SLY.duration = function (task) {
  const st = SLY.states(task);
  const start = SLY.ms(task.started_at) || SLY.ms((st.find(x => x.state === "running") || st.find(x => x.state !== "queued") || {}).ts)
    || SLY.ms(task.created_at);
  if (!start) return null;
  const fin = SLY.FINAL_STATES.includes(task.state)
    ? (SLY.ms(task.finished_at) || SLY.ms((st.find(x => x.state === task.state) || {}).ts) || SLY.ms(task.updated_at)) : Date.now();
  return fin ? (fin - start) / 1000 : null;
};

/** A usage bar with its number in a fixed-width column (so bars line up row to row).
 * pct: 0..100 or null; label: the accessible text and tooltip (default "N%"). */
SLY.bar = function (pct, label) {
  if (pct === null || pct === undefined || isNaN(pct)) return SLY.el("span", { class: "hint" }, "—");
  const p = Math.max(0, Math.min(100, pct));
  const text = label || `${Math.round(p)}%`;
  return SLY.el("span", { class: "usage", title: text },
    SLY.el("span", { class: "bar" + (p >= 90 ? " hot" : ""), role: "img", "aria-label": text, dataset: { pct: p.toFixed(1) } },
      SLY.el("span", { style: `width:${p}%` })),
    SLY.el("span", { class: "barlabel" }, `${Math.round(p)}%`));
};

/** A small caption under usage bars (a disk path, a GPU model), cut to one line. */
SLY.barTag = function (text) { return SLY.el("span", { class: "usage-tag trunc", title: text }, text); };

/** One line of text cut with an ellipsis; the whole text in its title (hover). */
SLY.trunc = function (text, tag, attrs) {
  return SLY.el(tag || "span", Object.assign({ class: "trunc", title: text }, attrs || {}), text);
};

const ICONS = {
  edit: "M4 20h4L19 9l-4-4L4 16zM13.5 6.5l4 4",
  key: "M14.5 9.5a4 4 0 1 0-3.3 3.9L13 15h2v2h2v2h3v-3l-5.6-5.6a4 4 0 0 0 .1-.9zM8.5 9h.01",
  trash: "M4 7h16M10 11v6M14 11v6M6 7l1 13h10l1-13M9 7V4h6v3",
  broom: "M4 20l7-7M14 4l6 6-6 6-6-6zM3 21h6",
  folder: "M3 6.5h6.5l2 2H21V19H3z",
};
/** An inline SVG icon (stroke drawn, currentColor), hidden from assistive technology. */
SLY.icon = function (name) {
  const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg"), path = document.createElementNS(ns, "path");
  svg.setAttribute("viewBox", "0 0 24 24"); svg.setAttribute("class", "icon"); svg.setAttribute("aria-hidden", "true");
  path.setAttribute("d", ICONS[name]); svg.append(path);
  return svg;
};

/** A command as a shell would read it back: a list's words quoted where needed. */
SLY.commandText = function (c) {
  if (c === null || c === undefined || c === "") return "";
  if (!Array.isArray(c)) return String(c);
  return c.map(w => (/^[\w@%+=:,./-]+$/.test(w) ? w : `'${String(w).replace(/'/g, "'\\''")}'`)).join(" ");
};

/** Did the task's container start? Before that, a task's `progress` counts its input downloads. */
SLY.ran = function (task) {
  return ["running", "uploading"].includes(task.state) || SLY.states(task).some(s => s.state === "running");
};

/** A structured log line (the SDK's progress, metrics and checkpoint events) as text, as the
 * demo's CLI prints it (tools/demo/__main__.py show_line); null for a plain line. */
SLY.eventText = function (l) {
  const ev = String(l.event_type || "").replace(/^EventType\./, "").toLowerCase();
  const num = v => (typeof v === "number" ? String(Number(v.toPrecision(6))) : String(v));
  if (ev === "progress" && typeof l.total === "number") {
    const cur = typeof l.current === "number" ? l.current : 0, width = 30;
    const frac = l.total ? Math.max(0, Math.min(1, cur / l.total)) : 0, done = Math.floor(frac * width);
    return `${l.subtask || "progress"} [${"#".repeat(done)}${".".repeat(width - done)}] ${num(cur)}/${num(l.total)}`;
  }
  if (ev === "metrics" && l.metrics && typeof l.metrics === "object") {
    const values = Object.entries(l.metrics).map(([k, v]) => `${k} ${num(v)}`).join(" ");
    return `metrics ${String(l.type ?? "?").padEnd(5)} epoch ${l.epoch ?? "?"}: ${values}`;
  }
  if (ev === "checkpoint") {
    const o = l.optional || {}, epoch = o.epoch ?? l.epoch;
    return `checkpoint ${l.subdir || l.path || ""}` + (l.sizeb !== undefined ? ` (${l.sizeb} bytes)` : "")
      + (epoch !== undefined && epoch !== null ? `, epoch ${epoch}` : "") + (l.best_now ? " (best)" : "");
  }
  return null;
};

/** Replace the page's content with "not found" (an id that does not exist, or no longer does). */
SLY.notFound = function (what, back, backText) {
  document.title = `Not found · sly-agent console`;
  const main = document.getElementById("main");
  const flash = document.getElementById("flash");
  main.replaceChildren(...[flash].filter(Boolean), SLY.el("div", { class: "notfound", id: "notfound" },
    SLY.el("h1", {}, "404: not found"), SLY.el("p", {}, `${what} does not exist, or no longer does.`),
    SLY.el("p", {}, SLY.el("a", { href: back || "/nodes" }, backText || "← Nodes"))));
};

/** A progress element from {current, total}. */
SLY.progress = function (progress) {
  if (!progress || !progress.total) return SLY.el("span", { class: "hint" }, "—");
  const pr = SLY.el("progress", { max: progress.total, value: Math.min(progress.current, progress.total),
    "aria-label": `${progress.current} of ${progress.total}` });
  pr.style.width = "7rem";
  return SLY.el("span", {}, pr, SLY.el("span", { class: "barlabel" }, `${progress.current}/${progress.total}`));
};

// --- telemetry: tolerant readers (the agent sends percent or used/total) ---
function pctOf(x) {
  if (x === null || x === undefined) return null;
  if (typeof x === "number") return x;
  for (const k of ["percent", "usage_percent", "util", "utilization", "used_percent"]) if (typeof x[k] === "number") return x[k];
  if (typeof x.used === "number" && x.total) return 100 * x.used / x.total;
  return null;
}
SLY.tele = {
  cpu(t) { return t ? pctOf(t.cpu !== undefined ? t.cpu : t.cpu_percent) : null; },
  memory(t) { return t ? pctOf(t.memory !== undefined ? t.memory : t.memory_percent) : null; },
  disks(t) {
    if (!t || !t.disks) return [];
    const d = Array.isArray(t.disks) ? t.disks : Object.entries(t.disks).map(([path, v]) => Object.assign({ path }, v));
    return d.map(x => ({ name: x.path || x.mount || x.mountpoint || x.name || "disk", pct: pctOf(x) }));
  },
  disk(t) { const d = SLY.tele.disks(t).map(x => x.pct).filter(x => x !== null); return d.length ? Math.max(...d) : null; },
  gpus(t) {
    if (!t || !Array.isArray(t.gpus)) return [];
    return t.gpus.map((g, i) => {
      const util = typeof g === "number" ? g : pctOf({ percent: g.utilization_percent ?? g.util_percent ?? g.gpu_util ?? g.utilization ?? g.util });
      let mem = g.memory_percent ?? null;
      const used = g.memory_used ?? (g.memory && g.memory.used), total = g.memory_total ?? (g.memory && g.memory.total);
      if (mem === null && typeof used === "number" && total) mem = 100 * used / total;
      return { index: g.index ?? i, name: g.name || `GPU ${g.index ?? i}`, util, mem };
    });
  },
};

/** Copy text to the clipboard (falls back to a selection where the Clipboard API is absent). */
SLY.copy = async function (text, button) {
  try { await navigator.clipboard.writeText(text); }
  catch (e) {
    const ta = SLY.el("textarea", { style: "position:fixed;left:-999px" }); ta.value = text;
    document.body.append(ta); ta.select(); document.execCommand("copy"); ta.remove();
  }
  if (button) { const old = button.textContent; button.textContent = "Copied"; setTimeout(() => { button.textContent = old; }, 1500); }
};

// --- SHA-256: WebCrypto in a secure context (https, localhost); plain JS elsewhere (http on a LAN) ---
const K256 = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01,
  0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc,
  0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
  0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08,
  0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
  0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2]);
function sha256js(bytes) {
  const n = bytes.length, padded = new Uint8Array(((n + 9 + 63) >> 6) << 6);
  padded.set(bytes); padded[n] = 0x80;
  const dv = new DataView(padded.buffer);
  dv.setUint32(padded.length - 8, Math.floor(n / 0x20000000)); dv.setUint32(padded.length - 4, (n << 3) >>> 0);
  const h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  const w = new Uint32Array(64);
  const rotr = (x, r) => (x >>> r) | (x << (32 - r));
  for (let off = 0; off < padded.length; off += 64) {
    for (let i = 0; i < 16; i++) w[i] = dv.getUint32(off + 4 * i);
    for (let i = 16; i < 64; i++) {
      const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = (w[i - 16] + s0 + w[i - 7] + s1) >>> 0;
    }
    let [a, b, c, d, e, f, g, k] = h;
    for (let i = 0; i < 64; i++) {
      const t1 = (k + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i]) >>> 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      k = g; g = f; f = e; e = (d + t1) >>> 0; d = c; c = b; b = a; a = (t1 + t2) >>> 0;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
  }
  return Array.from(h, x => x.toString(16).padStart(8, "0")).join("");
}
/** Hex SHA-256 of an ArrayBuffer. */
SLY.sha256 = async function (buf) {
  if (window.crypto && crypto.subtle) {
    const d = await crypto.subtle.digest("SHA-256", buf);
    return Array.from(new Uint8Array(d), b => b.toString(16).padStart(2, "0")).join("");
  }
  return sha256js(new Uint8Array(buf));
};
SLY._sha256js = sha256js;

// Sign-out button in the header.
document.addEventListener("DOMContentLoaded", () => {
  // Narrow windows (console.css, below 700 px): Menu slides the sidebar in; Esc, the scrim or a link
  // closes it. Esc is taken here first (console.js loads before the page's script), so a page's
  // own Esc handler (nodes.js panels) sees defaultPrevented and leaves its panels alone.
  const menu = document.getElementById("menu"), scrim = document.getElementById("scrim");
  if (menu) {
    const setNav = (open) => {
      document.body.classList.toggle("nav-open", open);
      menu.setAttribute("aria-expanded", String(open));
      scrim.hidden = !open;
      if (open) document.querySelector("#sidebar a").focus();
    };
    menu.addEventListener("click", () => setNav(!document.body.classList.contains("nav-open")));
    scrim.addEventListener("click", () => setNav(false));
    for (const a of document.querySelectorAll("#sidebar a")) a.addEventListener("click", () => setNav(false));
    document.addEventListener("keydown", (ev) => {
      if (ev.key !== "Escape" || !document.body.classList.contains("nav-open")) return;
      ev.preventDefault();
      setNav(false);
      menu.focus();
    });
  }
  const so = document.getElementById("signout");
  if (so) so.addEventListener("click", async () => {
    try { await SLY.api("DELETE", "/api/v1/session", undefined, { noRedirect: true }); } catch (e) { /* signed out anyway */ }
    location.assign("/signin");
  });
});
