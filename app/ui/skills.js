// #/skills (the list) and #/skills/<name> (provenance, the layer report chart, adapters, latents).

import { api, blob, qs } from "./api.js";
import { layerReportChart } from "./charts.js";
import { enc, errorBox, loading, skills as listSkills } from "./common.js";
import { badge, duration, h, kv, link, num, pct, replace, short, table, when } from "./dom.js";
import { latentBrowser } from "./latents.js";

function defaultMetrics(manifest) {
  const m = manifest.metrics || {};
  return m[String(manifest.default_layer)] || {};
}

function sourceText(manifest) {
  const src = manifest.source || {};
  return [h("span", { class: "model" }, src.model || "—"), src.adapter ? [" + ", h("span", { class: "adapter" }, src.adapter)] : null];
}

function layersText(manifest) {
  return (manifest.layers || []).map((l, i) => [i ? ", " : "", Number(l) === Number(manifest.default_layer) ? h("strong", { title: "default layer" }, `${l}★`) : String(l)]);
}

export async function skillsPage(root, { signal }) {
  replace(root, h("div", { class: "page-head" }, h("h1", "Skills")), loading("Loading skills…"));
  let list;
  try {
    list = await listSkills();
  } catch (err) {
    replace(root, h("div", { class: "page-head" }, h("h1", "Skills")), errorBox(err, "list skills"));
    return;
  }
  if (signal.aborted) return;
  const head = h(
    "div",
    { class: "page-head" },
    h("h1", "Skills"),
    h("p", { class: "muted" }, "Skills extracted from source models: an SAE per layer, with its quality metrics and reasoning features."),
    h("div", { class: "actions" }, link("/jobs?form=extract", "Extract a skill", { class: "button" })),
  );
  if (!list.length) {
    replace(root, head, h("div", { class: "panel empty" }, h("p", "No skills yet. ", link("/jobs?form=extract", "Extract one from the Jobs page"), ".")));
    return;
  }
  const rows = list.map((s) => {
    const m = s.manifest || {};
    const dm = defaultMetrics(m);
    const ds = m.dataset || {};
    return h(
      "tr",
      { dataset: { skill: s.name } },
      h("th", { scope: "row" }, link(`/skills/${enc(s.name)}`, s.name, { class: "skill-link" })),
      h("td", sourceText(m)),
      h("td", layersText(m)),
      h("td", ds.sha256 ? [h("code", { title: ds.sha256 }, short(ds.sha256)), h("span", { class: "muted" }, ` ${num(ds.rows)} rows`)] : "—"),
      h("td", { class: "num" }, m.sae ? `${num(m.sae.num_latents)} · k ${m.sae.k}` : "—"),
      h("td", { class: "num" }, num(dm.fvu)),
      h("td", { class: "num" }, num(dm.loss_recovered)),
      h("td", { class: "num" }, pct(dm.dead_fraction)),
      h("td", { class: "num" }, dm.reasoning_features ?? "—"),
      h("td", s.adapters.length ? s.adapters.map((t) => badge(t, "adapter")) : h("span", { class: "muted" }, "none")),
    );
  });
  replace(
    root,
    head,
    h(
      "section",
      { class: "panel" },
      table(["Skill", "Source (model + adapter)", "Layers", "Dataset", "SAE", "FVU", "Loss rec.", "Dead", "Reasoning", "Adapters"], rows, { class: "skills-table", "aria-describedby": "skills-note" }),
      h("p", { class: "note", id: "skills-note" }, "Metrics are the default layer's (★), on held-out data."),
    ),
  );
}

function provenance(info) {
  const m = info.manifest || {};
  const ds = m.dataset || {};
  const sae = m.sae || {};
  const src = m.source || {};
  return h(
    "section",
    { class: "panel", "aria-labelledby": "prov-title" },
    h("h2", { id: "prov-title" }, "Provenance"),
    kv([
      ["Source model", src.model],
      ["Source adapter", src.adapter || "none"],
      ["Layers", layersText(m)],
      ["Hookpoint", m.hookpoint],
      ["SAE", sae.num_latents ? `${num(sae.num_latents)} latents, k ${sae.k}, ×${num(sae.expansion_factor)} of d_in ${m.d_in}` : "—"],
      ["Dataset", ds.sha256 ? [h("code", { title: ds.sha256 }, short(ds.sha256, 16)), ` · ${num(ds.rows)} rows (${num(ds.train_rows)} train, ${num(ds.heldout_rows)} held out)`] : "—"],
      ["Training", m.train ? `${num(m.tokens_seen)} tokens, ${num(m.train.steps)} steps, lr ${num(m.train.lr)}, chunk ${num(m.train.chunk_len)}` : "—"],
      ["Wall time", duration(m.wall_s)],
      ["Created", when(m.created_at)],
      m.job_id ? ["Job", link(`/jobs/${enc(m.job_id)}`, short(m.job_id, 8))] : null,
    ]),
  );
}

function reportTable(rows, metrics, defaultLayer) {
  return table(
    ["Layer", "FVU", "Loss recovered", "Dead", "Reasoning features", "L0", "KL"],
    rows.map((r) => {
      const m = metrics[String(r.layer)] || {};
      return h(
        "tr",
        h("th", { scope: "row" }, Number(r.layer) === Number(defaultLayer) ? `${r.layer} ★` : String(r.layer)),
        h("td", { class: "num" }, num(r.fvu)),
        h("td", { class: "num" }, num(r.loss_recovered)),
        h("td", { class: "num" }, pct(r.dead_fraction)),
        h("td", { class: "num" }, r.reasoning_features ?? "—"),
        h("td", { class: "num" }, num(m.l0, 1)),
        h("td", { class: "num" }, num(m.kl)),
      );
    }),
    { class: "report-table" },
  );
}

function adaptersPanel(adapters) {
  if (!adapters.length) return h("p", { class: "muted" }, "No adapters yet.");
  return h(
    "ul",
    { class: "adapter-list" },
    adapters.map((a) => {
      const m = a.manifest || {};
      const t = m.train || {};
      return h(
        "li",
        { dataset: { target: a.target } },
        h("div", { class: "adapter-head" }, h("strong", a.target), " ", m.objective ? badge(m.objective) : null, h("span", { class: "muted" }, ` layer ${m.layer ?? "—"} · ${when(m.created_at)}`)),
        h(
          "div",
          { class: "muted adapter-meta" },
          `${num(t.steps)} steps · lr ${num(t.lr)} · LoRA r ${m.lora ? m.lora.r : "—"}`,
          m.kl_start !== undefined ? ` · KL ${num(m.kl_start, 4)} → ${num(m.kl_end, 4)}` : "",
        ),
        h("div", { class: "actions" }, link(`/playground${qs({ model: a.target, skill: a.skill })}`, "Generate with it", { class: "small button secondary" })),
      );
    }),
  );
}

function parseState(query, manifest) {
  const layers = (manifest.layers || []).map(Number);
  let layer = Number(query.get("layer"));
  if (!layers.includes(layer)) layer = Number(manifest.default_layer ?? layers[0]);
  const sort = ["density", "density-asc", "index"].includes(query.get("sort")) ? query.get("sort") : "density";
  return { layer, sort, q: query.get("q") || "", page: Math.max(0, Number(query.get("page")) || 0) };
}

export async function skillPage(root, { params, query, signal }) {
  const name = params.name;
  replace(root, h("div", { class: "page-head" }, h("p", { class: "crumbs" }, link("/skills", "Skills"), " / "), h("h1", name)), loading("Loading skill…"));
  let info;
  let report;
  let adapters;
  try {
    [info, report, adapters] = await Promise.all([
      api.get(`/skills/${enc(name)}`, { signal }),
      api.get(`/skills/${enc(name)}/report`, { signal }),
      api.get(`/adapters${qs({ skill: name })}`, { signal }),
    ]);
  } catch (err) {
    if (err.name === "AbortError") return;
    replace(root, h("div", { class: "page-head" }, h("p", { class: "crumbs" }, link("/skills", "Skills"), " / "), h("h1", name)), errorBox(err, `load skill “${name}”`));
    return;
  }
  const m = info.manifest || {};
  let state = parseState(query, m);
  const chartSlot = h("div", { class: "chart-slot" });
  const browser = latentBrowser(info, state, (next) => {
    state = next;
    const q = qs({ layer: state.layer, sort: state.sort === "density" ? "" : state.sort, q: state.q, page: state.page || "" });
    history.replaceState(null, "", `#/skills/${enc(name)}${q}`);
    chartSlot.querySelectorAll(".bar").forEach((b) => b.classList.toggle("is-selected", Number(b.dataset.layer) === Number(state.layer)));
  });
  const selectLayer = (layer) => {
    const sel = browser.querySelector("#lb-layer");
    sel.value = String(layer);
    sel.dispatchEvent(new Event("change"));
    browser.scrollIntoView({ behavior: "smooth", block: "start" });
  };
  replace(chartSlot, layerReportChart(report.layers, { defaultLayer: report.default_layer, selected: state.layer, onSelect: selectLayer }));

  const pngButton = h("button", { type: "button", class: "small secondary" }, "Download PNG");
  pngButton.addEventListener("click", async () => {
    try {
      const png = await blob(`/skills/${enc(name)}/report?format=png`);
      const a = h("a", { href: URL.createObjectURL(png), download: `${name}-report.png` });
      document.body.append(a);
      a.click();
      setTimeout(() => {
        URL.revokeObjectURL(a.href);
        a.remove();
      }, 1000);
    } catch (err) {
      pngButton.after(errorBox(err, "download the report"));
    }
  });

  replace(
    root,
    h(
      "div",
      { class: "page-head" },
      h("p", { class: "crumbs" }, link("/skills", "Skills"), " / "),
      h("h1", name, " ", m.source ? h("span", { class: "muted h-sub" }, `from ${m.source.model}${m.source.adapter ? ` + ${m.source.adapter}` : ""}`) : null),
      h(
        "div",
        { class: "actions" },
        link(`/inspect${qs({ skill: name })}`, "Inspect a prompt", { class: "button" }),
        link(`/playground${qs({ sae: name })}`, "Steer in the playground", { class: "button secondary" }),
        link(`/jobs${qs({ form: "adapter", skill: name })}`, "Build an adapter", { class: "button secondary" }),
        link(`/jobs${qs({ form: "eval", skill: name })}`, "Evaluate", { class: "button secondary" }),
      ),
    ),
    h(
      "div",
      { class: "grid skill-grid" },
      h(
        "section",
        { class: "panel span-2", "aria-labelledby": "report-title" },
        h("div", { class: "panel-head" }, h("h2", { id: "report-title" }, "Layer report"), h("span", { class: "muted" }, "Click a bar to browse that layer's latents."), pngButton),
        chartSlot,
        h("details", { class: "report-details" }, h("summary", "Report as a table"), reportTable(report.layers, m.metrics || {}, report.default_layer)),
      ),
      provenance(info),
      h("section", { class: "panel", "aria-labelledby": "adapters-title" }, h("h2", { id: "adapters-title" }, "Adapters"), adaptersPanel(adapters.adapters || [])),
      h("div", { class: "span-all" }, browser),
    ),
  );
}
