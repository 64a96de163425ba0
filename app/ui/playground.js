// #/playground — a model, an optional skill (adapter), SAE latent edits, and compare: the steered
// and unsteered completions stream side by side (POST /generate with stream + compare).

import { sse } from "./api.js";
import { defaultModel, errorBox, loadPlayground, loading, models as listModels, savePlayground, skills as listSkills } from "./common.js";
import { field, h, link, num, replace, select } from "./dom.js";
import { cardRoute } from "./latents.js";

const MODES = [["clamp", "clamp to"], ["add", "add"], ["scale", "scale by"]];

export async function playgroundPage(root, { query, signal }) {
  replace(root, h("div", { class: "page-head" }, h("h1", "Playground")), loading());
  let skills;
  let models;
  try {
    [skills, models] = await Promise.all([listSkills(), listModels()]);
  } catch (err) {
    replace(root, h("div", { class: "page-head" }, h("h1", "Playground")), errorBox(err, "load models and skills"));
    return;
  }
  if (signal.aborted) return;
  const byName = new Map(skills.map((s) => [s.name, s]));
  const saved = loadPlayground();
  const state = {
    model: query.get("model") || saved.model || defaultModel(models),
    skill: query.get("skill") || saved.skill || "",
    prompt: saved.prompt ?? "What is 17 + 25?",
    maxTokens: saved.maxTokens || 24,
    temperature: saved.temperature ?? 0,
    saeSkill: query.get("sae") || saved.saeSkill || "",
    layer: saved.layer ?? null,
    mode: saved.mode || "steer",
    compare: saved.compare ?? true,
    edits: saved.edits || [],
  };
  if (query.get("sae") && saved.saeSkill !== query.get("sae")) {
    state.edits = []; // edits belong to another skill's SAE
    state.layer = null;
  }
  if (!byName.has(state.saeSkill)) state.saeSkill = "";
  if (!models.some((m) => m.name === state.model)) state.model = defaultModel(models);

  const modelSel = select(models.map((m) => [m.name, m.name]), state.model, { id: "pg-model", name: "model" });
  const skillSel = select([["", "none"], ...skills.map((s) => [s.name, `${s.name}${s.adapters.length ? ` (adapters: ${s.adapters.join(", ")})` : " (no adapter)"}`])], state.skill, { id: "pg-skill", name: "skill" });
  const prompt = h("textarea", { id: "pg-prompt", name: "prompt", rows: 3, spellcheck: "false", required: true });
  prompt.value = state.prompt;
  const maxTokens = h("input", { id: "pg-max-tokens", name: "max_tokens", type: "number", min: 1, max: 4096, value: state.maxTokens, class: "narrow" });
  const temperature = h("input", { id: "pg-temperature", name: "temperature", type: "number", min: 0, max: 5, step: "any", value: state.temperature, class: "narrow" });
  const saeSel = select([["", "none (no steering)"], ...skills.map((s) => [s.name, s.name])], state.saeSkill, { id: "pg-sae-skill", name: "sae_skill" });
  const layerSel = h("select", { id: "pg-layer", name: "layer" });
  const compare = h("input", { id: "pg-compare", name: "compare", type: "checkbox", checked: state.compare });
  const modeSteer = h("input", { id: "pg-mode-steer", type: "radio", name: "sae_mode", value: "steer", checked: state.mode !== "splice" });
  const modeSplice = h("input", { id: "pg-mode-splice", type: "radio", name: "sae_mode", value: "splice", checked: state.mode === "splice" });
  const editsBody = h("tbody", { id: "pg-edits" });
  const editsEmpty = h("p", { class: "muted", id: "pg-no-edits" });
  const emptyHint = () =>
    (editsEmpty.textContent = modeSplice.checked
      ? "No edits: in splice mode the SAE's reconstruction still replaces the layer's output, so the completion can change. Pick latents with “Steer” in the skill explorer, or add one here."
      : "No edits: the steered completion equals the unsteered one. Pick latents with “Steer” in the skill explorer, or add one here.");
  const addEdit = h("button", { type: "button", class: "secondary small", id: "pg-add-edit" }, "+ Add edit");
  const clearEdits = h("button", { type: "button", class: "secondary small", id: "pg-clear-edits" }, "Clear");
  const run = h("button", { type: "submit", id: "pg-run" }, "Generate");
  const stop = h("button", { type: "button", class: "secondary", id: "pg-stop", disabled: true }, "Stop");
  const out = h("div", { class: "pg-out", "aria-live": "polite" });
  const saeBlock = h("fieldset", { class: "sae-block" });

  function syncLayers() {
    const s = byName.get(saeSel.value);
    const m = (s && s.manifest) || {};
    const layers = (m.layers || []).map(Number);
    const want = layers.includes(Number(state.layer)) ? Number(state.layer) : Number(m.default_layer);
    replace(layerSel, layers.map((l) => h("option", { value: l, selected: l === want }, `layer ${l}${l === Number(m.default_layer) ? " (default)" : ""}`)));
    layerSel.disabled = !s;
    saeBlock.classList.toggle("is-off", !s);
    for (const el of saeBlock.querySelectorAll("input, select, button")) if (el !== saeSel) el.disabled = !s;
  }

  function editRow(edit) {
    const latent = h("input", { type: "number", min: 0, value: edit.latent, class: "narrow", "aria-label": "latent index", required: true });
    const mode = select(MODES, edit.mode, { "aria-label": "edit mode" });
    const value = h("input", { type: "number", step: "any", value: edit.value, class: "narrow", "aria-label": "value", required: true });
    const remove = h("button", { type: "button", class: "small secondary", "aria-label": `remove edit of latent ${edit.latent}` }, "Remove");
    const open = link(cardRoute(saeSel.value || "", edit.latent, layerSel.value), "card", { class: "small" });
    const row = h("tr", { class: "edit-row" }, h("td", latent), h("td", mode), h("td", value), h("td", open, " ", remove));
    const sync = () => {
      edit.latent = Number(latent.value);
      edit.mode = mode.value;
      edit.value = Number(value.value);
      open.setAttribute("href", `#${cardRoute(saeSel.value || "", edit.latent, layerSel.value)}`);
      persist();
    };
    latent.addEventListener("input", sync);
    mode.addEventListener("change", sync);
    value.addEventListener("input", sync);
    remove.addEventListener("click", () => {
      state.edits.splice(state.edits.indexOf(edit), 1);
      renderEdits();
      persist();
      addEdit.focus();
    });
    return row;
  }

  function renderEdits() {
    replace(editsBody, state.edits.map(editRow));
    editsEmpty.hidden = state.edits.length > 0;
    editsTable.hidden = state.edits.length === 0;
  }

  function persist() {
    Object.assign(state, {
      model: modelSel.value,
      skill: skillSel.value,
      prompt: prompt.value,
      maxTokens: Number(maxTokens.value),
      temperature: Number(temperature.value),
      saeSkill: saeSel.value,
      layer: layerSel.value === "" ? null : Number(layerSel.value),
      mode: modeSplice.checked ? "splice" : "steer",
      compare: compare.checked,
    });
    savePlayground(state);
  }

  const editsTable = h("table", { class: "edits-table" }, h("thead", h("tr", ["Latent", "Mode", "Value", ""].map((c) => h("th", { scope: "col" }, c)))), editsBody);
  addEdit.addEventListener("click", () => {
    state.edits.push({ latent: 0, mode: "clamp", value: 10 });
    renderEdits();
    persist();
    editsBody.lastElementChild.querySelector("input").focus();
  });
  clearEdits.addEventListener("click", () => {
    state.edits.length = 0;
    renderEdits();
    persist();
  });
  saeSel.addEventListener("change", () => {
    state.layer = null;
    if (state.edits.length) state.edits.length = 0;
    syncLayers();
    renderEdits();
    persist();
  });
  for (const el of [modelSel, skillSel, prompt, maxTokens, temperature, layerSel, compare, modeSteer, modeSplice]) el.addEventListener("change", persist);
  for (const el of [modeSteer, modeSplice]) el.addEventListener("change", emptyHint);
  emptyHint();

  replace(
    saeBlock,
    h("legend", "SAE steering"),
    h(
      "div",
      { class: "form-row" },
      field("Steering skill (its SAE)", saeSel),
      field("Layer", layerSel),
      h("div", { class: "field", role: "radiogroup", "aria-labelledby": "pg-mode-label" }, h("span", { class: "label", id: "pg-mode-label" }, "Mode"), h("div", { class: "radios" }, h("label", modeSteer, " steer (keep the SAE error)"), h("label", modeSplice, " splice (SAE output replaces the layer)"))),
      h("div", { class: "field" }, h("span", { class: "label" }, "Compare"), h("label", { class: "check" }, compare, " also the unsteered completion")),
    ),
    editsTable,
    editsEmpty,
    h("div", { class: "actions" }, addEdit, clearEdits),
  );
  syncLayers();
  renderEdits();

  const form = h(
    "form",
    { class: "panel pg-form", id: "pg-form" },
    h("div", { class: "form-row" }, field("Model", modelSel), field("Skill adapter (optional)", skillSel, "attached for this request"), field("Max tokens", maxTokens), field("Temperature", temperature, "0 is greedy")),
    field("Prompt", prompt, "Ctrl+Enter (⌘+Enter) generates"),
    saeBlock,
    h("div", { class: "actions" }, run, stop),
  );
  prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });

  let controller = null;
  stop.addEventListener("click", () => controller && controller.abort());
  signal.addEventListener("abort", () => controller && controller.abort());
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    persist();
    const body = {
      model: modelSel.value,
      prompt: prompt.value,
      max_tokens: Number(maxTokens.value) || 24,
      temperature: Number(temperature.value) || 0,
      stream: true,
    };
    if (skillSel.value) body.skill = skillSel.value;
    const steering = Boolean(saeSel.value);
    if (steering) {
      body.sae = { skill: saeSel.value, layer: Number(layerSel.value), edits: state.edits.map((e) => ({ latent: Number(e.latent), mode: e.mode, value: Number(e.value) })) };
      if (modeSplice.checked) body.sae.mode = "splice"; // only sent when chosen (servers without splice answer 422)
      if (compare.checked) body.compare = true;
    }
    controller = new AbortController();
    run.disabled = true;
    stop.disabled = false;
    await stream(out, body, controller.signal, steering && compare.checked);
    run.disabled = false;
    stop.disabled = true;
  });

  replace(
    root,
    h("div", { class: "page-head" }, h("h1", "Playground"), h("p", { class: "muted" }, "Move a latent and watch the completion change: the steered and unsteered completions are decoded in the same batch and stream side by side.")),
    form,
    out,
  );
}

function pane(index, title) {
  const text = h("pre", { class: "completion", id: `pg-out-${index}`, "aria-label": `${title} completion` });
  const meta = h("div", { class: "pane-meta muted", id: `pg-meta-${index}` }, "streaming…");
  return { el: h("section", { class: ["panel", "pane", `pane-${index}`], "aria-labelledby": `pg-title-${index}` }, h("h2", { id: `pg-title-${index}` }, title), text, meta), text, meta, value: "", done: false };
}

function firstDifference(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

async function stream(out, body, signal, comparing) {
  const panes = comparing ? [pane(0, "Steered"), pane(1, "Unsteered")] : [pane(0, body.sae ? "Steered" : "Completion")];
  const verdict = h("p", { class: "verdict", id: "pg-verdict", role: "status" });
  const errorSlot = h("div", { class: "pg-error" });
  replace(out, errorSlot, h("div", { class: ["compare-grid", comparing && "two"] }, panes.map((p) => p.el)), verdict);
  try {
    for await (const ev of sse("POST", "/generate", { json: body, signal })) {
      if (ev.data === "[DONE]") break;
      let d;
      try {
        d = JSON.parse(ev.data);
      } catch {
        continue;
      }
      if (d.error) throw Object.assign(new Error(d.error.message || "generation failed"), d.error);
      const p = panes[d.index ?? 0] || panes[0];
      if (d.text) {
        p.value += d.text;
        p.text.textContent = p.value;
      }
      if (d.done) {
        p.done = true;
        const usage = d.usage || {};
        p.meta.textContent = `finish: ${d.finish_reason} · ${num(usage.completion_tokens)} tokens${d.sae ? ` · SAE ${d.sae.skill} layer ${d.sae.layer}, ${d.sae.edits} edit${d.sae.edits === 1 ? "" : "s"}` : ""}${d.cross_model ? ` · adapter from ${d.adapter_target}` : ""}`;
      }
    }
  } catch (err) {
    if (err.name === "AbortError") {
      for (const p of panes) if (!p.done) p.meta.textContent = "stopped";
      return;
    }
    replace(errorSlot, errorBox(err, "generate"));
    for (const p of panes) if (!p.done) p.meta.textContent = "failed";
    if (!panes.some((p) => p.value)) out.querySelector(".compare-grid").hidden = true;
    return;
  }
  for (const p of panes) if (!p.done) p.meta.textContent = "ended";
  if (comparing) {
    const [a, b] = panes;
    const at = firstDifference(a.value, b.value);
    if (at < 0) {
      verdict.className = "verdict same";
      verdict.textContent = "Identical completions: these edits do not change the output.";
    } else {
      verdict.className = "verdict differ";
      verdict.textContent = `The completions differ from character ${at}.`;
      for (const p of panes) replace(p.text, p.value.slice(0, at), h("mark", { class: "diff" }, p.value.slice(at)));
    }
    out.dataset.verdict = at < 0 ? "same" : "differ";
  }
}

