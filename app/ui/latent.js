// #/skills/<name>/latents/<i>?layer=L — one latent's card: density, mean activation, histograms,
// and its top contexts with the firing token highlighted by activation strength.

import { api, qs } from "./api.js";
import { binValues, binsFromEdges, histogram } from "./charts.js";
import { enc, errorBox, loading, reasoningLatents, skill as getSkill } from "./common.js";
import { badge, h, kv, link, num, pct, replace, select, textWithBreaks, visibleToken } from "./dom.js";
import { cardRoute, densityChart, layerDensity, steerButton } from "./latents.js";

/** A context row: before «token» after, the token shaded by activation / the card's strongest. */
export function contextLine(ctx, maxAct) {
  const strength = maxAct > 0 ? Math.max(0.12, Math.min(1, ctx.activation / maxAct)) : 1;
  const mark = h("mark", { class: "fire", style: { "--a": strength.toFixed(3) }, title: `activation ${num(ctx.activation, 3)}` }, visibleToken(ctx.token));
  return h("span", { class: "ctx-text" }, h("span", { class: "ctx-before" }, textWithBreaks(ctx.before)), mark, h("span", { class: "ctx-after" }, textWithBreaks(ctx.after)));
}

function tokenCounts(contexts) {
  const counts = new Map();
  for (const c of contexts) counts.set(c.token, (counts.get(c.token) || 0) + 1);
  return [...counts.entries()].sort((a, b) => b[1] - a[1]);
}

export async function latentPage(root, { params, query, signal }) {
  const name = params.name;
  const index = Number(params.index);
  const crumbs = h("p", { class: "crumbs" }, link("/skills", "Skills"), " / ", link(`/skills/${enc(name)}`, name), " / ");
  replace(root, h("div", { class: "page-head" }, crumbs, h("h1", `Latent ${index}`)), loading("Loading latent card…"));
  let info;
  let card;
  try {
    info = await getSkill(name);
    const layers = (info.manifest.layers || []).map(Number);
    let layer = query.has("layer") ? Number(query.get("layer")) : Number(info.manifest.default_layer);
    if (!layers.includes(layer)) layer = query.has("layer") ? layer : layers[0]; // an unknown layer: let the API say so
    card = await api.get(`/skills/${enc(name)}/latents/${index}${qs({ layer })}`, { signal });
  } catch (err) {
    if (err.name === "AbortError") return;
    replace(root, h("div", { class: "page-head" }, crumbs, h("h1", `Latent ${index}`)), errorBox(err, `load latent ${index}`));
    return;
  }
  const m = info.manifest;
  const layer = card.layer;
  const reasoning = reasoningLatents(m, layer).has(index);
  const dead = card.density === 0;
  const contexts = card.contexts || [];
  const maxAct = contexts.length ? contexts[0].activation : 0;
  const go = (i, l = layer) => (location.hash = `#${cardRoute(name, i, l)}`);

  // navigation: previous / next / jump / layer
  const jump = h("input", { id: "latent-jump", type: "number", min: 0, max: card.num_latents - 1, value: index, class: "narrow" });
  const layerSel = select((m.layers || []).map((l) => [l, `layer ${l}`]), layer, { id: "latent-layer" });
  layerSel.addEventListener("change", () => go(index, Number(layerSel.value)));
  const nav = h(
    "form",
    { class: "latent-nav", "aria-label": "Latent navigation" },
    h("a", { class: ["button", "secondary", index <= 0 && "disabled"], href: index > 0 ? `#${cardRoute(name, index - 1, layer)}` : undefined, "aria-disabled": index <= 0 ? "true" : undefined, id: "latent-prev" }, "← Previous"),
    h("a", { class: ["button", "secondary", index >= card.num_latents - 1 && "disabled"], href: index < card.num_latents - 1 ? `#${cardRoute(name, index + 1, layer)}` : undefined, id: "latent-next" }, "Next →"),
    h("label", { for: "latent-jump" }, "Go to"),
    jump,
    h("label", { for: "latent-layer" }, "Layer"),
    layerSel,
    h("button", { type: "submit", class: "secondary" }, "Open"),
  );
  nav.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const i = Number(jump.value);
    if (Number.isInteger(i) && i >= 0 && i < card.num_latents) go(i, Number(layerSel.value));
  });

  const stats = h(
    "section",
    { class: "panel", "aria-labelledby": "stats-title" },
    h("h2", { id: "stats-title" }, "Activity"),
    h(
      "div",
      { class: "stat-row" },
      h("div", { class: "stat" }, h("span", { class: "stat-label" }, "Density"), h("span", { class: "stat-value", id: "stat-density" }, pct(card.density, 3)), h("span", { class: "muted" }, card.density <= 0 ? "never active" : card.density >= 0.1 ? "of held-out tokens" : `about 1 in ${num(Math.round(1 / card.density))} tokens`)),
      h("div", { class: "stat" }, h("span", { class: "stat-label" }, "Mean activation"), h("span", { class: "stat-value", id: "stat-mean" }, num(card.mean_activation, 3)), h("span", { class: "muted" }, "where active")),
      h("div", { class: "stat" }, h("span", { class: "stat-label" }, "Max activation"), h("span", { class: "stat-value" }, num(maxAct, 3)), h("span", { class: "muted" }, "strongest context")),
    ),
    kv([
      ["Corpus", `${num(card.num_tokens)} held-out tokens`],
      ["SAE", `${num(card.num_latents)} latents at layer ${layer}`],
      ["Top firing tokens", contexts.length ? tokenCounts(contexts).map(([t, n]) => h("code", { class: "tok-chip" }, visibleToken(t), n > 1 ? h("sub", `×${n}`) : null)) : "—"],
    ]),
  );

  // histograms: the latent's own (server bins if the card has them, else its top contexts) and the layer's density
  const actHist = card.histogram && card.histogram.edges
    ? histogram(binsFromEdges(card.histogram.edges, card.histogram.counts), { title: "Activation histogram", xLabel: "activation (all active tokens)", yLabel: "tokens" })
    : histogram(binValues(contexts.map((c) => c.activation), Math.max(3, Math.min(10, contexts.length)), contexts.length ? Math.min(card.mean_activation, contexts[contexts.length - 1].activation) * 0.9 : 0, maxAct > 0 ? maxAct * 1.02 : 1), {
        title: "Activations of the top contexts",
        xLabel: "activation (top contexts)",
        yLabel: "contexts",
        marker: card.mean_activation > 0 ? { value: card.mean_activation, label: `mean ${num(card.mean_activation, 2)}` } : null,
      });
  const densitySlot = h("div", { class: "density-slot" }, loading("Loading the layer's density histogram…"));
  const charts = h(
    "section",
    { class: "panel", "aria-labelledby": "hist-title" },
    h("h2", { id: "hist-title" }, "Histograms"),
    h("div", { class: "hist-pair" }, h("figure", { class: "panel-chart" }, h("figcaption", h("strong", card.histogram ? "Activation" : "Top-context activations")), actHist), densitySlot),
  );

  const ctxList = contexts.length
    ? h(
        "ol",
        { class: "contexts", id: "contexts" },
        contexts.map((c) =>
          h(
            "li",
            { class: "context", dataset: { activation: c.activation } },
            h("span", { class: "ctx-act", "aria-label": `activation ${num(c.activation, 3)}` }, h("span", { class: "act-bar", style: { "--w": `${maxAct ? (100 * c.activation) / maxAct : 0}%` } }), num(c.activation, 2)),
            contextLine(c, maxAct),
            h("span", { class: "ctx-where muted" }, `chunk ${c.chunk} · pos ${c.position}`),
          ),
        ),
      )
    : h("p", { class: "empty" }, dead ? "This latent never fired on the held-out data (a dead latent): no contexts." : "No contexts recorded.");

  replace(
    root,
    h(
      "div",
      { class: "page-head" },
      crumbs,
      h("h1", `Latent ${index}`, " ", h("span", { class: "muted h-sub" }, `layer ${layer} · ${name}`), " ", reasoning ? badge("reasoning feature", "reason") : null, dead ? badge("dead", "dead") : null),
      h("div", { class: "actions" }, nav, steerButton(name, layer, card, "Steer with this latent"), link(`/inspect${qs({ skill: name, layer })}`, "Inspect a prompt", { class: "button secondary" })),
    ),
    h(
      "div",
      { class: "grid latent-grid" },
      stats,
      charts,
      h(
        "section",
        { class: "panel span-all", "aria-labelledby": "ctx-title" },
        h("div", { class: "panel-head" }, h("h2", { id: "ctx-title" }, "Top contexts"), h("span", { class: "muted" }, "The firing token is highlighted; its shade is the activation relative to the strongest context."), h("span", { class: "legend", "aria-hidden": "true" }, h("mark", { class: "fire", style: { "--a": "0.2" } }, "weak"), h("mark", { class: "fire", style: { "--a": "0.6" } }, "medium"), h("mark", { class: "fire", style: { "--a": "1" } }, "strong"))),
        ctxList,
      ),
    ),
  );

  // The layer's density histogram (server listing, or card by card for small SAEs).
  try {
    const hist = await layerDensity(name, layer, card.num_latents, signal, (done, total) => {
      const p = densitySlot.querySelector(".loading");
      if (p) p.textContent = `Reading latent cards ${done}/${total} for the density histogram…`;
    });
    if (signal.aborted) return;
    replace(
      densitySlot,
      hist && hist.bins.length
        ? h("figure", { class: "panel-chart" }, h("figcaption", h("strong", "Layer density"), h("span", { class: "muted" }, ` ${hist.dead ? `${hist.dead} dead · ` : ""}${hist.scanned && hist.scanned < hist.num_latents ? `first ${hist.scanned} latents · ` : ""}this latent marked`)), densityChart(hist, { marker: { density: card.density, label: `#${index}` } }))
        : h("p", { class: "muted" }, "No density histogram for this layer."),
    );
  } catch (err) {
    if (err.name === "AbortError") return;
    replace(densitySlot, errorBox(err, "load the layer's densities"));
  }
}

