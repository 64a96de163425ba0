// Pieces every page uses: error boxes, the shared tooltip, toasts, cached catalog look-ups and the
// playground's picked latent edits (kept in sessionStorage, like the key: this tab only).

import { ApiError, api, describe } from "./api.js";
import { enc, h, replace } from "./dom.js";

export { enc };

/** A readable error in the page: the API's message, its type and status; never a stack trace. */
export function errorBox(err, what = "") {
  const title = err instanceof ApiError && err.isAuth ? "API key rejected" : what ? `Could not ${what}` : "Error";
  const message = err instanceof ApiError && err.isAuth ? err.message : describe(err);
  const meta = [];
  if (err instanceof ApiError) {
    if (err.type) meta.push(h("code", err.type));
    if (err.status) meta.push(h("span", { class: "muted" }, ` HTTP ${err.status}`));
  }
  const problems = err instanceof ApiError && err.body && err.body.error ? err.body.error.problems || err.body.error.errors : null;
  return h(
    "div",
    { class: "error", role: "alert" },
    h("strong", `${title}: `),
    h("span", { class: "error-message" }, message),
    meta.length ? h("span", { class: "error-meta" }, " (", meta, ")") : null,
    Array.isArray(problems) && problems.length > 1
      ? h("ul", problems.slice(0, 8).map((p) => h("li", [p.loc ? `${p.loc.join(".")}: ` : p.line ? `line ${p.line}: ` : "", p.message || JSON.stringify(p)])))
      : null,
  );
}

/** Render `err` into `slot` (an element), replacing what is there. */
export function showError(slot, err, what) {
  replace(slot, errorBox(err, what));
}

export function loading(text = "Loading…") {
  return h("p", { class: "muted loading", role: "status" }, text);
}

// ---------------------------------------------------------------- tooltip (one, shared)

const tip = () => document.getElementById("tooltip");

export function showTip(target, content) {
  const el = tip();
  if (!el) return;
  replace(el, content);
  el.hidden = false;
  const r = target.getBoundingClientRect();
  const w = el.offsetWidth;
  const hgt = el.offsetHeight;
  let left = r.left + r.width / 2 - w / 2 + window.scrollX;
  left = Math.max(window.scrollX + 6, Math.min(left, window.scrollX + document.documentElement.clientWidth - w - 6));
  let top = r.top + window.scrollY - hgt - 8;
  if (top < window.scrollY + 4) top = r.bottom + window.scrollY + 8;
  el.style.left = `${left}px`;
  el.style.top = `${top}px`;
}

export function hideTip() {
  const el = tip();
  if (el) el.hidden = true;
}

/** Hover and keyboard focus both show `content()` (a function: built when shown). */
export function withTip(target, content) {
  const show = () => showTip(target, content());
  target.addEventListener("mouseenter", show);
  target.addEventListener("focus", show);
  target.addEventListener("mouseleave", hideTip);
  target.addEventListener("blur", hideTip);
  return target;
}

// ---------------------------------------------------------------- toast

let toastTimer = null;
export function toast(content, ms = 4000) {
  const el = document.getElementById("toast");
  if (!el) return;
  replace(el, content);
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.hidden = true), ms);
}

// ---------------------------------------------------------------- cached catalog

const cache = new Map();

/** GET with a short-lived cache shared by pages (models, skills, datasets change rarely). */
export async function cached(path, ttlMs = 15000) {
  const hit = cache.get(path);
  if (hit && Date.now() - hit.at < ttlMs) return hit.value;
  const value = api.get(path);
  cache.set(path, { at: Date.now(), value });
  try {
    return await value;
  } catch (err) {
    cache.delete(path);
    throw err;
  }
}

export function invalidate(prefix = "") {
  for (const key of [...cache.keys()]) if (key.startsWith(prefix)) cache.delete(key);
}

export const models = async () => (await cached("/models")).models;
export const skills = async () => (await cached("/skills")).skills;
export const datasets = async () => (await cached("/datasets")).datasets;
export const skill = (name) => cached(`/skills/${enc(name)}`);

export function defaultModel(list) {
  return (list.find((m) => m.default) || list.find((m) => !m.error) || list[0] || {}).name || "";
}

/** Reasoning-feature latents of a skill at a layer (from the manifest metrics), as a Set. */
export function reasoningLatents(manifest, layer) {
  const m = ((manifest && manifest.metrics) || {})[String(layer)] || {};
  return new Set(Array.isArray(m.reasoning_latents) ? m.reasoning_latents : []);
}

export function skillLayers(manifest) {
  return ((manifest && manifest.layers) || []).map(Number);
}

// ---------------------------------------------------------------- playground edits

const EDITS_STORE = "resa.playground";

export function loadPlayground() {
  try {
    return JSON.parse(sessionStorage.getItem(EDITS_STORE)) || {};
  } catch {
    return {};
  }
}

export function savePlayground(state) {
  try {
    sessionStorage.setItem(EDITS_STORE, JSON.stringify(state));
  } catch {
    /* storage disabled */
  }
}

/** Add a latent edit from the explorer; edits belong to one steering skill + layer at a time. */
export function pickLatent(skillName, layer, latent, value) {
  const state = loadPlayground();
  const same = state.saeSkill === skillName && Number(state.layer) === Number(layer);
  const edits = same ? state.edits || [] : [];
  const existing = edits.find((e) => e.latent === latent);
  if (existing) existing.value = value;
  else edits.push({ latent, mode: "clamp", value });
  savePlayground({ ...state, saeSkill: skillName, layer, edits });
  return { replaced: !same && (state.edits || []).length > 0, count: edits.length };
}

/** A suggested steering value for a latent: twice its strongest activation seen (clamping well above its range). */
export function suggestValue(card) {
  const top = card && card.contexts && card.contexts.length ? card.contexts[0].activation : card ? card.max_activation || card.mean_activation : 0;
  const v = top ? Math.max(1, Math.round(top * 2 * 100) / 100) : 10;
  return v;
}
