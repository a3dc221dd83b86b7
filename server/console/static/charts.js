// Line charts for the console, drawn by uPlot (vendored in static/vendor/uplot/, see vendor.sh).
// SLY.Chart wraps one uPlot in a <figure>: a caption with the latest values, axes with ticks,
// a legend (click a series to hide it), a cursor tooltip and optional vertical marks (checkpoints).
"use strict";
(function () {
  const charts = new Set();

  /** Colours from the page's CSS variables, so charts follow the light or dark palette. */
  function palette() {
    const cs = getComputedStyle(document.documentElement), v = n => cs.getPropertyValue(n).trim();
    return { series: ["--c1", "--c2", "--c3", "--c4", "--c5", "--c6"].map(v), grid: v("--grid"), axis: v("--axis"),
      mark: v("--mark"), surface: v("--surface") };
  }

  /** A number short enough for an axis or a tooltip: 3 significant digits, no float noise. */
  SLY.num = function (v, unit) {
    if (v === null || v === undefined || isNaN(v)) return "—";
    if (unit === "%") return `${Math.round(v)}%`;
    const a = Math.abs(v);
    const s = a === 0 ? "0" : a >= 1000 ? Math.round(v).toLocaleString() : a >= 1 ? String(+v.toPrecision(4)) : String(+v.toPrecision(3));
    return s + (unit || "");
  };

  const MIN_SPAN_S = 60;   // the shortest time axis a window shows
  const STEPS = [0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000, 20000, 50000];

  class Chart {
    /**
     * fig: a <figure> to draw into. opts: {title, x: "time" | "epoch", series: [{label, color?}],
     * unit ("%" or ""), range ([lo, hi] for a fixed y range), height, window (() => seconds or null:
     * the time span shown up to now; null fits the data), fill (shade under single lines)}.
     */
    constructor(fig, opts) {
      this.fig = fig; this.o = opts; this.u = null; this.data = null; this.marks = []; this.zoomed = false;
      fig.classList.add("chart");
      this.now = SLY.el("span", { class: "now" });
      this.note = SLY.el("span", { class: "hint cp-note", hidden: true });
      this.plot = SLY.el("div", { class: "plot" });
      fig.replaceChildren(SLY.el("figcaption", {}, SLY.el("span", { class: "trunc", title: opts.title }, opts.title), this.note, this.now), this.plot);
      this.ro = new ResizeObserver(() => this.resize());
      this.ro.observe(this.plot);
      charts.add(this);
    }

    /** data: [xs, ys1, ys2, ...] (uPlot's aligned columns, null for a gap); marks: [{x, label}]. */
    set(data, marks) {
      this.data = data;
      this.marks = marks || [];
      Object.assign(this.fig.dataset, { points: data[0].length, series: data.length - 1, marks: this.marks.length });
      if (!this.u) this.build();
      else this.u.setData(data, !this.zoomed);   // a zoomed chart keeps its x range while data comes in
      if (!this.zoomed) this.applyWindow();
      this.caption();
    }

    /** Show the chosen window (at most the last N seconds up to now) on a time axis; else fit the data.
     * The window is a limit, not a frame: samples that span less than it (a new node's) are drawn
     * from the axis' left edge, with at least MIN_SPAN_S on the axis, not squeezed into its right edge. */
    applyWindow() {
      const w = this.o.window && this.o.window();
      if (!this.u || this.o.x !== "time" || !w) return;
      const xs = this.data[0], now = Date.now() / 1000;
      const first = xs.length ? xs[0] : now, last = xs.length ? xs[xs.length - 1] : now;
      if (now - first >= w) this.u.setScale("x", { min: now - w, max: Math.max(now, last) });
      else this.u.setScale("x", { min: first, max: Math.max(now, last, first + MIN_SPAN_S) });   // fills from the left
    }

    /** Drop a drag zoom and show the window (or all data) again. */
    unzoom() {
      this.zoomed = false;
      if (this.u) { this.u.setData(this.data, true); this.applyWindow(); }
    }

    setMarks(marks) {
      this.marks = marks || [];
      this.fig.dataset.marks = this.marks.length;
      if (this.u) this.u.redraw(false);
      this.caption();
    }

    caption() {
      const d = this.data, last = d[0].length - 1;
      const parts = this.o.series.map((s, i) => {
        const name = this.o.series.length > 1 ? `${s.label} ` : "";   // a single line is named by the title
        for (let j = last; j >= 0; j--) if (d[i + 1][j] !== null && d[i + 1][j] !== undefined) return name + SLY.num(d[i + 1][j], this.o.unit);
        return null;
      }).filter(Boolean);
      this.now.textContent = parts.join(" · ");
      this.now.title = parts.join(", ");
      const n = this.marks.length;
      this.note.hidden = !n;
      this.note.textContent = n === 1 && this.marks[0].best ? "◆ best checkpoint" : `◆ ${n} checkpoint${n === 1 ? "" : "s"}`;
    }

    fmtX(x) {
      return this.o.x === "time" ? new Date(x * 1000).toLocaleTimeString() : `epoch ${SLY.num(x)}`;
    }

    build() {
      const o = this.o, p = palette(), time = o.x === "time", self = this;
      this.colors = o.series.map((s, i) => s.color || p.series[i % p.series.length]);
      const axis = { stroke: p.axis, font: "11px system-ui, sans-serif", labelFont: "600 11px system-ui, sans-serif",
        grid: { stroke: p.grid, width: 1 }, ticks: { stroke: p.grid, width: 1, size: 4 } };
      const xAxis = Object.assign({}, axis, time ? {} : {
        // room under the plot for the small checkpoint diamonds (markPlugin), between it and the tick labels
        label: "epoch", labelSize: 14, labelGap: 0, size: 32, gap: 9,
        splits: (u, ai, min, max) => {
          const ints = self.data[0].every(Number.isInteger);
          const target = Math.max(2, Math.floor(u.bbox.width / uPlot.pxRatio / 64));
          const step = STEPS.find(s => (max - min) / s <= target && (!ints || s >= 1)) || STEPS[STEPS.length - 1];
          const out = [];
          for (let v = Math.ceil(min / step - 1e-9) * step; v <= max + 1e-9; v += step) out.push(+v.toFixed(6));
          return out;
        },
        values: (u, vals) => vals.map(v => SLY.num(v)),
      });
      const yAxis = Object.assign({}, axis, { size: 52, values: (u, vals) => vals.map(v => SLY.num(v, o.unit)) });
      const opts = {
        width: Math.max(240, this.plot.clientWidth), height: o.height || 200,
        legend: { live: false },
        cursor: { drag: { x: true, y: false, setScale: true }, points: { size: 7 } },
        scales: {
          x: { time, range: (u, min, max) => (min === null || min === undefined ? [0, 1] : min === max ? [min - 1, max + 1] : [min, max]) },
          y: o.range ? { range: () => o.range } : { auto: true },
        },
        axes: [xAxis, yAxis],
        series: [{ label: time ? "time" : "epoch" }].concat(o.series.map((s, i) => ({
          label: s.label, stroke: this.colors[i], width: 2, spanGaps: true,
          fill: o.fill && o.series.length === 1 ? this.colors[i] + "22" : undefined,
          points: { size: 5, fill: this.colors[i] },
          value: (u, v) => SLY.num(v, o.unit),
        }))),
        plugins: [this.tooltip(), this.markPlugin(p), this.zoomPlugin()],
      };
      this.u = new uPlot(opts, this.data, this.plot);
      this.fig.uplot = this.u;   // for tests and the benchmark: the drawn data and series
      this.applyWindow();
    }

    resize() {
      const w = this.plot.clientWidth;
      if (this.u && w > 0 && Math.abs(w - this.u.width) > 1) this.u.setSize({ width: w, height: this.u.height });
    }

    /** A drag along x zooms in (uPlot); remember it, so refreshes keep it; a double-click undoes it. */
    zoomPlugin() {
      const self = this;
      return { hooks: {
        init(u) { u.over.addEventListener("dblclick", () => self.unzoom()); },
        setSelect(u) { if (u.select.width > 0) self.zoomed = true; },
      } };
    }

    /** A box beside the cursor with x, every shown series' value, and a checkpoint there. */
    tooltip() {
      const self = this;
      let tip = null;
      return { hooks: {
        init(u) {
          tip = SLY.el("div", { class: "u-tip", hidden: true, role: "presentation" });
          u.over.append(tip);
          u.over.addEventListener("mouseleave", () => { tip.hidden = true; });
        },
        setCursor(u) {
          const i = u.cursor.idx;
          if (i === null || i === undefined || u.cursor.left < 0) { tip.hidden = true; return; }
          const x = u.data[0][i];
          const rows = [SLY.el("div", { class: "head" }, self.fmtX(x))];
          u.series.forEach((s, si) => {
            if (si === 0 || !s.show) return;
            rows.push(SLY.el("div", {}, SLY.el("span", { class: "sw", style: `background:${self.colors[si - 1]}` }),
              SLY.el("span", { class: "k" }, `${s.label} `), SLY.num(u.data[si][i], self.o.unit)));
          });
          const here = self.marks.filter(m => m.x === x);
          if (here.length) rows.push(SLY.el("div", { class: "cp" }, "◆ " + here.map(m => m.label).join(", ")));
          tip.replaceChildren(...rows);
          tip.hidden = false;
          const w = tip.offsetWidth, h = tip.offsetHeight, W = u.over.clientWidth, H = u.over.clientHeight;
          const left = u.cursor.left + 14 + w > W ? u.cursor.left - w - 14 : u.cursor.left + 14;
          tip.style.left = `${Math.max(0, left)}px`;
          tip.style.top = `${Math.max(0, Math.min(u.cursor.top - h / 2, H - h))}px`;
        },
      } };
    }

    /** Checkpoints: a dashed vertical line at a mark's x and a diamond on every line there; a `minor`
     * mark (any checkpoint but the best, when all are shown) is only a small diamond under the plot,
     * on the epoch axis, so forty of them leave the curves readable. */
    markPlugin(p) {
      const self = this;
      const diamond = (ctx, x, y, r) => {
        ctx.beginPath(); ctx.moveTo(x, y - r); ctx.lineTo(x + r, y); ctx.lineTo(x, y + r); ctx.lineTo(x - r, y); ctx.closePath();
      };
      return { hooks: { draw(u) {
        if (!self.marks.length) return;
        const ctx = u.ctx, pr = uPlot.pxRatio, { left, top, width, height } = u.bbox;
        ctx.save();
        ctx.strokeStyle = p.mark; ctx.fillStyle = p.mark; ctx.lineWidth = pr;
        for (const m of self.marks) {
          const cx = Math.round(u.valToPos(m.x, "x", true));
          if (cx < left - 1 || cx > left + width + 1) continue;
          if (m.minor) {
            diamond(ctx, cx, top + height + 5 * pr, 3.5 * pr); ctx.fill();   // under the plot: no curve is hidden
            continue;
          }
          ctx.setLineDash([4 * pr, 4 * pr]);
          ctx.beginPath(); ctx.moveTo(cx, top); ctx.lineTo(cx, top + height); ctx.stroke();
          ctx.setLineDash([]);
          const i = u.data[0].indexOf(m.x);
          const ys = i < 0 ? [] : u.series.map((s, si) => (si && s.show ? u.data[si][i] : null)).filter(v => v !== null && v !== undefined);
          for (const y of ys.length ? ys.map(v => u.valToPos(v, "y", true)) : [top + 5 * pr]) {
            diamond(ctx, cx, y, 5 * pr);
            ctx.fill();
            ctx.strokeStyle = p.surface; ctx.stroke(); ctx.strokeStyle = p.mark;
          }
        }
        ctx.restore();
      } } };
    }

    destroy() {
      this.ro.disconnect();
      if (this.u) this.u.destroy();
      this.u = null;
      charts.delete(this);
    }

    rebuild() {
      if (!this.u) return;
      this.u.destroy(); this.u = null;
      this.build();
    }
  }
  SLY.Chart = Chart;

  // Canvas colours are fixed when a chart is built: rebuild when the colour scheme changes.
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => charts.forEach(c => c.rebuild()));
})();
