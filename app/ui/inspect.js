// #/inspect — type a prompt, see each token with its strongest latents (hover for values, click a
// latent to open its card, click a token for all its latents; trace one latent across the prompt).

import { api, qs } from "./api.js";
import { defaultModel, enc, errorBox, loading, models as listModels, reasoningLatents, skills as listSkills, withTip } from "./common.js";
import { badge, field, h, link, num, replace, select, visibleToken } from "./dom.js";
import { cardRoute, steerButton } from "./latents.js";

const SHOWN = 3; // latents under each token

export async function inspectPage(root, { query, signal }) {
  replace(root, h("div", { class: "page-head" }, h("h1", "Inspect")), loading());
  let skills;
  let models;
  try {
    [skills, models] = await Promise.all([listSkills(), listModels()]);
  } catch (err) {
    replace(root, h("div", { class: "page-head" }, h("h1", "Inspect")), errorBox(err, "load skills and models"));
    return;
  }
  if (signal.aborted) return;
  const head = h("div", { class: "page-head" }, h("h1", "Inspect"), h("p", { class: "muted" }, "Which of a skill's SAE latents fire on each token of a prompt (read off a model's residual stream at the skill's layer)."));
  if (!skills.length) {
    replace(root, head, h("div", { class: "panel empty" }, h("p", "No skills to inspect with yet. "), link("/jobs?form=extract", "Extract one")));
    return;
  }
  const byName = new Map(skills.map((s) => [s.name, s]));
  const initial = byName.has(query.get("skill")) ? query.get("skill") : skills[0].name;

  const skillSel = select(skills.map((s) => s.name), initial, { id: "inspect-skill", name: "skill" });
  const modelSel = select(models.map((m) => [m.name, m.hidden_size ? `${m.name} (d ${m.hidden_size})` : m.name]), "", { id: "inspect-model", name: "model" });
  const layerSel = h("select", { id: "inspect-layer", name: "layer" });
  const top = h("input", { id: "inspect-top", name: "top", type: "number", min: 1, max: 256, value: query.get("top") || 8, class: "narrow" });
  const prompt = h("textarea", { id: "inspect-prompt", name: "prompt", rows: 3, required: true, spellcheck: "false" });
  prompt.value = query.get("prompt") || "What is 17 + 25?";
  const submit = h("button", { type: "submit", id: "inspect-run" }, "Inspect");
  const out = h("div", { class: "inspect-out", "aria-live": "polite" });

  function syncSkill(keepLayer) {
    const s = byName.get(skillSel.value);
    const m = (s && s.manifest) || {};
    const layers = (m.layers || []).map(Number);
    const want = keepLayer && layers.includes(Number(keepLayer)) ? Number(keepLayer) : Number(m.default_layer);
    replace(layerSel, layers.map((l) => h("option", { value: l, selected: l === want }, `layer ${l}${l === Number(m.default_layer) ? " (default)" : ""}`)));
    const src = m.source && m.source.model;
    const wanted = query.get("model") && models.some((x) => x.name === query.get("model")) ? query.get("model") : models.some((x) => x.name === src) ? src : defaultModel(models);
    modelSel.value = wanted;
  }
  syncSkill(query.get("layer"));
  skillSel.addEventListener("change", () => syncSkill(null));

  const form = h(
    "form",
    { class: "panel inspect-form", id: "inspect-form" },
    h("div", { class: "form-row" }, field("Skill", skillSel), field("Model", modelSel, "its hidden size must be the SAE's width"), field("Layer", layerSel), field("Latents per token", top)),
    field("Prompt", prompt, "Ctrl+Enter (⌘+Enter) runs it"),
    h("div", { class: "actions" }, submit),
  );
  prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { model: modelSel.value, prompt: prompt.value, layer: Number(layerSel.value), top: Number(top.value) || 8 };
    const skillName = skillSel.value;
    history.replaceState(null, "", `#/inspect${qs({ skill: skillName, layer: body.layer, model: body.model })}`);
    submit.disabled = true;
    replace(out, loading("Running the model…"));
    try {
      const res = await api.post(`/skills/${enc(skillName)}/inspect`, body, { signal });
      renderResult(out, res, byName.get(skillName));
    } catch (err) {
      if (err.name !== "AbortError") replace(out, errorBox(err, "inspect the prompt"));
    } finally {
      submit.disabled = false;
    }
  });
  replace(root, head, form, out);
  if (query.get("run") === "1") form.requestSubmit();
}

function renderResult(out, res, skillInfo) {
  const reasoning = reasoningLatents(skillInfo && skillInfo.manifest, res.layer);
  const globalMax = Math.max(1e-9, ...res.tokens.flatMap((t) => t.latents.map((l) => l.activation)));
  // per latent across the prompt: max activation and how many tokens it fires on
  const agg = new Map();
  for (const t of res.tokens)
    for (const l of t.latents) {
      const a = agg.get(l.index) || { index: l.index, max: 0, tokens: 0, sum: 0 };
      a.max = Math.max(a.max, l.activation);
      a.sum += l.activation;
      a.tokens += 1;
      agg.set(l.index, a);
    }
  const ranked = [...agg.values()].sort((a, b) => b.max - a.max || a.index - b.index);
  const detail = h("section", { class: "panel token-detail", id: "token-detail", "aria-live": "polite" }, h("p", { class: "muted" }, "Click a token to list all its latents."));
  let traced = null;

  const cols = res.tokens.map((t) => {
    const strongest = t.latents.length ? t.latents[0].activation : 0;
    const tok = h("button", { type: "button", class: "tok", style: { "--a": (strongest / globalMax).toFixed(3) }, "aria-label": `token ${t.position}: ${JSON.stringify(t.token)}, ${t.latents.length} active latents`, dataset: { position: t.position } }, visibleToken(t.token));
    withTip(tok, () => h("div", h("strong", JSON.stringify(t.token)), ` id ${t.token_id} · pos ${t.position}`, h("br"), t.latents.length ? t.latents.slice(0, 8).map((l) => h("div", `#${l.index}: ${num(l.activation, 3)}`)) : "no active latents"));
    tok.addEventListener("click", () => showToken(t));
    const chips = t.latents.slice(0, SHOWN).map((l) => {
      const a = link(cardRoute(res.skill, l.index, res.layer), `#${l.index}`, {
        class: ["lat-chip", reasoning.has(l.index) && "is-reasoning"],
        style: { "--a": (l.activation / globalMax).toFixed(3) },
        "aria-label": `latent ${l.index}, activation ${num(l.activation, 3)}: open its card`,
        dataset: { latent: l.index, activation: l.activation },
      });
      return withTip(a, () => h("div", h("strong", `latent #${l.index}`), h("br"), `activation ${num(l.activation, 3)}`, reasoning.has(l.index) ? h("div", "reasoning feature") : null, h("div", { class: "muted" }, "click to open its card")));
    });
    const more = t.latents.length > SHOWN ? h("span", { class: "more muted" }, `+${t.latents.length - SHOWN}`) : null;
    const col = h("li", { class: "tok-col", dataset: { position: t.position, token: t.token } }, tok, h("div", { class: "chips" }, chips, more));
    col.tok = tok;
    col.data = t;
    return col;
  });

  function showToken(t) {
    cols.forEach((c) => c.tok.setAttribute("aria-pressed", String(c.data === t)));
    replace(
      detail,
      h("h2", "Token ", h("code", visibleToken(t.token)), h("span", { class: "muted" }, ` position ${t.position} · id ${t.token_id}`)),
      t.latents.length
        ? h(
            "table",
            { class: "latent-table" },
            h("thead", h("tr", ["Latent", "Activation", "", ""].map((c) => h("th", { scope: "col" }, c)))),
            h(
              "tbody",
              t.latents.map((l) =>
                h(
                  "tr",
                  h("td", link(cardRoute(res.skill, l.index, res.layer), `#${l.index}`, { class: "latent-link" }), " ", reasoning.has(l.index) ? badge("reasoning", "reason") : null),
                  h("td", h("span", { class: "act-bar", style: { "--w": `${(100 * l.activation) / globalMax}%` } }), " ", num(l.activation, 3)),
                  h("td", h("button", { type: "button", class: "small secondary", on: { click: () => trace(l.index) } }, "Trace")),
                  h("td", steerButton(res.skill, res.layer, { index: l.index, max_activation: l.activation })),
                ),
              ),
            ),
          )
        : h("p", { class: "muted" }, "No latent is active on this token."),
    );
  }

  function trace(index) {
    traced = traced === index ? null : index;
    for (const c of cols) {
      const hit = c.data.latents.find((l) => l.index === traced);
      const strongest = c.data.latents.length ? c.data.latents[0].activation : 0;
      c.tok.style.setProperty("--a", traced === null ? (strongest / globalMax).toFixed(3) : hit ? (hit.activation / (agg.get(traced).max || 1)).toFixed(3) : "0");
      c.classList.toggle("traced", traced !== null && Boolean(hit));
    }
    traceButtons.forEach((b) => b.setAttribute("aria-pressed", String(Number(b.dataset.latent) === traced)));
    replace(traceNote, traced === null ? "Shading: each token's strongest latent." : ["Shading: latent ", link(cardRoute(res.skill, traced, res.layer), `#${traced}`), ` only (max ${num(agg.get(traced).max, 3)}).`]);
  }

  const traceNote = h("span", { class: "muted" }, "Shading: each token's strongest latent.");
  const traceButtons = ranked.slice(0, 24).map((a) =>
    h(
      "button",
      { type: "button", class: ["chip-btn", reasoning.has(a.index) && "is-reasoning"], "aria-pressed": "false", dataset: { latent: a.index }, title: `max ${num(a.max, 3)} on ${a.tokens} token(s)`, on: { click: () => trace(a.index) } },
      `#${a.index}`,
      h("small", ` ${num(a.max, 2)} · ${a.tokens}`),
    ),
  );
  replace(
    out,
    h(
      "section",
      { class: "panel", "aria-labelledby": "tokens-title" },
      h("div", { class: "panel-head" }, h("h2", { id: "tokens-title" }, `${res.tokens.length} tokens`), h("span", { class: "muted" }, `${res.model} · ${res.skill} · layer ${res.layer}`), traceNote),
      h("ol", { class: "token-strip", id: "token-strip" }, cols),
    ),
    h(
      "div",
      { class: "grid" },
      detail,
      h(
        "section",
        { class: "panel", "aria-labelledby": "agg-title" },
        h("h2", { id: "agg-title" }, "Strongest latents on this prompt"),
        h("p", { class: "muted" }, "Trace one across the prompt (max activation · tokens active)."),
        h("div", { class: "chip-row" }, traceButtons),
      ),
    ),
  );
}
