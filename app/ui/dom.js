// DOM building without innerHTML: every node is created, so API text is never parsed as markup,
// and nothing here needs an inline style or handler (the page's CSP forbids both).

const SVG_NS = "http://www.w3.org/2000/svg";

function apply(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    else if (key === "text") el.textContent = value;
    else if (key === "on") for (const [ev, fn] of Object.entries(value)) el.addEventListener(ev, fn);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "style") for (const [prop, v] of Object.entries(value)) el.style.setProperty(prop, v); // CSSOM: allowed by CSP
    else if (key === "value" && "value" in el) el.value = value;
    else if (key === "checked" || key === "selected" || key === "disabled" || key === "hidden" || key === "required") el[key] = Boolean(value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** h("a", {href: "#/x", class: "link"}, "text", childNode, [more]) */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs && (attrs instanceof Node || typeof attrs !== "object" || Array.isArray(attrs))) children.unshift(attrs);
  else apply(el, attrs);
  append(el, children);
  return el;
}

/** An SVG element (attributes set as given; presentation attributes are not styles, so the CSP allows them). */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  apply(el, attrs);
  append(el, children);
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function replace(el, ...children) {
  clear(el);
  append(el, children);
  return el;
}

// ---------------------------------------------------------------- formatting

export function num(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return value.toExponential(2);
  return value.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

export function pct(value, digits = 1) {
  if (value === null || value === undefined) return "—";
  return `${(value * 100).toFixed(digits)}%`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString("en-GB", { dateStyle: "short", timeStyle: "medium" });
}

export function short(sha, n = 10) {
  return sha ? String(sha).slice(0, n) : "—";
}

/** Token text made visible: leading spaces as '·', newlines as '↵', tabs as '→' (shown dimmed by the caller's CSS). */
export function visibleToken(text) {
  if (text === "") return "∅";
  return text.replace(/\n/g, "↵").replace(/\t/g, "→").replace(/^ +| +$/g, (m) => "·".repeat(m.length));
}

/** Text with newlines shown as a '↵' marker followed by a real line break, as nodes. */
export function textWithBreaks(text) {
  const out = [];
  String(text).split("\n").forEach((part, i) => {
    if (i > 0) out.push(h("span", { class: "nl", "aria-hidden": "true" }, "↵"), document.createElement("br"));
    if (part) out.push(part);
  });
  return out;
}

export function enc(part) {
  return encodeURIComponent(part);
}

/** An <a> to a hash route. */
export function link(route, text, attrs = {}) {
  return h("a", { href: `#${route}`, ...attrs }, text);
}

export function badge(text, kind = "") {
  return h("span", { class: ["badge", kind && `badge-${kind}`] }, text);
}

/** A labelled form field: {label, input, hint} → <div class="field"><label for=id>…</label>input<small>hint</small></div> */
let fieldSeq = 0;
export function field(label, input, hint) {
  if (!input.id) input.id = `f${++fieldSeq}`;
  return h(
    "div",
    { class: "field" },
    h("label", { for: input.id }, label),
    input,
    hint ? h("small", { class: "hint", id: `${input.id}-hint` }, hint) : null,
  );
}

export function select(options, value, attrs = {}) {
  const el = h("select", attrs);
  for (const opt of options) {
    const [v, label] = Array.isArray(opt) ? opt : [opt, opt];
    el.append(h("option", { value: v, selected: String(v) === String(value) }, label));
  }
  return el;
}

export function table(headers, rows, attrs = {}) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      attrs,
      h("thead", h("tr", headers.map((c) => (c instanceof Node ? h("th", { scope: "col" }, c) : h("th", { scope: "col" }, c))))),
      h("tbody", rows),
    ),
  );
}

export function kv(pairs) {
  return h(
    "dl",
    { class: "kv" },
    pairs.filter(Boolean).map(([k, v]) => [h("dt", k), h("dd", v === null || v === undefined || v === "" ? "—" : v)]),
  );
}
