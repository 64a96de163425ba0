// Browsing a layer's latents: the listing client (GET /skills/{name}/latents, with a fallback that
// reads cards one by one where the server has no listing route yet) and the browser widget.

import { ApiError, api, qs } from "./api.js";
import { binValues, binsFromEdges, histogram } from "./charts.js";
import { enc, errorBox, pickLatent, reasoningLatents, suggestValue, toast } from "./common.js";
import { badge, h, link, num, pct, replace, select, visibleToken } from "./dom.js";

export const PAGE = 25;
/** Fallback only: at most this many cards are read one by one to search or sort a layer. */
export const FALLBACK_SCAN_MAX = 512;
const CONCURRENCY = 6;

const cards = new Map(); // `${skill}|${layer}` → Map(index → card), fallback cache
const noListing = new Set(); // skills whose server answered "no route" for the listing

function cacheFor(skill, layer) {
  const key = `${skill}|${layer}`;
  if (!cards.has(key)) cards.set(key, new Map());
  return cards.get(key);
}

export function cardPath(skill, index, layer) {
  return `/skills/${enc(skill)}/latents/${index}${qs({ layer })}`;
}

export function cardRoute(skill, index, layer) {
  return `/skills/${enc(skill)}/latents/${index}${qs({ layer })}`;
}

/** One card (GET /skills/{name}/latents/{i}), remembered for the fallback listing. */
export async function getCard(skill, layer, index, signal) {
  const cache = cacheFor(skill, layer);
  if (cache.has(index)) return cache.get(index);
  const card = await api.get(cardPath(skill, index, layer), { signal });
  cache.set(index, card);
  return card;
}

/** The summary the listing endpoint returns, built from a full card. */
export function summarize(card, reasoning) {
  const tokens = [];
  for (const c of card.contexts || []) if (!tokens.includes(c.token)) tokens.push(c.token);
  return {
    index: card.index,
    density: card.density,
    mean_activation: card.mean_activation,
    max_activation: card.contexts && card.contexts.length ? card.contexts[0].activation : 0,
    top_tokens: tokens.slice(0, 5),
    reasoning: reasoning.has(card.index),
  };
}

function matches(card, q) {
  const needle = q.toLowerCase();
  return (card.contexts || []).some((c) => `${c.before}${c.token}${c.after}`.toLowerCase().includes(needle) || c.token.toLowerCase().trim() === needle.trim());
}

async function fetchMany(skill, layer, indices, signal, onProgress) {
  const queue = [...indices];
  let done = 0;
  const worker = async () => {
    while (queue.length) {
      if (signal && signal.aborted) return;
      const i = queue.shift();
      await getCard(skill, layer, i, signal);
      done += 1;
      if (onProgress && (done % 8 === 0 || done === indices.length)) onProgress(done, indices.length);
    }
  };
  await Promise.all(Array.from({ length: CONCURRENCY }, worker));
}

/** log10-density histogram of a layer's live latents; `dead` counted apart. */
export function densityHistogram(densities) {
  const live = densities.filter((d) => d > 0).map((d) => Math.log10(d));
  const dead = densities.length - live.length;
  if (!live.length) return { bins: [], dead };
  const lo = Math.floor(Math.min(...live) * 4) / 4;
  const hi = Math.max(lo + 0.25, Math.ceil(Math.max(...live) * 4) / 4);
  return { bins: binValues(live, Math.max(4, Math.min(16, Math.round((hi - lo) / 0.25))), lo, hi), dead };
}

/**
 * A page of a layer's latent summaries: {latents, total, offset, limit, num_latents, num_tokens,
 * density_histogram: {bins, dead} | null, source: "server" | "cards", scanned}. q: a token or word in
 * the top contexts ("#12" or "12" jumps to that index); sort: density | index.
 */
export async function listLatents(skill, { layer, sort = "density", q = "", offset = 0, limit = PAGE, numLatents, reasoning = new Set(), signal, onProgress, scanMax = FALLBACK_SCAN_MAX } = {}) {
  q = (q || "").trim();
  const jump = q.match(/^#?(\d+)$/);
  if (jump) {
    const index = Number(jump[1]);
    const card = await getCard(skill, layer, index, signal);
    return { latents: [summarize(card, reasoning)], total: 1, offset: 0, limit, num_latents: card.num_latents, num_tokens: card.num_tokens, density_histogram: null, source: "cards", scanned: null };
  }
  if (!noListing.has(skill)) {
    try {
      const [key, order] = sort === "density-asc" ? ["density", "asc"] : sort === "index" ? ["index", "asc"] : ["density", "desc"];
      const res = await api.get(`/skills/${enc(skill)}/latents${qs({ layer, sort: key, order, q, offset, limit })}`, { signal });
      const hist = res.density_histogram;
      return {
        ...res,
        latents: res.latents.map((l) => ({ ...l, reasoning: l.reasoning ?? reasoning.has(l.index) })),
        density_histogram: hist && hist.edges ? { bins: binsFromEdges(hist.edges, hist.counts), dead: hist.dead || 0 } : null,
        source: "server",
        scanned: null,
      };
    } catch (err) {
      if (!(err instanceof ApiError && err.isMissingRoute)) throw err;
      noListing.add(skill);
    }
  }
  // Fallback: read cards one by one (GET /skills/{name}/latents/{i}).
  const n = numLatents || (await getCard(skill, layer, 0, signal)).num_latents;
  const cache = cacheFor(skill, layer);
  if (!q && sort === "index") {
    const indices = [];
    for (let i = offset; i < Math.min(n, offset + limit); i++) indices.push(i);
    await fetchMany(skill, layer, indices, signal, onProgress);
    const page = indices.map((i) => summarize(cache.get(i), reasoning));
    const first = cache.get(indices[0]) || {};
    return { latents: page, total: n, offset, limit, num_latents: n, num_tokens: first.num_tokens, density_histogram: null, source: "cards", scanned: null };
  }
  const scanned = Math.min(n, scanMax);
  await fetchMany(skill, layer, Array.from({ length: scanned }, (_, i) => i), signal, onProgress);
  let all = Array.from({ length: scanned }, (_, i) => cache.get(i)).filter(Boolean);
  const hist = densityHistogram(all.map((c) => c.density));
  if (q) all = all.filter((c) => matches(c, q));
  all.sort(sort === "index" ? (a, b) => a.index - b.index : sort === "density-asc" ? (a, b) => a.density - b.density || a.index - b.index : (a, b) => b.density - a.density || a.index - b.index);
  return {
    latents: all.slice(offset, offset + limit).map((c) => summarize(c, reasoning)),
    total: all.length,
    offset,
    limit,
    num_latents: n,
    num_tokens: all.length ? all[0].num_tokens : null,
    density_histogram: hist,
    source: "cards",
    scanned,
  };
}

/** The whole layer's density histogram (server listing, or cards read one by one up to the scan cap). */
export async function layerDensity(skill, layer, numLatents, signal, onProgress, scanMax = 256) {
  const res = await listLatents(skill, { layer, sort: "density", limit: 1, numLatents, signal, onProgress, scanMax });
  return res.density_histogram ? { ...res.density_histogram, scanned: res.scanned, num_latents: res.num_latents } : null;
}

export function densityChart(hist, { marker = null, title = "Latent density across the layer" } = {}) {
  return histogram(hist.bins, {
    xfmt: (v) => {
      const p = 100 * 10 ** v; // log10(density) → percent of tokens
      return `${p >= 10 ? Math.round(p) : p >= 1 ? p.toFixed(1).replace(/\.0$/, "") : p.toPrecision(1)}%`;
    },
    xLabel: "density (log scale, live latents)",
    yLabel: "latents",
    title,
    marker: marker && marker.density > 0 ? { value: Math.log10(marker.density), label: marker.label } : null,
    highlight: marker && marker.density > 0 ? (b) => Math.log10(marker.density) >= b.lo && Math.log10(marker.density) < b.hi + 1e-12 : null,
  });
}

/** "Steer with this latent": add it to the playground's edits. */
export function steerButton(skill, layer, summaryOrCard, label = "") {
  return h(
    "button",
    {
      type: "button",
      class: label ? "secondary steer-button" : "small secondary steer-button",
      "aria-label": `Steer with latent ${summaryOrCard.index}`,
      on: {
        click: () => {
          const value = suggestValue(summaryOrCard);
          const { replaced, count } = pickLatent(skill, layer, summaryOrCard.index, value);
          toast(h("span", `Latent ${summaryOrCard.index} → playground (clamp ${value})${replaced ? ", replacing edits of another skill/layer" : ""}. ${count} edit${count === 1 ? "" : "s"}. `, link("/playground", "Open playground")));
        },
      },
    },
    label || "Steer",
  );
}

/**
 * The latent browser of one skill: layer, sort, search, pages. `state` = {layer, sort, q, page};
 * onState(state) is told of every change (the page keeps it in its URL).
 */
export function latentBrowser(skillInfo, state, onState) {
  const manifest = skillInfo.manifest || {};
  const name = skillInfo.name;
  const layers = (manifest.layers || []).map(Number);
  const numLatents = manifest.sae ? manifest.sae.num_latents : null;
  const root = h("section", { class: "panel latent-browser", "aria-labelledby": "lb-title" });
  const results = h("div", { class: "lb-results", "aria-live": "polite" });
  const hist = h("div", { class: "lb-hist" });
  let controller = null;

  const layerSel = select(layers.map((l) => [l, `layer ${l}${l === manifest.default_layer ? " (default)" : ""}`]), state.layer, { id: "lb-layer", name: "layer" });
  const sortSel = select([["density", "density, high → low"], ["density-asc", "density, low → high"], ["index", "index"]], state.sort, { id: "lb-sort", name: "sort" });
  const query = h("input", { id: "lb-q", name: "q", type: "search", value: state.q || "", placeholder: "token, word or #index", autocomplete: "off" });
  const form = h(
    "form",
    { class: "lb-controls", role: "search", "aria-label": "Search latents" },
    h("div", { class: "field" }, h("label", { for: "lb-layer" }, "Layer"), layerSel),
    h("div", { class: "field" }, h("label", { for: "lb-sort" }, "Sort by"), sortSel),
    h("div", { class: "field grow" }, h("label", { for: "lb-q" }, "Find in top contexts"), query),
    h("div", { class: "field" }, h("span", { class: "label-spacer", "aria-hidden": "true" }, " "), h("button", { type: "submit", id: "lb-search" }, "Search")),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    run({ ...state, layer: Number(layerSel.value), sort: sortSel.value, q: query.value.trim(), page: 0 });
  });
  layerSel.addEventListener("change", () => run({ ...state, layer: Number(layerSel.value), page: 0 }));
  sortSel.addEventListener("change", () => run({ ...state, sort: sortSel.value, page: 0 }));

  root.append(h("h2", { id: "lb-title" }, "Latents"), form, h("div", { class: "lb-body" }, results, hist));

  async function run(next) {
    state = next;
    onState(state);
    if (controller) controller.abort();
    controller = new AbortController();
    const signal = controller.signal;
    const progress = h("span", "Loading latents…");
    replace(results, h("p", { class: "muted loading", role: "status" }, progress));
    replace(hist);
    const reasoning = reasoningLatents(manifest, state.layer);
    try {
      const res = await listLatents(name, {
        layer: state.layer,
        sort: state.sort,
        q: state.q,
        offset: state.page * PAGE,
        limit: PAGE,
        numLatents,
        reasoning,
        signal,
        onProgress: (done, total) => (progress.textContent = `Reading latent cards ${done}/${total}…`),
      });
      if (signal.aborted) return;
      renderResults(res, reasoning);
      renderHist(res);
    } catch (err) {
      if (err.name === "AbortError") return;
      replace(results, errorBox(err, "list latents"));
      replace(hist);
    }
  }

  function renderResults(res, reasoning) {
    const rows = res.latents.map((l) =>
      h(
        "tr",
        { dataset: { latent: l.index } },
        h("td", link(cardRoute(name, l.index, state.layer), `#${l.index}`, { class: "latent-link", "aria-label": `Open latent ${l.index}` })),
        h("td", h("span", { class: "density-bar", style: { "--w": `${Math.min(100, Math.max(l.density > 0 ? 2 : 0, Math.sqrt(l.density) * 100))}%` } }), " ", pct(l.density, 2)),
        h("td", { class: "num" }, num(l.mean_activation, 2)),
        h("td", { class: "num" }, num(l.max_activation, 2)),
        h("td", { class: "tokens" }, l.top_tokens.length ? l.top_tokens.map((t) => h("code", { class: "tok-chip" }, visibleToken(t))) : h("span", { class: "muted" }, l.density > 0 ? "—" : "dead")),
        h("td", l.reasoning || reasoning.has(l.index) ? badge("reasoning", "reason") : ""),
        h("td", steerButton(name, state.layer, l)),
      ),
    );
    const from = res.total ? res.offset + 1 : 0;
    const to = res.offset + res.latents.length;
    const pager = h(
      "div",
      { class: "pager" },
      h("button", { type: "button", class: "secondary", disabled: state.page === 0, on: { click: () => run({ ...state, page: state.page - 1 }) } }, "← Previous"),
      h("span", { class: "muted" }, `${from}–${to} of ${num(res.total)}${state.q ? ` matching “${state.q}”` : ""}`),
      h("button", { type: "button", class: "secondary", disabled: to >= res.total, on: { click: () => run({ ...state, page: state.page + 1 }) } }, "Next →"),
    );
    const note =
      res.source === "cards" && res.scanned !== null && res.scanned < res.num_latents
        ? h("p", { class: "note" }, `This server has no latent listing; searched the first ${res.scanned} of ${res.num_latents} latents card by card.`)
        : res.source === "cards" && !/^#?\d+$/.test(state.q || "")
          ? h("p", { class: "note" }, "This server has no latent listing endpoint; cards were read one by one.")
          : null;
    replace(
      results,
      res.latents.length
        ? [
            h("table", { class: "latent-table" }, h("thead", h("tr", ["Latent", "Density", "Mean act.", "Max act.", "Top tokens", "", ""].map((c) => h("th", { scope: "col" }, c)))), h("tbody", rows)),
            pager,
            note,
          ]
        : [h("p", { class: "empty" }, state.q ? `No latent has “${state.q}” in its top contexts.` : "No latents."), note],
    );
  }

  function renderHist(res) {
    if (!res.density_histogram || !res.density_histogram.bins.length) {
      replace(hist);
      return;
    }
    const d = res.density_histogram;
    replace(hist, h("figure", { class: "panel-chart" }, h("figcaption", h("strong", "Density histogram"), h("span", { class: "muted" }, ` layer ${state.layer}${d.dead ? ` · ${d.dead} dead` : ""}`)), densityChart(d)));
  }

  root.refresh = () => run(state);
  queueMicrotask(() => run(state));
  return root;
}

