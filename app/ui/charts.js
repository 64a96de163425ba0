// Hand-written SVG charts: the per-layer report (small multiples of bars), histograms and a
// sparkline. Every bar is focusable and has a tooltip, so the values are reachable by keyboard.

import { withTip } from "./common.js";
import { h, num, s } from "./dom.js";

export const REPORT_METRICS = [
  { key: "fvu", label: "FVU", note: "lower is better", kind: "fvu" },
  { key: "loss_recovered", label: "Loss recovered", note: "higher is better", kind: "loss" },
  { key: "dead_fraction", label: "Dead fraction", note: "never active", kind: "dead", pct: true },
  { key: "reasoning_features", label: "Reasoning features", note: "fire on <think> tags only", kind: "reason" },
];

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function fmtValue(metric, v) {
  if (v === null || v === undefined) return "n/a";
  return metric.pct ? `${(v * 100).toFixed(1)}%` : num(v, 3);
}

/**
 * The layer report: one panel per metric, one bar per layer, the default layer marked.
 * rows: [{layer, fvu, loss_recovered, dead_fraction, reasoning_features}]; onSelect(layer) on click/Enter.
 */
export function layerReportChart(rows, { defaultLayer = null, selected = null, onSelect = null } = {}) {
  const wrap = h("div", { class: "report-chart", role: "group", "aria-label": "Per-layer report" });
  for (const metric of REPORT_METRICS) wrap.append(metricPanel(metric, rows, { defaultLayer, selected, onSelect }));
  return wrap;
}

function metricPanel(metric, rows, { defaultLayer, selected, onSelect }) {
  const W = 300;
  const H = 170;
  const pad = { l: 44, r: 8, t: 10, b: 28 };
  const values = rows.map((r) => r[metric.key]).filter((v) => v !== null && v !== undefined);
  const lo = Math.min(0, ...values);
  const hi = Math.max(0, ...values);
  const top = hi > 0 ? niceMax(hi) : lo < 0 ? 0 : metric.pct ? 1 : niceMax(1); // all zero: a 0..1 scale
  const bottom = lo < 0 ? -niceMax(-lo) : 0;
  const span = top - bottom || 1;
  const y = (v) => pad.t + ((top - v) / span) * (H - pad.t - pad.b);
  const band = (W - pad.l - pad.r) / Math.max(1, rows.length);
  const barW = Math.max(6, Math.min(48, band * 0.62));

  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": `${metric.label} per layer` });
  // axis: a few ticks
  const ticks = [bottom, bottom + span / 2, top];
  if (bottom < 0 && top > 0) ticks.splice(1, 1, 0);
  for (const t of ticks) {
    svg.append(s("line", { x1: pad.l, x2: W - pad.r, y1: y(t), y2: y(t), class: t === 0 ? "axis" : "gridline" }));
    svg.append(s("text", { x: pad.l - 5, y: y(t) + 3.5, class: "tick", "text-anchor": "end" }, metric.pct ? `${Math.round(t * 100)}%` : num(t, 2)));
  }
  rows.forEach((row, i) => {
    const v = row[metric.key];
    const cx = pad.l + band * i + band / 2;
    const isDefault = defaultLayer !== null && Number(row.layer) === Number(defaultLayer);
    const label = `Layer ${row.layer}${isDefault ? " (default)" : ""}: ${metric.label} ${fmtValue(metric, v)}`;
    const g = s("g", {
      class: ["bar", `bar-${metric.kind}`, isDefault && "is-default", Number(selected) === Number(row.layer) && "is-selected"],
      tabindex: "0",
      role: onSelect ? "button" : "img",
      "aria-label": label,
      "data-layer": row.layer,
      "data-metric": metric.key,
    });
    g.append(s("rect", { x: cx - band / 2, y: pad.t, width: band, height: H - pad.t - pad.b, class: "hit" })); // behind the bar
    if (v === null || v === undefined) {
      g.append(s("text", { x: cx, y: y(0) - 4, class: "na", "text-anchor": "middle" }, "n/a"));
    } else {
      const y0 = y(Math.max(0, v));
      const hgt = Math.max(1, Math.abs(y(v) - y(0)));
      g.append(s("rect", { x: cx - barW / 2, y: y0, width: barW, height: hgt, rx: 2, class: "fill" }));
      const above = v >= 0;
      const ty = above ? y0 - 4 : y(v) + 11;
      g.append(s("text", { x: cx, y: Math.max(pad.t + 9, Math.min(H - pad.b - 3, ty)), class: "value", "text-anchor": "middle" }, fmtValue(metric, v)));
    }
    g.append(s("text", { x: cx, y: H - 10, class: "xlabel", "text-anchor": "middle" }, `L${row.layer}${isDefault ? "★" : ""}`));
    withTip(g, () => h("div", h("strong", `Layer ${row.layer}`), isDefault ? " · default" : "", h("br"), `${metric.label}: ${fmtValue(metric, v)}`));
    if (onSelect) {
      g.addEventListener("click", () => onSelect(row.layer));
      g.addEventListener("keydown", (ev) => {
        if (ev.key === "Enter" || ev.key === " ") {
          ev.preventDefault();
          onSelect(row.layer);
        }
      });
    }
    svg.append(g);
  });
  return h("figure", { class: "panel-chart" }, h("figcaption", h("strong", metric.label), h("span", { class: "muted" }, ` ${metric.note}`)), svg);
}

/**
 * A histogram. bins: [{lo, hi, count}]; marker: {value, label} draws a line at `value` (same units
 * as the bins); xfmt formats bin edges; title for the aria label.
 */
export function histogram(bins, { marker = null, xfmt = (v) => num(v, 2), title = "Histogram", xLabel = "", yLabel = "count", highlight = null } = {}) {
  const W = 420;
  const H = 180;
  const pad = { l: 40, r: 10, t: 12, b: 34 };
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart histogram", role: "img", "aria-label": title });
  if (!bins.length) {
    svg.append(s("text", { x: W / 2, y: H / 2, class: "na", "text-anchor": "middle" }, "no data"));
    return svg;
  }
  const lo = bins[0].lo;
  const hi = bins[bins.length - 1].hi;
  const maxCount = niceMax(Math.max(1, ...bins.map((b) => b.count)));
  const x = (v) => pad.l + ((v - lo) / (hi - lo || 1)) * (W - pad.l - pad.r);
  const y = (c) => pad.t + (1 - c / maxCount) * (H - pad.t - pad.b);
  for (const t of [0, maxCount / 2, maxCount]) {
    svg.append(s("line", { x1: pad.l, x2: W - pad.r, y1: y(t), y2: y(t), class: t === 0 ? "axis" : "gridline" }));
    svg.append(s("text", { x: pad.l - 5, y: y(t) + 3.5, class: "tick", "text-anchor": "end" }, num(t, 1)));
  }
  bins.forEach((b, i) => {
    const isHi = highlight !== null && highlight(b, i);
    const g = s("g", { class: ["hbar", isHi && "is-marked"], tabindex: "0", role: "img", "aria-label": `${xfmt(b.lo)} to ${xfmt(b.hi)}: ${b.count}` });
    const x0 = x(b.lo) + 0.5;
    const w = Math.max(1, x(b.hi) - x(b.lo) - 1);
    g.append(s("rect", { x: x0, y: y(b.count), width: w, height: Math.max(0, y(0) - y(b.count)), class: "fill" }));
    g.append(s("rect", { x: x0, y: pad.t, width: w, height: H - pad.t - pad.b, class: "hit" }));
    withTip(g, () => h("div", `${xfmt(b.lo)} – ${xfmt(b.hi)}`, h("br"), h("strong", `${b.count} ${yLabel}`)));
    svg.append(g);
  });
  const step = Math.max(1, Math.ceil(bins.length / 6));
  for (let i = 0; i <= bins.length; i += step) {
    const v = i < bins.length ? bins[i].lo : hi;
    svg.append(s("text", { x: x(v), y: H - pad.b + 13, class: "tick", "text-anchor": "middle" }, xfmt(v)));
  }
  if (xLabel) svg.append(s("text", { x: (pad.l + W - pad.r) / 2, y: H - 3, class: "axis-label", "text-anchor": "middle" }, xLabel));
  if (marker && Number.isFinite(marker.value)) {
    const mx = Math.max(pad.l, Math.min(W - pad.r, x(marker.value)));
    svg.append(s("line", { x1: mx, x2: mx, y1: pad.t - 4, y2: H - pad.b, class: "marker" }));
    svg.append(s("text", { x: mx + (mx > W * 0.7 ? -4 : 4), y: pad.t + 6, class: "marker-label", "text-anchor": mx > W * 0.7 ? "end" : "start" }, marker.label));
  }
  return svg;
}

/** Equal-width bins over `values` (or [lo, hi]). */
export function binValues(values, n = 12, lo = null, hi = null) {
  if (!values.length) return [];
  lo = lo ?? Math.min(...values);
  hi = hi ?? Math.max(...values);
  if (hi === lo) {
    hi = lo + (Math.abs(lo) || 1) * 0.5;
    lo = lo - (Math.abs(lo) || 1) * 0.5;
  }
  const width = (hi - lo) / n;
  const bins = Array.from({ length: n }, (_, i) => ({ lo: lo + i * width, hi: lo + (i + 1) * width, count: 0 }));
  for (const v of values) bins[Math.min(n - 1, Math.max(0, Math.floor((v - lo) / width)))].count += 1;
  return bins;
}

/** Server-given bins {edges:[...], counts:[...]} → [{lo, hi, count}]. */
export function binsFromEdges(edges, counts) {
  return counts.map((count, i) => ({ lo: edges[i], hi: edges[i + 1], count }));
}

/** A small line chart of a series (e.g. a job's loss). */
export function sparkline(values, { title = "trend" } = {}) {
  const W = 260;
  const H = 56;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart sparkline", role: "img", "aria-label": title });
  if (values.length < 2) return svg;
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  const x = (i) => 4 + (i / (values.length - 1)) * (W - 8);
  const y = (v) => 4 + (1 - (v - lo) / (hi - lo || 1)) * (H - 8);
  svg.append(s("polyline", { points: values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" "), class: "line" }));
  svg.append(s("circle", { cx: x(values.length - 1), cy: y(values[values.length - 1]), r: 2.5, class: "dot" }));
  return svg;
}
