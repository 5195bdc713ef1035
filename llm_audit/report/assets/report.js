/* llm-audit report viewer.
 *
 * Reads the report embedded in this page (two JSON blocks), draws the plots as inline
 * SVG and shows the matrices in a virtualized table. Strings from the report (tensor
 * names come from untrusted checkpoints) reach the page only as text: textContent,
 * createTextNode, or attribute values set through the DOM; never innerHTML. Nothing is
 * fetched: the page's Content-Security-Policy forbids it anyway.
 */
"use strict";
(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const R = DATA.rows; // column-wise: R.alpha[i] is row i's alpha
  const N_ROWS = R.matrix.length;
  const CMP = DATA.compare; // null, or the changes from a baseline report
  const PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b",
    "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#d62728",
  ];
  const ROW_H = 26; // px, must match `#matrix-table td { height }` in the CSS
  const OVERSCAN = 12;

  // ---------------------------------------------------------------- helpers

  const $ = (id) => document.getElementById(id);

  /** An HTML element, its text set as text (never parsed as markup). */
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  /** An SVG element with attributes (numbers or our own class names), appended to parent. */
  function svgEl(tag, attrs, parent) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (parent) parent.appendChild(node);
    return node;
  }

  function svgTitle(node, text) {
    svgEl("title", {}, node).textContent = text;
  }

  /** A number shown with `digits` significant digits; null as a dash. */
  function fmt(value, digits = 4) {
    if (value === null || value === undefined) return "\u2013";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value) && Math.abs(value) < 1e15) return String(value);
    const abs = Math.abs(value);
    if (abs !== 0 && (abs >= 1e6 || abs < 1e-4)) return value.toExponential(digits - 1);
    return String(Number(value.toPrecision(digits)));
  }

  const sum = (values) => values.reduce((a, b) => a + b, 0);
  const colorOf = (k) => PALETTE[k % PALETTE.length];

  let spectraCache = null;
  /** Row i's compact spectrum; the (large) spectra block is parsed on first use only. */
  function spectrum(i) {
    if (spectraCache === null) {
      spectraCache = JSON.parse($("spectra-data").textContent);
    }
    return spectraCache[i] || {};
  }

  // ------------------------------------------------------------------ plots

  function niceStep(span, count) {
    const raw = span / count;
    const mag = Number(`1e${Math.floor(Math.log10(raw))}`);
    return [1, 2, 5, 10].map((s) => s * mag).find((s) => span / s <= count) || 10 * mag;
  }

  function linearTicks(lo, hi, count) {
    const step = niceStep(hi - lo, count);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
      out.push(Number(v.toPrecision(12)));
    }
    return out;
  }

  function logTicks(lo, hi) {
    const decades = Math.log10(hi / lo);
    const mults = decades < 1.2 ? [1, 2, 5] : decades < 3 ? [1, 3] : [1];
    const every = Math.max(1, Math.ceil(decades / 8));
    const out = [];
    for (let k = Math.floor(Math.log10(lo)); k <= Math.ceil(Math.log10(hi)); k++) {
      if (k % every !== 0) continue;
      for (const m of mults) {
        const v = m * Number(`1e${k}`);
        if (v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9)) out.push(v);
      }
    }
    return out.length >= 2 ? out : linearTicks(lo, hi, 4).filter((v) => v > 0);
  }

  function tickLabel(v) {
    const abs = Math.abs(v);
    if (abs !== 0 && (abs >= 1e4 || abs < 1e-3)) return v.toExponential(0).replace("e+", "e");
    return String(Number(v.toPrecision(3)));
  }

  /** A usable domain: finite, increasing, positive on a log axis. */
  function safeDomain([lo, hi], log) {
    if (log) {
      if (!(hi > 0)) hi = lo > 0 ? lo * 10 : 1;
      if (!(lo > 0)) lo = hi / 10;
      if (hi <= lo) [lo, hi] = [lo / 2, hi * 2];
    } else {
      if (!Number.isFinite(lo)) lo = 0;
      if (!Number.isFinite(hi)) hi = lo + 1;
      if (hi <= lo) {
        const pad = Math.abs(lo) * 0.1 || 1;
        [lo, hi] = [lo - pad, hi + pad];
      }
    }
    return [lo, hi];
  }

  function makeScale([d0, d1], [r0, r1], log) {
    const f = log ? Math.log10 : (v) => v;
    const a = f(d0);
    const span = f(d1) - a;
    return (v) => r0 + ((f(v) - a) / span) * (r1 - r0);
  }

  let plotCount = 0;
  /**
   * Axes, grid and a clipped group to draw in. opts: width, height, title,
   * x / y: {domain: [lo, hi], log, label, ticks}.
   */
  function plot(parent, opts) {
    const m = { left: 60, right: 16, top: 14, bottom: 42 };
    const W = opts.width;
    const H = opts.height;
    const svg = svgEl("svg", { class: "plot", viewBox: `0 0 ${W} ${H}`, width: W, height: H }, parent);
    svg.setAttribute("role", "img");
    if (opts.title) svgTitle(svg, opts.title);
    const xd = safeDomain(opts.x.domain, opts.x.log);
    const yd = safeDomain(opts.y.domain, opts.y.log);
    const x = makeScale(xd, [m.left, W - m.right], opts.x.log);
    const y = makeScale(yd, [H - m.bottom, m.top], opts.y.log);
    const axes = svgEl("g", {}, svg);
    const xt = opts.x.ticks || (opts.x.log ? logTicks(...xd) : linearTicks(...xd, 7));
    const yt = opts.y.ticks || (opts.y.log ? logTicks(...yd) : linearTicks(...yd, 5));
    for (const t of xt) {
      const px = x(t).toFixed(1);
      svgEl("line", { class: "grid", x1: px, x2: px, y1: m.top, y2: H - m.bottom }, axes);
      svgEl("line", { class: "axis", x1: px, x2: px, y1: H - m.bottom, y2: H - m.bottom + 4 }, axes);
      const label = svgEl("text", { x: px, y: H - m.bottom + 16, "text-anchor": "middle" }, axes);
      label.textContent = tickLabel(t);
    }
    for (const t of yt) {
      const py = y(t).toFixed(1);
      svgEl("line", { class: "grid", x1: m.left, x2: W - m.right, y1: py, y2: py }, axes);
      svgEl("line", { class: "axis", x1: m.left - 4, x2: m.left, y1: py, y2: py }, axes);
      const label = svgEl("text", { x: m.left - 6, y: py, "text-anchor": "end", dy: "0.32em" }, axes);
      label.textContent = tickLabel(t);
    }
    svgEl("line", { class: "axis", x1: m.left, x2: W - m.right, y1: H - m.bottom, y2: H - m.bottom }, axes);
    svgEl("line", { class: "axis", x1: m.left, x2: m.left, y1: m.top, y2: H - m.bottom }, axes);
    const xLabel = svgEl("text", { x: (m.left + W - m.right) / 2, y: H - 6, "text-anchor": "middle" }, axes);
    xLabel.textContent = opts.x.label;
    const yLabel = svgEl("text", {
      x: -(m.top + H - m.bottom) / 2, y: 14, "text-anchor": "middle", transform: "rotate(-90)",
    }, axes);
    yLabel.textContent = opts.y.label;
    const clipId = `clip-${++plotCount}`;
    const clip = svgEl("clipPath", { id: clipId }, svgEl("defs", {}, svg));
    svgEl("rect", { x: m.left, y: m.top, width: W - m.left - m.right, height: H - m.top - m.bottom }, clip);
    const g = svgEl("g", { "clip-path": `url(#${clipId})` }, svg);
    return { svg, g, x, y, xd, yd, left: m.left, right: W - m.right, top: m.top, bottom: H - m.bottom };
  }

  /** SVG path data through [x, y] pixel points; a non-finite point lifts the pen. */
  function linePath(points) {
    let d = "";
    let pen = false;
    for (const [px, py] of points) {
      if (!Number.isFinite(px) || !Number.isFinite(py)) {
        pen = false;
        continue;
      }
      d += `${pen ? "L" : "M"}${px.toFixed(1)} ${py.toFixed(1)}`;
      pen = true;
    }
    return d;
  }

  function vline(p, value, cls, label) {
    const px = p.x(value);
    if (!Number.isFinite(px)) return;
    svgEl("line", { class: cls, x1: px.toFixed(1), x2: px.toFixed(1), y1: p.top, y2: p.bottom }, p.g);
    if (label) {
      const right = px > (p.left + p.right) / 2; // keep the label inside the plot
      const text = svgEl("text", {
        x: (px + (right ? -3 : 3)).toFixed(1), y: p.top + 10, "text-anchor": right ? "end" : "start",
      }, p.g);
      text.textContent = label;
    }
  }

  /** Bins of a compact histogram [lo, hi, nonpositive, counts]: equal widths in log λ. */
  function histBins(hist) {
    const [lo, hi, nonpositive, counts] = hist;
    const ratio = hi / lo;
    const B = counts.length;
    const bins = counts.map((c, k) => ({
      x0: lo * ratio ** (k / B), x1: lo * ratio ** ((k + 1) / B), c,
    }));
    return { bins, n: nonpositive + sum(counts), nonpositive };
  }

  function barsPath(p, bins, density) {
    let d = "";
    for (const b of bins) {
      if (!(b.c > 0)) continue;
      const x0 = p.x(b.x0).toFixed(1);
      const x1 = p.x(b.x1).toFixed(1);
      const top = Math.min(p.bottom, Math.max(p.top - 2, p.y(density(b)))).toFixed(1);
      d += `M${x0} ${p.bottom}V${top}H${x1}V${p.bottom}Z`;
    }
    return d;
  }

  function geomspace(lo, hi, count) {
    return Array.from({ length: count }, (_, k) => lo * (hi / lo) ** (k / (count - 1)));
  }

  /**
   * The fitted Marchenko-Pastur law as density per ln(lambda), in original eigenvalue
   * units: [lambda, lambda * p(lambda)]. The fit rescales eigenvalues by `scale` so their
   * mean is 1; there lambda' p'(lambda') = sqrt((b - x)(x - a)) / (2 pi sigma^2 / Q).
   */
  function mpCurve(sigma, Q, scale) {
    if (!(sigma > 0) || !(Q >= 1) || !(scale > 0)) return [];
    const y = 1 / Q;
    const a = (sigma * (1 - Math.sqrt(y))) ** 2;
    const b = (sigma * (1 + Math.sqrt(y))) ** 2;
    const xs = geomspace(Math.max(a, b * 1e-6), b, 240);
    return xs.map((x) => [
      x / scale, Math.sqrt(Math.max(0, (b - x) * (x - a))) / (2 * Math.PI * sigma * sigma * y),
    ]);
  }

  // ------------------------------------------------------------ summary cards

  function card(parent, label, value, sub, bad) {
    const box = el("div", bad ? "card bad" : "card");
    box.appendChild(el("div", "label", label));
    box.appendChild(el("div", "value", value));
    if (sub) box.appendChild(el("div", "sub", sub));
    parent.appendChild(box);
    return box;
  }

  function meanAlpha() {
    const alphas = R.alpha.filter((a) => a !== null);
    return { mean: alphas.length ? sum(alphas) / alphas.length : null, count: alphas.length };
  }

  function renderHeader() {
    const meta = DATA.meta;
    const s = DATA.summary;
    $("title").textContent = `llm-audit report: ${meta.model}`;
    $("subtitle").textContent = `${meta.report} \u00b7 status ${meta.status} \u00b7 finished ${meta.finished || "?"}`;
    const cards = $("cards");
    const alpha = meanAlpha();
    const warnings = Object.entries(s.warnings || {});
    card(cards, "matrices", fmt(s.matrices_in_report ?? N_ROWS),
      `audited ${fmt(s.audited)}, skipped ${fmt(s.skipped)}`);
    card(cards, "correlation traps", fmt(s.total_traps),
      `in ${fmt(s.matrices_with_traps)} matrices`, s.total_traps > 0);
    card(cards, "mean \u03b1", fmt(alpha.mean, 3), `over ${alpha.count} matrices`);
    card(cards, "warnings", fmt(sum(warnings.map(([, v]) => v))),
      warnings.map(([k, v]) => `${k}: ${v}`).join(", ") || "none");
    card(cards, "failed", fmt(s.failed), "status = error", s.failed > 0);
    card(cards, "model", meta.model, `status ${meta.status}`);
    card(cards, "llm-audit", meta.tool_version, `page: ${meta.rendered_by}`);
    card(cards, "seed", fmt(meta.seed), "fixes every shuffle");
  }

  // -------------------------------------------------------- alpha by depth

  function renderAlphaByDepth() {
    const fig = $("alpha-depth");
    const byKind = new Map(); // kind -> Map(layer -> [alpha])
    let lo = Infinity;
    let hi = -Infinity;
    let aMax = 0;
    let noLayer = 0;
    for (let i = 0; i < N_ROWS; i++) {
      const layer = R.layer[i];
      const a = R.alpha[i];
      if (a === null) continue;
      if (layer === null) {
        noLayer++;
        continue;
      }
      if (!byKind.has(R.kind[i])) byKind.set(R.kind[i], new Map());
      const layers = byKind.get(R.kind[i]);
      if (!layers.has(layer)) layers.set(layer, []);
      layers.get(layer).push(a);
      lo = Math.min(lo, layer);
      hi = Math.max(hi, layer);
      aMax = Math.max(aMax, a);
    }
    if (!byKind.size) {
      fig.appendChild(el("p", "muted", "No matrix here has both a layer number and an alpha."));
      return;
    }
    const kinds = [...byKind.keys()].sort();
    const xTicks = linearTicks(lo - 0.5, hi + 0.5, 12).filter(Number.isInteger);
    const p = plot(fig, {
      width: 640, height: 300, title: "alpha by layer",
      x: { domain: [lo - 0.5, hi + 0.5], label: "layer", ticks: xTicks },
      y: { domain: [0, Math.max(7, aMax * 1.05)], label: "\u03b1" },
    });
    for (const ref of DATA.alpha_limits) {
      svgEl("line", { class: "ref", x1: p.left, x2: p.right, y1: p.y(ref), y2: p.y(ref) }, p.g);
    }
    const offset = Math.min(0.08, 0.6 / kinds.length);
    kinds.forEach((kind, k) => {
      const color = colorOf(k);
      const dx = (k - (kinds.length - 1) / 2) * offset;
      const layers = [...byKind.get(kind).entries()].sort((a, b) => a[0] - b[0]);
      const points = [];
      for (const [layer, alphas] of layers) {
        const mean = sum(alphas) / alphas.length;
        const px = p.x(layer + dx);
        points.push([px, p.y(mean)]);
        if (alphas.length > 1) {
          svgEl("line", {
            class: "range", stroke: color, x1: px, x2: px,
            y1: p.y(Math.min(...alphas)), y2: p.y(Math.max(...alphas)),
          }, p.g);
        }
        const dot = svgEl("circle", { cx: px, cy: p.y(mean), r: 3, fill: color }, p.g);
        svgTitle(dot, `${kind}, layer ${layer}: mean \u03b1 ${fmt(mean)} over ${alphas.length} ` +
          `(min ${fmt(Math.min(...alphas))}, max ${fmt(Math.max(...alphas))})`);
      }
      svgEl("path", { class: "series", stroke: color, d: linePath(points) }, p.g);
    });
    const legend = el("div", "legend");
    const means = DATA.summary.mean_alpha_by_kind || {};
    kinds.forEach((kind, k) => {
      const item = el("span");
      const swatch = el("span", "swatch");
      swatch.style.background = colorOf(k);
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(`${kind} (mean \u03b1 ${fmt(means[kind] ?? null, 3)})`));
      legend.appendChild(item);
    });
    fig.appendChild(legend);
    const [over, under] = DATA.alpha_limits;
    const note = `Dashed: \u03b1 = ${over} and ${under} (HTSR: below ${over} over-trained, above ${under} under-trained).`;
    fig.appendChild(el("p", "muted", noLayer
      ? `${note} ${noLayer} matrices without a layer number (embedding, lm_head, ...) are in the table only.`
      : note));
  }

  // ----------------------------------------------------- traps heatmap (MoE)

  function trapColor(count, max) {
    if (!(count > 0)) return "#e9edf2";
    const t = Math.sqrt(count / max);
    const mix = (a, b) => Math.round(a + (b - a) * t);
    return `rgb(${mix(253, 179)},${mix(212, 0)},${mix(158, 0)})`;
  }

  function renderHeatmap() {
    const experts = [];
    for (let i = 0; i < N_ROWS; i++) {
      if (R.expert[i] !== null && R.layer[i] !== null) experts.push(i);
    }
    if (!experts.length) return;
    const fig = $("heatmap");
    fig.hidden = false;
    const select = $("heatmap-kind");
    const kinds = [...new Set(experts.map((i) => R.kind[i]))].sort();
    select.appendChild(new Option("all expert kinds (sum)", ""));
    for (const kind of kinds) select.appendChild(new Option(kind, kind));
    const holder = el("div");
    fig.appendChild(holder);
    fig.appendChild(el("p", "muted", "Click a cell to open its matrix with the most traps."));
    const draw = () => {
      const kind = select.value;
      const cells = new Map(); // "layer,expert" -> {traps, members}
      let maxExpert = 0;
      for (const i of experts) {
        if (kind && R.kind[i] !== kind) continue;
        const key = `${R.layer[i]},${R.expert[i]}`;
        if (!cells.has(key)) cells.set(key, { layer: R.layer[i], expert: R.expert[i], traps: 0, members: [] });
        const cell = cells.get(key);
        cell.traps += R.traps[i];
        cell.members.push(i);
        maxExpert = Math.max(maxExpert, R.expert[i]);
      }
      const layers = [...new Set([...cells.values()].map((c) => c.layer))].sort((a, b) => a - b);
      const row = new Map(layers.map((layer, k) => [layer, k]));
      const E = maxExpert + 1;
      const cw = Math.max(4, Math.min(32, Math.floor(860 / E)));
      const ch = Math.max(5, Math.min(28, Math.floor(320 / layers.length)));
      const left = 58;
      const top = 24;
      const W = left + E * cw + 12;
      const H = top + layers.length * ch + 34;
      const max = Math.max(1, ...[...cells.values()].map((c) => c.traps));
      const svg = svgEl("svg", { class: "plot", viewBox: `0 0 ${W} ${H}`, width: W, height: H });
      svgTitle(svg, "correlation traps per layer and expert");
      const everyRow = Math.ceil(12 / ch);
      layers.forEach((layer, k) => {
        if (k % everyRow) return;
        const t = svgEl("text", { x: left - 6, y: top + k * ch + ch / 2, "text-anchor": "end", dy: "0.32em" }, svg);
        t.textContent = `layer ${layer}`;
      });
      const everyCol = Math.ceil(26 / cw);
      for (let e = 0; e < E; e += everyCol) {
        const t = svgEl("text", { x: left + e * cw + cw / 2, y: top - 6, "text-anchor": "middle" }, svg);
        t.textContent = String(e);
      }
      for (const cell of cells.values()) {
        const best = cell.members.reduce((a, b) => (R.traps[b] > R.traps[a] ? b : a));
        const rect = svgEl("rect", {
          class: "cell", x: left + cell.expert * cw, y: top + row.get(cell.layer) * ch,
          width: cw, height: ch, fill: trapColor(cell.traps, max), "data-open": best,
        }, svg);
        const parts = cell.members.map((i) => `${R.kind[i]} ${fmt(R.traps[i])}`).join(", ");
        svgTitle(rect, `layer ${cell.layer}, expert ${cell.expert}: ${cell.traps} traps (${parts})`);
      }
      const legendY = top + layers.length * ch + 12;
      const steps = 8;
      const t0 = svgEl("text", { x: left, y: legendY + 9 }, svg);
      t0.textContent = "0";
      for (let k = 0; k <= steps; k++) {
        svgEl("rect", {
          x: left + 14 + k * 14, y: legendY, width: 14, height: 10,
          fill: trapColor(k === 0 ? 0 : (max * k) / steps, max),
        }, svg);
      }
      const t1 = svgEl("text", { x: left + 14 + (steps + 1) * 14 + 4, y: legendY + 9 }, svg);
      t1.textContent = `${max} traps`;
      holder.replaceChildren(svg);
    };
    holder.addEventListener("click", (event) => {
      const target = event.target.closest("[data-open]");
      if (target) openDetail(Number(target.getAttribute("data-open")));
    });
    select.addEventListener("change", draw);
    draw();
  }

  // ------------------------------------------------------------------ table

  const COLUMNS = [
    { key: "matrix", label: "matrix", cls: "col-matrix" },
    { key: "kind", label: "kind", cls: "col-kind" },
    { key: "layer", label: "layer", num: true },
    { key: "expert", label: "expert", num: true },
    {
      key: "shape", label: "N\u00d7M", num: true, title: "Shape of W (N >= M).",
      value: (i) => (R.N[i] === null ? null : R.N[i] * 1e7 + R.M[i]),
      text: (i) => (R.N[i] === null ? "\u2013" : `${R.N[i]}\u00d7${R.M[i]}`),
    },
    { key: "alpha", label: "\u03b1", num: true },
    { key: "num_spikes", label: "spikes", num: true },
    {
      key: "traps", label: "traps", num: true,
      title: "Correlation traps per shuffle: rand_num_spikes (pooled over 5 shuffles below 100 eigenvalues) divided back, rounded up: the entries behind them, as llm-audit check counts them.",
    },
    { key: "trap_ratio", label: "trap ratio", num: true },
    { key: "max_abs_entry", label: "max |w|", num: true },
    { key: "entry_kurtosis", label: "kurtosis", num: true },
    { key: "warning", label: "warning" },
    { key: "status", label: "status" },
  ];
  if (CMP) {
    COLUMNS.push(
      { key: "alpha_base", label: "\u03b1 base", num: true, title: "alpha in the baseline report.",
        value: (i) => CMP.base.alpha[i] },
      { key: "d_alpha", label: "\u0394\u03b1", num: true, title: "alpha here minus alpha in the baseline.",
        value: (i) => CMP.delta.alpha[i] },
      { key: "traps_base", label: "traps base", num: true, title: "Traps in the baseline report.",
        value: (i) => CMP.base_traps[i] },
      { key: "new_traps", label: "new traps", num: true, title: "Traps here beyond the baseline's.",
        value: (i) => CMP.new_traps[i] },
    );
  }
  for (const col of COLUMNS) {
    col.value = col.value || ((i) => R[col.key][i]);
    col.text = col.text || ((i) => fmt(col.value(i)));
  }

  const HAYSTACK = R.matrix.map((m, i) => `${m} ${R.kind[i]}`.toLowerCase());
  const BASE_ORDER = CMP ? CMP.order : Array.from({ length: N_ROWS }, (_, i) => i);
  const table = { view: BASE_ORDER.slice(), sortKey: null, sortDesc: false, selected: -1 };

  function renderTableHead() {
    const head = $("table-head");
    for (const col of COLUMNS) {
      const th = el("th", col.cls ? `col-${col.key}` : "", col.label);
      th.setAttribute("title", `${col.title || DATA.columns[col.key] || col.key} Click to sort.`);
      th.setAttribute("data-key", col.key);
      th.setAttribute("aria-sort", "none");
      th.appendChild(el("span", "sort-mark", ""));
      head.appendChild(th);
    }
    head.addEventListener("click", (event) => {
      const th = event.target.closest("th");
      if (!th) return;
      const key = th.getAttribute("data-key");
      const col = COLUMNS.find((c) => c.key === key);
      table.sortDesc = table.sortKey === key ? !table.sortDesc : Boolean(col.num);
      table.sortKey = key;
      for (const other of head.children) {
        const active = other === th;
        other.setAttribute("aria-sort", active ? (table.sortDesc ? "descending" : "ascending") : "none");
        other.lastChild.textContent = active ? (table.sortDesc ? " \u25bc" : " \u25b2") : "";
      }
      applyFilter();
    });
  }

  function sortView() {
    if (table.sortKey === null) return;
    const col = COLUMNS.find((c) => c.key === table.sortKey);
    const sign = table.sortDesc ? -1 : 1;
    table.view.sort((a, b) => {
      const va = col.value(a);
      const vb = col.value(b);
      if (va === null || vb === null) return (va === null) - (vb === null); // nulls last
      return va < vb ? -sign : va > vb ? sign : 0; // stable: ties keep the base order
    });
  }

  function applyFilter() {
    const terms = $("filter").value.toLowerCase().split(/\s+/).filter(Boolean);
    const kind = $("kind-filter").value;
    const trapsOnly = $("traps-only").checked;
    const aMin = parseFloat($("alpha-min").value);
    const aMax = parseFloat($("alpha-max").value);
    table.view = BASE_ORDER.filter((i) => {
      if (kind && R.kind[i] !== kind) return false;
      if (trapsOnly && !(R.traps[i] > 0)) return false;
      const a = R.alpha[i];
      if (!Number.isNaN(aMin) && !(a !== null && a >= aMin)) return false;
      if (!Number.isNaN(aMax) && !(a !== null && a <= aMax)) return false;
      return terms.every((t) => HAYSTACK[i].includes(t));
    });
    sortView();
    $("table-scroll").scrollTop = 0;
    renderRows();
  }

  function spacer(height) {
    const tr = el("tr", "spacer");
    const td = el("td");
    td.colSpan = COLUMNS.length;
    td.style.height = `${height}px`;
    tr.appendChild(td);
    return tr;
  }

  function makeRow(i, k) {
    const tr = el("tr", `row${k % 2 ? " odd" : ""}${i === table.selected ? " selected" : ""}`);
    tr.setAttribute("data-index", i);
    tr.tabIndex = 0;
    for (const col of COLUMNS) {
      const td = el("td", col.num ? "num" : "", col.text(i));
      if (col.key === "matrix") td.setAttribute("title", R.matrix[i]);
      if ((col.key === "traps" && R.traps[i] > 0) ||
          (col.key === "new_traps" && CMP.new_traps[i] > 0)) {
        td.className += col.key === "new_traps" ? " gained" : " has-traps";
      }
      tr.appendChild(td);
    }
    return tr;
  }

  /** Only the rows in (or near) the visible window exist in the DOM. */
  function renderRows() {
    const scroller = $("table-scroll");
    const top = Math.max(0, scroller.scrollTop - $("table-head").offsetHeight);
    const view = table.view;
    const first = Math.max(0, Math.floor(top / ROW_H) - OVERSCAN);
    const last = Math.min(view.length, Math.ceil((top + scroller.clientHeight) / ROW_H) + OVERSCAN);
    const rows = document.createDocumentFragment();
    if (first > 0) rows.appendChild(spacer(first * ROW_H));
    for (let k = first; k < last; k++) rows.appendChild(makeRow(view[k], k));
    if (last < view.length) rows.appendChild(spacer((view.length - last) * ROW_H));
    $("table-body").replaceChildren(rows);
    $("row-count").textContent = `${view.length} of ${N_ROWS} matrices`;
  }

  function setUpTable() {
    renderTableHead();
    const kinds = [...new Set(R.kind)].filter((k) => k !== null).sort();
    for (const kind of kinds) $("kind-filter").appendChild(new Option(kind, kind));
    for (const id of ["filter", "kind-filter", "traps-only", "alpha-min", "alpha-max"]) {
      $(id).addEventListener("input", applyFilter);
    }
    let pending = false;
    $("table-scroll").addEventListener("scroll", () => {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => {
        pending = false;
        renderRows();
      });
    });
    const body = $("table-body");
    body.addEventListener("click", (event) => {
      const tr = event.target.closest("tr.row");
      if (tr) openDetail(Number(tr.getAttribute("data-index")));
    });
    body.addEventListener("keydown", (event) => {
      const tr = event.target.closest("tr.row");
      if (tr && event.key === "Enter") openDetail(Number(tr.getAttribute("data-index")));
    });
    sortView();
    renderRows();
  }

  // ------------------------------------------------------------ drill-down

  const PLOT_W = 800;
  const PLOT_H = 270;

  function section(parent, title, note) {
    parent.appendChild(el("h3", "", title));
    const holder = el("div");
    parent.appendChild(holder);
    if (note) parent.appendChild(el("p", "note", note));
    return holder;
  }

  function drawPowerLaw(parent, i, s) {
    const holder = section(parent, "ESD (log-log) and its power-law fit");
    if (!s.e || s.e[0] === null) {
      holder.appendChild(el("p", "note", "No positive eigenvalues stored for this matrix."));
      return;
    }
    const { bins, n, nonpositive } = histBins(s.e);
    const density = (b) => b.c / (n * (b.x1 - b.x0));
    const alpha = R.alpha[i];
    const xmin = R.xmin[i];
    const tail = R.num_pl_spikes[i];
    const lmax = R.lambda_max[i] ?? s.e[1];
    const fitted = alpha !== null && alpha > 1 && xmin > 0 && tail > 0;
    // the tail holds tail/n of all eigenvalues, with density (alpha-1)/xmin (x/xmin)^-alpha
    const fit = (x) => (tail / n) * ((alpha - 1) / xmin) * (x / xmin) ** -alpha;
    const values = bins.filter((b) => b.c > 0).map(density);
    if (fitted) values.push(fit(xmin));
    const p = plot(holder, {
      width: PLOT_W, height: PLOT_H, title: "ESD with power-law fit",
      x: { domain: [Math.min(s.e[0], xmin || Infinity) / 1.2, Math.max(s.e[1], lmax) * 1.2], log: true, label: "eigenvalue \u03bb of W\u1d40W" },
      y: { domain: [Math.min(...values) / 3, Math.max(...values) * 3], log: true, label: "density" },
    });
    svgEl("path", { class: "bars", d: barsPath(p, bins, density) }, p.g);
    for (const v of (s.te || []).filter((v) => !(xmin > 0) || v >= xmin)) {
      const px = p.x(v).toFixed(1);
      svgEl("line", { class: "rug", x1: px, x2: px, y1: p.bottom - 8, y2: p.bottom }, p.g);
    }
    if (fitted) {
      const xs = geomspace(xmin, Math.max(lmax, xmin * 1.01), 80);
      const line = svgEl("path", { class: "pl-fit", d: linePath(xs.map((x) => [p.x(x), p.y(fit(x))])) }, p.g);
      svgTitle(line, `power law: alpha ${fmt(alpha)}, xmin ${fmt(xmin)}`);
      vline(p, xmin, "xmin", "xmin");
    }
    parent.appendChild(el("p", "note",
      `\u03b1 = ${fmt(alpha)} \u00b1 ${fmt(R.sigma[i])}, xmin = ${fmt(xmin)}, KS distance D = ${fmt(R.D[i])}; ` +
      `tail: ${fmt(tail)} of ${n} eigenvalues (ticks: the ${fmt(DATA.caps.top)} largest at most)` +
      `${R.warning[i] ? `; ${R.warning[i]}` : ""}` +
      `${nonpositive ? `; ${nonpositive} eigenvalues \u2264 0 not drawn` : ""}.`));
  }

  function drawMP(parent, title, hist, opts) {
    const holder = section(parent, title);
    if (!hist || hist[0] === null) {
      holder.appendChild(el("p", "note", opts.missing));
      return null;
    }
    const { bins, n } = histBins(hist);
    const norm = opts.normalizer || n;
    const density = (b) => b.c / (norm * Math.log(b.x1 / b.x0));
    const curve = mpCurve(opts.sigma, opts.Q, opts.scale);
    const top = Math.max(...bins.map(density), ...curve.map((c) => c[1]));
    const p = plot(holder, {
      width: PLOT_W, height: PLOT_H, title,
      x: { domain: opts.xDomain, log: true, label: "eigenvalue \u03bb" },
      y: { domain: [0, top * 1.15], label: "density per ln \u03bb" },
    });
    svgEl("path", { class: "bars", d: barsPath(p, bins, density) }, p.g);
    if (curve.length) {
      const line = svgEl("path", { class: "mp-fit", d: linePath(curve.map(([x, y]) => [p.x(x), p.y(y)])) }, p.g);
      svgTitle(line, `Marchenko-Pastur fit, sigma_mp ${fmt(opts.sigma)}`);
    }
    return p;
  }

  function markers(p, values, cls, label) {
    values.forEach((v, k) => {
      const px = p.x(v);
      if (cls === "trap") {
        svgEl("line", { class: "trap-line", x1: px, x2: px, y1: p.top, y2: p.bottom }, p.g);
      }
      const dot = svgEl("circle", { class: cls, cx: px, cy: p.bottom - 6 - (k % 3) * 7, r: 4 }, p.g);
      svgTitle(dot, `${label} ${k + 1}: \u03bb = ${fmt(v, 6)}`);
    });
  }

  function mpDomain(i, s) {
    const lows = [s.e && s.e[0], s.r && s.r[0], R.bulk_min[i]].filter((v) => v > 0);
    const highs = [s.e && s.e[1], s.r && s.r[1], R.bulk_max[i], R.rand_bulk_max[i], ...(s.traps || [])]
      .filter((v) => v > 0);
    return [Math.min(...lows) / 1.2, Math.max(...highs) * 1.2];
  }

  function drawSpectra(parent, i, s) {
    drawPowerLaw(parent, i, s);
    const xDomain = mpDomain(i, s);
    const scale = R.num_evals[i] / R.norm[i]; // the MP fit's rescaling: mean eigenvalue 1
    const spikes = Math.min(R.num_spikes[i] || 0, (s.te || []).length);
    const mp = drawMP(parent, "ESD and its Marchenko-Pastur fit", s.e, {
      sigma: R.sigma_mp[i], Q: R.Q[i], scale, xDomain, missing: "No eigenvalues stored.",
    });
    if (mp) {
      vline(mp, R.bulk_min[i], "edge", "\u03bb\u208b");
      vline(mp, R.bulk_max[i], "edge", "bulk edge \u03bb\u208a");
      markers(mp, (s.te || []).slice(0, spikes), "spike", "spike");
      parent.appendChild(el("p", "note",
        `\u03c3_mp = ${fmt(R.sigma_mp[i])} (eigenvalues rescaled to mean 1), Q = ${fmt(R.Q[i])}; ` +
        `bulk [${fmt(R.bulk_min[i])}, ${fmt(R.bulk_max[i])}]; num_spikes = ${fmt(R.num_spikes[i])} ` +
        `above the edge plus the Tracy-Widom allowance (orange); mp_softrank = ${fmt(R.mp_softrank[i])}.`));
    }
    const topk = R.rand_route[i] === "topk";
    const rand = drawMP(parent, "Shuffled ESD: correlation traps", s.r, {
      sigma: R.rand_sigma_mp[i], Q: R.Q[i], scale, xDomain,
      normalizer: topk ? R.num_evals[i] : null,
      missing: "No shuffled spectrum in this report (audited without randomization?).",
    });
    if (rand) {
      vline(rand, R.rand_bulk_max[i], "edge", "bulk edge");
      markers(rand, s.traps || [], "trap", "trap");
      const shown = (s.traps || []).length;
      const traps = R.rand_num_spikes[i];
      parent.appendChild(el("p", "note",
        `rand_num_spikes = ${fmt(traps)} trap(s) (red) above rand_bulk_max = ${fmt(R.rand_bulk_max[i])} ` +
        `plus the Tracy-Widom allowance; max_rand_eval = ${fmt(R.max_rand_eval[i])}, ` +
        `rand_distance = ${fmt(R.rand_distance[i])}` +
        `${traps > shown ? `; the ${shown} largest are drawn` : ""}` +
        `${topk ? "; top-k route: only the largest shuffled eigenvalues were computed" : ""}.`));
    }
  }

  function drawTrapEntries(parent, i, s) {
    const entries = s.entries || [];
    if (!entries.length) return;
    section(parent, "Entries behind the traps");
    const t = el("table", "small-table trap-entries");
    const head = el("tr");
    for (const h of ["#", "row", "col", "value"]) head.appendChild(el("th", "", h));
    t.appendChild(head);
    entries.forEach(([r, c, v], k) => {
      const tr = el("tr");
      tr.appendChild(el("td", "num", k + 1));
      tr.appendChild(el("td", "num", r));
      tr.appendChild(el("td", "num", c));
      tr.appendChild(el("td", "num", fmt(v, 6)));
      t.appendChild(tr);
    });
    parent.appendChild(t);
    const more = (R.rand_num_spikes[i] || 0) - entries.length;
    parent.appendChild(el("p", "note",
      "The largest-|w| entries of W (row, col in W's own layout), one per trap: large isolated " +
      `entries are what survive shuffling.${more > 0 ? ` ${more} more not stored.` : ""}`));
  }

  function drawComparison(parent, i) {
    if (!CMP) return;
    section(parent, `Compared with ${CMP.label}`);
    const t = el("table", "small-table");
    const head = el("tr");
    for (const h of ["column", "base", "here", "change"]) head.appendChild(el("th", "", h));
    t.appendChild(head);
    for (const col of Object.keys(CMP.base)) {
      const tr = el("tr");
      tr.appendChild(el("td", "", col));
      tr.appendChild(el("td", "num", fmt(CMP.base[col][i])));
      tr.appendChild(el("td", "num", fmt(R[col][i])));
      tr.appendChild(el("td", "num", fmt(CMP.delta[col][i])));
      t.appendChild(tr);
    }
    parent.appendChild(t);
  }

  function fact(parent, key, value) {
    const item = el("div");
    item.appendChild(el("span", "k", key));
    item.appendChild(document.createTextNode(value));
    item.setAttribute("title", `${key}: ${value}`);
    parent.appendChild(item);
  }

  function openDetail(i) {
    const started = performance.now();
    table.selected = i;
    renderRows();
    const panel = $("detail");
    panel.replaceChildren();
    const close = el("button", "close", "close (Esc)");
    close.type = "button";
    close.addEventListener("click", closeDetail);
    panel.appendChild(close);
    panel.appendChild(el("h2", "detail-name", R.matrix[i]));
    const facts = el("div", "facts");
    fact(facts, "kind", fmt(R.kind[i]));
    fact(facts, "layer", fmt(R.layer[i]));
    fact(facts, "expert", fmt(R.expert[i]));
    fact(facts, "shape", R.N[i] === null ? "\u2013" : `${R.N[i]} \u00d7 ${R.M[i]} (Q ${fmt(R.Q[i])})`);
    fact(facts, "dtype", fmt(R.source_dtype[i]));
    fact(facts, "status", fmt(R.status[i]));
    fact(facts, "\u03b1", fmt(R.alpha[i]));
    fact(facts, "traps", fmt(R.rand_num_spikes[i]));
    fact(facts, "trap ratio", fmt(R.trap_ratio[i]));
    fact(facts, "spikes", fmt(R.num_spikes[i]));
    fact(facts, "tensor", fmt(R.tensor[i]));
    panel.appendChild(facts);
    for (const text of [R.reason[i], R.error[i]]) {
      if (text) panel.appendChild(el("p", "note", text));
    }
    drawSpectra(panel, i, spectrum(i));
    drawTrapEntries(panel, i, spectrum(i));
    drawComparison(panel, i);
    const all = el("details");
    all.appendChild(el("summary", "", "All columns"));
    const grid = el("div", "facts");
    for (const key of Object.keys(R)) fact(grid, key, fmt(R[key][i], 6));
    all.appendChild(grid);
    panel.appendChild(all);
    panel.hidden = false;
    panel.scrollTop = 0;
    document.documentElement.dataset.detailMs = (performance.now() - started).toFixed(1);
  }

  function closeDetail() {
    $("detail").hidden = true;
  }

  // -------------------------------------------------------------- compare

  function renderCompare() {
    if (!CMP) return;
    $("compare").hidden = false;
    $("compare-title").textContent = `Changes from ${CMP.label} to this report`;
    const gained = CMP.new_traps;
    let lost = 0;
    for (let i = 0; i < N_ROWS; i++) {
      lost += Math.max(0, (CMP.base.rand_num_spikes[i] || 0) - (R.rand_num_spikes[i] || 0));
    }
    const dAlpha = CMP.delta.alpha.filter((d) => d !== null).map(Math.abs);
    const cards = $("compare-cards");
    card(cards, "new traps", fmt(sum(gained)), `in ${gained.filter((g) => g > 0).length} matrices`, sum(gained) > 0);
    card(cards, "traps gone", fmt(lost), "fewer than in the baseline");
    card(cards, "mean |\u0394\u03b1|", fmt(dAlpha.length ? sum(dAlpha) / dAlpha.length : null, 3),
      `max ${fmt(dAlpha.length ? Math.max(...dAlpha) : null, 3)}`);
    const top = CMP.order.slice(0, 15);
    const t = el("table", "small-table compare-top");
    const head = el("tr");
    for (const h of ["matrix", "kind", "traps base \u2192 here", "new traps", "\u03b1 base \u2192 here", "\u0394\u03b1"]) {
      head.appendChild(el("th", "", h));
    }
    t.appendChild(head);
    for (const i of top) {
      const tr = el("tr", "link");
      tr.appendChild(el("td", "", R.matrix[i]));
      tr.appendChild(el("td", "", R.kind[i]));
      tr.appendChild(el("td", "num", `${fmt(CMP.base.rand_num_spikes[i])} \u2192 ${fmt(R.rand_num_spikes[i])}`));
      tr.appendChild(el("td", gained[i] > 0 ? "num gained" : "num", fmt(gained[i])));
      tr.appendChild(el("td", "num", `${fmt(CMP.base.alpha[i])} \u2192 ${fmt(R.alpha[i])}`));
      tr.appendChild(el("td", "num", fmt(CMP.delta.alpha[i])));
      tr.addEventListener("click", () => openDetail(i));
      t.appendChild(tr);
    }
    const holder = $("compare-top");
    holder.appendChild(el("h3", "", "Largest changes (new traps first, then |\u0394\u03b1|); the table below has all"));
    holder.appendChild(t);
  }

  // ------------------------------------------------------------------ start

  renderHeader();
  renderCompare();
  renderAlphaByDepth();
  renderHeatmap();
  setUpTable();
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") closeDetail();
  });
  // for benchmarks and tests: when the table was in the DOM, and when first painted
  document.documentElement.dataset.tableBuiltMs = performance.now().toFixed(1);
  requestAnimationFrame(() => requestAnimationFrame(() => {
    document.documentElement.dataset.tablePaintedMs = performance.now().toFixed(1);
  }));
})();
