// #/jobs — submit an extraction, an adapter build or an evaluation (forms pre-filled with the API's
// defaults), upload a dataset, list jobs; #/jobs/<id> — live progress from the job's event stream,
// cancel, and the result's report when it is done.

import { ApiError, api, qs, request, sse } from "./api.js";
import { layerReportChart, sparkline } from "./charts.js";
import { datasets as listDatasets, defaultModel, enc, errorBox, invalidate, loading, models as listModels, skills as listSkills, toast } from "./common.js";
import { badge, duration, field, h, kv, link, num, pct, replace, select, short, table, when } from "./dom.js";

const TERMINAL = new Set(["finished", "failed", "canceled"]);
const KIND_LABEL = { source: "Source training", extract: "Skill extraction", tune: "Adapter build", eval: "Evaluation" };

// The API's defaults (resa_engine ExtractConfig, TuneConfig, EvalConfig): the forms start from them.
const EXTRACT_DEFAULTS = { expansion_factor: 32, k: 32, chunk_len: 2048, batch_size: 8, epochs: 1, seed: 0, heldout_max_tokens: 8192 };
const TUNE_DEFAULTS = { objective: "kl", lr: 1e-6, epochs: 2, batch_size: 1, chunk_len: 2048, schedule: "constant", seed: 0, r: 32, alpha: 128, dropout: 0.05 };
const EVAL_DEFAULTS = { samples: 4, temperature: 0.6, top_p: 0.95, max_tokens: 512, seed: 0, batch_size: 32, prompt_format: "resa" };

export function stateBadge(state) {
  return badge(state, `state-${state}`);
}

// ---------------------------------------------------------------- form helpers

function input(name, value, attrs = {}) {
  return h("input", { name, id: `${attrs.idPrefix || "f"}-${name}`, value: value ?? "", autocomplete: "off", ...attrs, idPrefix: undefined });
}

function numberInput(prefix, name, value, attrs = {}) {
  return input(name, value, { type: "number", step: "any", class: "narrow", idPrefix: prefix, ...attrs });
}

/** FormData → object of non-empty values; numbers for number inputs. */
function values(form) {
  const out = {};
  for (const el of form.elements) {
    if (!el.name || el.disabled) continue;
    if (el.type === "checkbox") {
      if (el.dataset.group) {
        out[el.dataset.group] ||= [];
        if (el.checked) out[el.dataset.group].push(el.value);
      } else out[el.name] = el.checked;
    } else if (el.value !== "") out[el.name] = el.type === "number" ? Number(el.value) : el.value.trim();
  }
  return out;
}

function pick(obj, keys) {
  const out = {};
  for (const k of keys) if (obj[k] !== undefined && obj[k] !== "") out[k] = obj[k];
  return Object.keys(out).length ? out : undefined;
}

function datasetOptions(list) {
  return list.length ? list.map((d) => [d.id, `${short(d.id, 12)} · ${num(d.rows)} rows`]) : [["", "no datasets: upload one"]];
}

function submitRow(label, id) {
  const button = h("button", { type: "submit", id }, label);
  const slot = h("div", { class: "form-error" });
  return { button, slot, row: h("div", { class: "actions" }, button) };
}

async function submitJob(parts, send) {
  parts.button.disabled = true;
  replace(parts.slot);
  try {
    const job = await send();
    invalidate("/jobs");
    toast(h("span", `Job queued: ${short(job.id, 8)}`));
    location.hash = `#/jobs/${enc(job.id)}`;
  } catch (err) {
    replace(parts.slot, errorBox(err, "submit the job"));
  } finally {
    parts.button.disabled = false;
  }
}

// ---------------------------------------------------------------- the forms

function extractForm({ models, datasets }) {
  const p = "ex";
  const model = select(models.map((m) => [m.name, m.name]), defaultModel(models), { name: "model", id: `${p}-model` });
  const layerHint = h("small", { class: "hint" });
  const layers = input("layers", "", { idPrefix: p, required: true, pattern: "\\s*\\d+(\\s*,\\s*\\d+)*\\s*", placeholder: "e.g. 12 or 6, 12, 18", "aria-describedby": `${p}-layers-hint` });
  layerHint.id = `${p}-layers-hint`;
  const syncLayers = () => {
    const m = models.find((x) => x.name === model.value) || {};
    if (m.num_layers) {
      layers.value = String(Math.floor(m.num_layers * (12 / 28))); // the paper's layer 12 of 28, scaled
      layerHint.textContent = `0-based decoder layers (the model has ${m.num_layers}); paper: 12 of 28`;
    } else layerHint.textContent = "0-based decoder layers";
  };
  model.addEventListener("change", syncLayers);
  syncLayers();
  const targets = h(
    "div",
    { class: "checks", role: "group", "aria-label": "Build adapters for" },
    models.map((m) => h("label", { class: "check" }, h("input", { type: "checkbox", name: "adapters_for", value: m.name, dataset: { group: "adapters_for" } }), ` ${m.name}`)),
  );
  const parts = submitRow("Extract skill", "ex-submit");
  const form = h(
    "form",
    { class: "job-form", id: "form-extract", "aria-label": "Extract a skill" },
    h("div", { class: "form-row" }, field("Skill name", input("name", "", { idPrefix: p, required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,99}", placeholder: "e.g. arith" })), field("Source model", model), field("Source adapter (optional)", input("adapter", "", { idPrefix: p, placeholder: "a stored adapter, by skill" }))),
    h("div", { class: "form-row" }, h("div", { class: "field" }, h("label", { for: layers.id }, "Layers"), layers, layerHint), field("Dataset", select(datasetOptions(datasets), datasets[0] && datasets[0].id, { name: "dataset", id: `${p}-dataset`, required: true }), "verified QA rows (upload on the Dataset tab)")),
    h("fieldset", h("legend", "SAE"), h("div", { class: "form-row" }, field("Latents", numberInput(p, "num_latents", "", { placeholder: "d_in × expansion", min: 1 })), field("Expansion", numberInput(p, "expansion_factor", EXTRACT_DEFAULTS.expansion_factor, { min: 1 })), field("k (TopK)", numberInput(p, "k", EXTRACT_DEFAULTS.k, { min: 1 })))),
    h(
      "fieldset",
      h("legend", "Training"),
      h(
        "div",
        { class: "form-row" },
        field("Chunk length", numberInput(p, "chunk_len", EXTRACT_DEFAULTS.chunk_len, { min: 2 })),
        field("Batch size", numberInput(p, "batch_size", EXTRACT_DEFAULTS.batch_size, { min: 1 })),
        field("Max tokens", numberInput(p, "max_tokens", "", { placeholder: "all", min: 1 })),
        field("Epochs", numberInput(p, "epochs", EXTRACT_DEFAULTS.epochs, { min: 1 })),
        field("Learning rate", numberInput(p, "lr", "", { placeholder: "auto" })),
        field("Held-out tokens", numberInput(p, "heldout_max_tokens", EXTRACT_DEFAULTS.heldout_max_tokens, { min: 1 })),
        field("Seed", numberInput(p, "seed", EXTRACT_DEFAULTS.seed)),
      ),
    ),
    h("fieldset", h("legend", "Then build adapters for (optional)"), targets),
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "replace", id: `${p}-replace` }), " Replace an existing skill of that name"),
    parts.slot,
    parts.row,
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = values(form);
    const body = {
      name: v.name,
      source: { model: v.model, ...(v.adapter ? { adapter: v.adapter } : {}) },
      layers: String(v.layers || "").split(",").map((x) => Number(x.trim())).filter((x) => x !== "" && Number.isFinite(x)),
      dataset: v.dataset,
    };
    const sae = pick(v, ["num_latents", "expansion_factor", "k"]);
    if (sae) body.sae = sae;
    if (sae && sae.num_latents) delete body.sae.expansion_factor; // an explicit width wins
    const train = pick(v, ["chunk_len", "batch_size", "max_tokens", "epochs", "lr", "heldout_max_tokens", "seed"]);
    if (train) body.train = train;
    if (v.adapters_for && v.adapters_for.length) body.adapters_for = v.adapters_for;
    if (v.replace) body.replace = true;
    submitJob(parts, async () => (await api.post("/skills", body)).job);
  });
  return form;
}

function adapterForm({ models, datasets, skills }, query) {
  const p = "ad";
  const skillSel = select(skills.map((s) => s.name), query.get("skill") || (skills[0] && skills[0].name), { name: "skill", id: `${p}-skill`, required: true });
  const target = select(models.map((m) => [m.name, m.name]), defaultModel(models), { name: "target", id: `${p}-target` });
  const syncTarget = () => {
    const s = skills.find((x) => x.name === skillSel.value);
    const src = s && s.manifest.source && s.manifest.source.model;
    if (src && models.some((m) => m.name === src)) target.value = src;
  };
  skillSel.addEventListener("change", syncTarget);
  syncTarget();
  const parts = submitRow("Build adapter", "ad-submit");
  const form = h(
    "form",
    { class: "job-form", id: "form-adapter", "aria-label": "Build an adapter" },
    skills.length ? null : h("p", { class: "note" }, "No skills yet: extract one first."),
    h("div", { class: "form-row" }, field("Skill", skillSel), field("Target model", target), field("Dataset", select([["", "the skill's dataset"], ...datasets.map((d) => [d.id, `${short(d.id, 12)} · ${num(d.rows)} rows`])], "", { name: "dataset", id: `${p}-dataset` }))),
    h(
      "fieldset",
      h("legend", "Tuning (SAE-guided LoRA)"),
      h(
        "div",
        { class: "form-row" },
        field("Objective", select([["kl", "kl (authors' code)"], ["ce", "ce (paper text)"]], TUNE_DEFAULTS.objective, { name: "objective", id: `${p}-objective` })),
        field("Layer", numberInput(p, "layer", "", { placeholder: "skill default", min: 0 })),
        field("Learning rate", numberInput(p, "lr", TUNE_DEFAULTS.lr)),
        field("Epochs", numberInput(p, "epochs", TUNE_DEFAULTS.epochs, { min: 0 })),
        field("Batch size", numberInput(p, "batch_size", TUNE_DEFAULTS.batch_size, { min: 1 })),
        field("Chunk length", numberInput(p, "chunk_len", TUNE_DEFAULTS.chunk_len, { min: 2 })),
        field("Max steps", numberInput(p, "max_steps", "", { placeholder: "no cap", min: 1 })),
        field("Schedule", select(["constant", "cosine"], TUNE_DEFAULTS.schedule, { name: "schedule", id: `${p}-schedule` })),
        field("Seed", numberInput(p, "seed", TUNE_DEFAULTS.seed)),
      ),
      h("label", { class: "check" }, h("input", { type: "checkbox", name: "splice_grad", id: `${p}-splice-grad` }), " Gradient through the SAE splice"),
    ),
    h("fieldset", h("legend", "LoRA"), h("div", { class: "form-row" }, field("r", numberInput(p, "r", TUNE_DEFAULTS.r, { min: 1 })), field("alpha", numberInput(p, "alpha", TUNE_DEFAULTS.alpha)), field("dropout", numberInput(p, "dropout", TUNE_DEFAULTS.dropout, { min: 0, max: 0.99 })))),
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "replace", id: `${p}-replace` }), " Replace an existing adapter"),
    parts.slot,
    parts.row,
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = values(form);
    const body = { target: v.target, ...pick(v, ["dataset", "objective", "layer", "lr", "epochs", "batch_size", "chunk_len", "max_steps", "schedule", "seed"]) };
    if (v.splice_grad) body.splice_grad = true;
    const lora = pick(v, ["r", "alpha", "dropout"]);
    if (lora) body.lora = lora;
    if (v.replace) body.replace = true;
    submitJob(parts, async () => (await api.post(`/skills/${enc(v.skill)}/adapters`, body)).job);
  });
  return form;
}

function evalForm({ models, datasets, adapters }, query) {
  const p = "ev";
  const model = select(models.map((m) => [m.name, m.name]), defaultModel(models), { name: "model", id: `${p}-model` });
  const skillSel = h("select", { name: "skill", id: `${p}-skill` });
  const syncSkills = () => {
    const want = query.get("skill");
    const opts = [["", "none (base model only)"]];
    for (const a of adapters) opts.push(a.target === model.value ? [a.skill, `${a.skill}`] : [`${a.target}:${a.skill}`, `${a.target}:${a.skill} (cross-model)`]);
    replace(skillSel, opts.map(([v, l]) => h("option", { value: v, selected: v === want }, l)));
  };
  model.addEventListener("change", syncSkills);
  syncSkills();
  const parts = submitRow("Evaluate", "ev-submit");
  const form = h(
    "form",
    { class: "job-form", id: "form-eval", "aria-label": "Evaluate" },
    h("div", { class: "form-row" }, field("Model", model), field("With skill", skillSel, "pass@1 base vs skill"), field("Dataset", select(datasetOptions(datasets), datasets[0] && datasets[0].id, { name: "dataset", id: `${p}-dataset`, required: true }))),
    h(
      "fieldset",
      h("legend", "Protocol"),
      h(
        "div",
        { class: "form-row" },
        field("Samples", numberInput(p, "samples", EVAL_DEFAULTS.samples, { min: 1, max: 64 })),
        field("Limit", numberInput(p, "limit", "", { placeholder: "all questions", min: 1 })),
        field("Temperature", numberInput(p, "temperature", EVAL_DEFAULTS.temperature, { min: 0, max: 5 })),
        field("top_p", numberInput(p, "top_p", EVAL_DEFAULTS.top_p, { min: 0, max: 1 })),
        field("Max tokens", numberInput(p, "max_tokens", EVAL_DEFAULTS.max_tokens, { min: 1 })),
        field("Batch size", numberInput(p, "batch_size", EVAL_DEFAULTS.batch_size, { min: 1 })),
        field("Seed", numberInput(p, "seed", EVAL_DEFAULTS.seed)),
        field("Prompt format", select(["resa", "chat"], EVAL_DEFAULTS.prompt_format, { name: "prompt_format", id: `${p}-prompt-format` })),
      ),
    ),
    parts.slot,
    parts.row,
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = values(form);
    const body = { model: v.model, dataset: v.dataset, ...pick(v, ["skill", "samples", "limit", "temperature", "top_p", "max_tokens", "batch_size", "seed", "prompt_format"]) };
    submitJob(parts, async () => (await api.post("/evals", body)).job);
  });
  return form;
}

function datasetForm(rerender) {
  const file = h("input", { type: "file", id: "ds-file", name: "file", accept: ".jsonl,.ndjson,application/x-ndjson,application/jsonl", required: true });
  const slot = h("div", { class: "form-result", "aria-live": "polite" });
  const button = h("button", { type: "submit", id: "ds-submit" }, "Upload");
  const form = h(
    "form",
    { class: "job-form", id: "form-dataset", "aria-label": "Upload a dataset" },
    field("JSONL file", file, "one QA object per line: {\"question\": …, \"answer\": …} (question may be problem or prompt)"),
    slot,
    h("div", { class: "actions" }, button),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!file.files.length) return;
    button.disabled = true;
    replace(slot, loading("Uploading…"));
    try {
      const info = await request("POST", "/datasets", { body: file.files[0], contentType: "application/x-ndjson" });
      invalidate("/datasets");
      replace(slot, h("p", { class: "ok", id: "ds-result" }, `Stored ${num(info.rows)} rows as dataset `, h("code", info.id), ". The forms now list it."));
      rerender();
    } catch (err) {
      replace(slot, errorBox(err, "upload the dataset"));
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

// ---------------------------------------------------------------- tabs

function tabs(items, current, onChange) {
  const list = h("div", { class: "tabs", role: "tablist", "aria-label": "New job" });
  const panels = h("div", { class: "tab-panels" });
  const buttons = items.map((it, i) =>
    h("button", { type: "button", role: "tab", id: `tab-${it.key}`, "aria-controls": `panel-${it.key}`, "aria-selected": String(it.key === current), tabindex: it.key === current ? "0" : "-1", dataset: { key: it.key } }, it.label),
  );
  const show = (key, focus = false) => {
    buttons.forEach((b) => {
      const on = b.dataset.key === key;
      b.setAttribute("aria-selected", String(on));
      b.tabIndex = on ? 0 : -1;
      if (on && focus) b.focus();
    });
    const it = items.find((x) => x.key === key);
    replace(panels, h("div", { role: "tabpanel", id: `panel-${key}`, "aria-labelledby": `tab-${key}` }, it.render()));
    onChange(key);
  };
  buttons.forEach((b, i) => {
    b.addEventListener("click", () => show(b.dataset.key));
    b.addEventListener("keydown", (ev) => {
      const d = ev.key === "ArrowRight" ? 1 : ev.key === "ArrowLeft" ? -1 : 0;
      if (d) {
        ev.preventDefault();
        show(buttons[(i + d + buttons.length) % buttons.length].dataset.key, true);
      }
    });
  });
  list.append(...buttons);
  show(current);
  return h("div", list, panels);
}

// ---------------------------------------------------------------- the jobs page

function progressCell(job) {
  const p = job.progress || {};
  if (TERMINAL.has(job.state) && job.state !== "finished") return h("span", { class: "muted" }, job.error ? job.error.message.slice(0, 80) : "");
  const frac = p.total ? Math.min(1, p.step / p.total) : null;
  return h("span", { class: "progress-cell" }, p.stage ? h("span", p.stage) : null, frac !== null ? h("progress", { max: 1, value: job.state === "finished" ? 1 : frac, "aria-label": `${Math.round(frac * 100)}%` }) : null, p.total ? h("span", { class: "muted" }, ` ${p.step}/${p.total}`) : null);
}

function jobsTable(jobs) {
  if (!jobs.length) return h("p", { class: "muted" }, "No jobs yet.");
  return table(
    ["Job", "State and progress", "Skill / target"],
    jobs.map((j) =>
      h(
        "tr",
        { dataset: { job: j.id, state: j.state } },
        h(
          "th",
          { scope: "row" },
          link(`/jobs/${enc(j.id)}`, short(j.id, 8), { class: "job-link", "aria-label": `${KIND_LABEL[j.kind] || j.kind} job ${short(j.id, 8)}` }),
          h("div", { class: "muted job-kind", title: `created ${when(j.created_at)}` }, KIND_LABEL[j.kind] || j.kind),
        ),
        h("td", stateBadge(j.state), j.status === "deferred" ? h("span", { class: "muted" }, " waiting") : null, h("div", progressCell(j))),
        h("td", [j.skill, j.target].filter(Boolean).join(" → ") || "—"),
      ),
    ),
    { class: "jobs-table" },
  );
}

export async function jobsPage(root, { query, signal }) {
  replace(root, h("div", { class: "page-head" }, h("h1", "Jobs")), loading());
  let ctx;
  try {
    const [models, datasets, skills, adapters] = await Promise.all([listModels(), listDatasets(), listSkills(), api.get("/adapters", { signal })]);
    ctx = { models, datasets, skills, adapters: adapters.adapters };
  } catch (err) {
    if (err.name === "AbortError") return;
    replace(root, h("div", { class: "page-head" }, h("h1", "Jobs")), errorBox(err, "load the forms' choices"));
  }
  if (signal.aborted) return;
  const listSlot = h("div", { class: "jobs-list", "aria-live": "polite" }, loading("Loading jobs…"));
  let current = ["extract", "adapter", "eval", "dataset"].includes(query.get("form")) ? query.get("form") : "extract";
  const formSlot = h("div");
  const rerender = async () => {
    invalidate("/datasets");
    try {
      ctx.datasets = await listDatasets();
    } catch {
      /* the upload worked; the list refreshes next time */
    }
  };
  if (ctx)
    replace(
      formSlot,
      tabs(
        [
          { key: "extract", label: "Extract a skill", render: () => extractForm(ctx) },
          { key: "adapter", label: "Build an adapter", render: () => adapterForm(ctx, query) },
          { key: "eval", label: "Evaluate", render: () => evalForm(ctx, query) },
          { key: "dataset", label: "Upload a dataset", render: () => datasetForm(rerender) },
        ],
        current,
        (key) => {
          current = key;
          const q = new URLSearchParams(query);
          q.set("form", key);
          history.replaceState(null, "", `#/jobs?${q}`);
        },
      ),
    );
  const refresh = async () => {
    try {
      const res = await api.get(`/jobs${qs({ limit: 50 })}`, { signal });
      replace(listSlot, jobsTable(res.jobs));
      return res.jobs.some((j) => !TERMINAL.has(j.state));
    } catch (err) {
      if (err.name !== "AbortError") replace(listSlot, errorBox(err, "list jobs"));
      return false;
    }
  };
  const refreshButton = h("button", { type: "button", class: "small secondary", id: "jobs-refresh", on: { click: refresh } }, "Refresh");
  if (!ctx) root.append(h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", "Jobs"), refreshButton), listSlot));
  else
    replace(
      root,
      h("div", { class: "page-head" }, h("h1", "Jobs"), h("p", { class: "muted" }, "Long work runs as background jobs on the workers; follow one for live progress.")),
      h("div", { class: "grid jobs-grid" }, h("section", { class: "panel", "aria-labelledby": "new-job" }, h("h2", { id: "new-job" }, "New job"), formSlot), h("section", { class: "panel", "aria-labelledby": "jobs-title" }, h("div", { class: "panel-head" }, h("h2", { id: "jobs-title" }, "Recent jobs"), refreshButton), listSlot)),
    );
  // poll while something runs (every 3 s), more slowly otherwise
  (async () => {
    while (!signal.aborted) {
      const active = await refresh();
      await new Promise((r) => setTimeout(r, active ? 3000 : 10000));
    }
  })();
}

// ---------------------------------------------------------------- one job

function metricRows(metrics) {
  return Object.keys(metrics || {}).map((k) => [k, h("span", { class: "num", dataset: { metric: k } }, num(metrics[k], 4))]);
}

/** Why a job failed or was canceled, in the job's own words. */
function jobErrorBox(view) {
  const e = view.error || {};
  return h(
    "div",
    { class: "error", role: "alert" },
    h("strong", view.state === "canceled" ? "Canceled: " : "Failed: "),
    h("span", { class: "error-message" }, e.message || "no reason given"),
    e.type ? h("span", { class: "error-meta" }, " (", h("code", e.type), ")") : null,
  );
}

function resultReport(job) {
  const r = job.result || {};
  if (job.kind === "extract" && r.manifest) {
    const m = r.manifest;
    const rows = (m.layers || []).map((l) => ({ layer: l, ...(m.metrics || {})[String(l)] }));
    return h(
      "div",
      { class: "result", id: "job-result" },
      h("p", "Skill ", link(`/skills/${enc(r.skill)}`, r.skill, { class: "skill-link", id: "result-skill" }), ` extracted from ${m.source ? m.source.model : "?"}: ${num(m.tokens_seen)} tokens in ${duration(m.wall_s)}.`),
      layerReportChart(rows, { defaultLayer: m.default_layer }),
    );
  }
  if (job.kind === "tune" && r.adapter) {
    const m = r.manifest || {};
    return h(
      "div",
      { class: "result", id: "job-result" },
      h("p", "Adapter for ", h("strong", r.adapter.target), " from skill ", link(`/skills/${enc(r.adapter.skill)}`, r.adapter.skill), "."),
      kv([
        ["Objective", m.objective],
        ["Layer", m.layer],
        ["Steps", m.train ? num(m.train.steps) : "—"],
        ["KL start → end", m.kl_start !== undefined ? `${num(m.kl_start, 4)} → ${num(m.kl_end, 4)}` : "—"],
        ["Loss first → last", m.loss_first !== undefined ? `${num(m.loss_first, 4)} → ${num(m.loss_last, 4)}` : "—"],
        ["Wall time", duration(m.wall_s)],
      ]),
      h("p", link(`/playground?model=${enc(r.adapter.target)}`, "Try it in the playground")),
    );
  }
  if (job.kind === "eval" && (r.base || r.skill)) {
    const rows = [["base", r.base], ["skill", r.skill], ["source", r.source]].filter(([, v]) => v);
    return h(
      "div",
      { class: "result", id: "job-result" },
      table(
        ["Run", "Model", "Adapter", "pass@1", "95% interval", "Correct", "Questions"],
        rows.map(([label, v]) =>
          h("tr", h("th", { scope: "row" }, label), h("td", v.model), h("td", v.adapter || "—"), h("td", { class: "num" }, pct(v.accuracy)), h("td", { class: "num" }, v.ci95 ? `[${pct(v.ci95[0])}, ${pct(v.ci95[1])}]` : "—"), h("td", { class: "num" }, `${v.correct}/${v.total}`), h("td", { class: "num" }, v.questions)),
        ),
      ),
      kv([
        ["Δ skill − base", r.delta !== undefined && r.delta !== null ? pct(r.delta) : "—"],
        ["Retention", r.retention !== undefined && r.retention !== null ? pct(r.retention) : "—"],
        ["Dataset", r.dataset ? `${short(r.dataset.sha256)} · ${r.dataset.evaluated} of ${r.dataset.rows} questions` : "—"],
        ["Protocol", r.protocol ? `${r.protocol.samples} samples, T ${r.protocol.temperature}, top_p ${r.protocol.top_p}, ${r.protocol.max_tokens} tokens, ${r.protocol.prompt_format}` : "—"],
      ]),
      r.questions && r.questions.length
        ? h(
            "details",
            h("summary", `Questions (${r.questions.length})`),
            table(["Question", "Answer", "Base", "Skill"], r.questions.map((q) => h("tr", h("td", q.question), h("td", q.answer), h("td", q.base ? pct(q.base.pass_rate) : "—"), h("td", q.skill ? pct(q.skill.pass_rate) : "—")))),
          )
        : null,
    );
  }
  return h("pre", { class: "json", id: "job-result" }, JSON.stringify(r, null, 2));
}

export async function jobPage(root, { params, signal }) {
  const id = params.id;
  const crumbs = h("p", { class: "crumbs" }, link("/jobs", "Jobs"), " / ");
  replace(root, h("div", { class: "page-head" }, crumbs, h("h1", `Job ${short(id, 8)}`)), loading("Loading job…"));
  let job;
  try {
    job = await api.get(`/jobs/${enc(id)}`, { signal });
  } catch (err) {
    if (err.name === "AbortError") return;
    replace(root, h("div", { class: "page-head" }, crumbs, h("h1", `Job ${short(id, 8)}`)), errorBox(err, "load the job"));
    return;
  }
  const title = h("h1");
  const stateSlot = h("span", { id: "job-state" });
  const progress = h("section", { class: "panel", "aria-labelledby": "progress-title", id: "job-progress" });
  const resultSlot = h("section", { class: "panel span-all", "aria-labelledby": "result-title", hidden: true });
  const infoSlot = h("section", { class: "panel", "aria-labelledby": "info-title" });
  const cancel = h("button", { type: "button", class: "danger", id: "job-cancel" }, "Cancel job");
  const cancelSlot = h("div", { class: "form-error" });
  const losses = [];
  const stages = [];
  let events = 0;

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    replace(cancelSlot);
    try {
      const view = await api.del(`/jobs/${enc(id)}`);
      update(view);
      toast(TERMINAL.has(view.state) ? "Job canceled." : "Cancel requested: the job stops at its next step.");
    } catch (err) {
      replace(cancelSlot, errorBox(err, "cancel the job"));
      cancel.disabled = TERMINAL.has(job.state);
    }
  });

  function update(view) {
    job = view;
    const p = view.progress || {};
    if (p.stage && stages[stages.length - 1] !== p.stage) stages.push(p.stage);
    const loss = p.metrics && (p.metrics.loss ?? p.metrics.fvu);
    if (typeof loss === "number" && view.state === "started") losses.push(loss);
    replace(title, `${KIND_LABEL[view.kind] || view.kind} `, h("span", { class: "muted h-sub" }, short(view.id, 8)), " ", stateSlot);
    replace(stateSlot, stateBadge(view.state));
    stateSlot.dataset.state = view.state;
    cancel.disabled = TERMINAL.has(view.state);
    const frac = p.total ? Math.min(1, p.step / p.total) : null;
    replace(
      progress,
      h("div", { class: "panel-head" }, h("h2", { id: "progress-title" }, "Progress"), TERMINAL.has(view.state) ? null : cancel),
      cancelSlot,
      h(
        "div",
        { class: "progress-big" },
        h("progress", { max: 1, value: view.state === "finished" ? 1 : frac ?? 0, id: "job-progressbar", "aria-label": "job progress" }),
        h("span", { class: "pct" }, view.state === "finished" ? "100%" : frac !== null ? `${Math.round(frac * 100)}%` : view.state === "queued" ? "queued" : "—"),
      ),
      kv([
        ["Stage", h("span", { id: "job-stage" }, p.stage || (view.status === "deferred" ? "waiting for its parent job" : "—"))],
        ["Step", h("span", { id: "job-step" }, p.total ? `${num(p.step)} / ${num(p.total)}` : num(p.step))],
        ["ETA", TERMINAL.has(view.state) ? "—" : duration(p.eta_s)],
        ["Stages seen", stages.join(" → ") || "—"],
        ...metricRows(p.metrics),
      ]),
      losses.length > 1 ? h("figure", { class: "panel-chart" }, h("figcaption", h("strong", "Loss"), h("span", { class: "muted" }, " during this view")), sparkline(losses, { title: "loss" })) : null,
      view.error ? jobErrorBox(view) : null,
    );
    progress.dataset.events = String(events);
    progress.dataset.stages = stages.join(",");
    replace(
      infoSlot,
      h("h2", { id: "info-title" }, "Details"),
      kv([
        ["Id", h("code", view.id)],
        ["Kind", KIND_LABEL[view.kind] || view.kind],
        ["Skill", view.skill ? link(`/skills/${enc(view.skill)}`, view.skill) : "—"],
        ["Target", view.target],
        ["Created", when(view.created_at)],
        ["Started", when(view.started_at)],
        ["Ended", when(view.ended_at)],
        ["Waits on", view.depends_on.length ? view.depends_on.map((d) => link(`/jobs/${enc(d)}`, short(d, 8))) : "—"],
        ["Followed by", view.dependents.length ? view.dependents.map((d, i) => [i ? ", " : "", link(`/jobs/${enc(d)}`, short(d, 8))]) : "—"],
        ["Worker", view.worker ? short(view.worker, 12) : "—"],
      ]),
      view.params ? h("details", h("summary", "Request"), h("pre", { class: "json" }, JSON.stringify(view.params, null, 2))) : null,
    );
    if (view.state === "finished") {
      resultSlot.hidden = false;
      replace(resultSlot, h("h2", { id: "result-title" }, "Result"), resultReport(view));
    }
  }

  update(job);
  replace(root, h("div", { class: "page-head" }, crumbs, title), h("div", { class: "grid job-grid" }, progress, infoSlot, resultSlot));
  if (TERMINAL.has(job.state)) return;

  // Follow the event stream; if it drops before the end, poll.
  try {
    for await (const ev of sse("GET", `/jobs/${enc(id)}/events`, { signal })) {
      if (ev.event === "error") {
        const e = JSON.parse(ev.data).error || {};
        throw new ApiError(503, e.type || "unavailable", e.message || "the job stream failed");
      }
      events += 1;
      update(JSON.parse(ev.data));
      if (ev.event === "end") return;
    }
  } catch (err) {
    if (err.name === "AbortError") return;
    progress.append(errorBox(err, "follow the job's events (polling instead)"));
  }
  while (!signal.aborted && !TERMINAL.has(job.state)) {
    await new Promise((r) => setTimeout(r, 2000));
    try {
      update(await api.get(`/jobs/${enc(id)}`, { signal }));
    } catch (err) {
      if (err.name === "AbortError") return;
    }
  }
}
