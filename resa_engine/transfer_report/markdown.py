"""The report as markdown: verdict, arms with paired differences, contrasts, diagnostics, settings, compute."""

from __future__ import annotations

from .words import interval, num, p_cell, signed


def _cell(x) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    return str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") if isinstance(c, str) else _cell(c) for c in row) + " |" for row in rows]
    return lines


def _settings(values: dict) -> list[str]:
    """A setting/value table of what is recorded (unrecorded settings are left out)."""
    return _table(["setting", "value"], [[k, v] for k, v in values.items() if v is not None])


def _retention_cell(ret: dict | None) -> str:
    if ret is None:
        return ""
    if ret.get("defined"):
        return f"{num(ret.get('value'), 2)} {interval(ret.get('ci95'))}"
    return f"undefined ({ret.get('reason') or 'no reason recorded'})"


def to_markdown(report: dict) -> str:
    """The report as markdown: the verdict first, then the arms, contrasts, diagnostics, stages and settings."""
    skill, adapter = report.get("skill") or {}, report.get("adapter") or {}
    lines = [f"# Transfer report: skill `{skill.get('name')}` \u2192 `{adapter.get('target')}`", ""]
    src = f"`{skill.get('source_model')}`" + (f" + adapter `{skill['source_adapter']}`" if skill.get("source_adapter") else "")
    method = f" ({report['source_method_description'] or report['source_method']})" if report.get("source_method") else ""
    lines += [f"Source: {src}{method}; SAE at the output of decoder block {skill.get('layer')}.", ""]
    if report.get("chart"):
        lines += [f"![pass@1 per arm and paired differences]({report['chart']})", ""]
    lines += ["## Verdict", ""] + [f"- {s}" for s in report.get("verdict") or []] + [""]

    ev = report.get("evaluation")
    if ev is not None:
        lines += ["## Pass@1 per arm", ""]
        rows = []
        for a in ev["arms"]:
            is_base = a["label"] == ev.get("base")
            rows.append([
                f"`{a['label']}`", a["description"], f"{num(a['acc'])} {interval(a.get('ci95'))}",
                "" if is_base or a.get("diff_vs_base") is None else f"{signed(a['diff_vs_base'])} {interval(a.get('diff_ci95'), True)}",
                p_cell(a.get("mcnemar_p")),
                _retention_cell(a.get("retention")), a.get("n"),
            ])  # fmt: skip
        lines += _table(["arm", "what it is", "pass@1 [95% CI]", "diff vs base [95% paired CI]", "McNemar p", "retention", "n"], rows)
        lines += ["", "pass@1: mean correctness over all (question, sample) pairs, Wilson 95% interval; differences: paired bootstrap "
                      "over questions, exact McNemar test; retention = (arm \u2212 base) / (source \u2212 base), only when the source's "
                      "gain is clearly non-zero.", ""]  # fmt: skip
        if ev.get("contrasts"):
            lines += ["### Head to head", ""]
            rows = [[f"`{c['a']}` \u2212 `{c['b']}`", c["question"], f"{num(c['acc_a'])} vs {num(c['acc_b'])}",
                     f"{signed(c['diff'])} {interval(c['ci95'], True)}" if c["paired"] else f"{signed(c['diff'])} (unpaired)",
                     p_cell(c["mcnemar_p"])] for c in ev["contrasts"]]  # fmt: skip
            lines += _table(["contrast", "asks", "pass@1", "difference [95% paired CI]", "McNemar p"], rows) + [""]

    lines += ["## Transfer diagnostics", ""]
    t = report.get("transfer")
    if isinstance(t, dict):
        rows = [
            ["FVU of the skill's SAE (content positions)", t.get("target_fvu"), skill.get("fvu_source")],
            ["loss recovered with the SAE spliced in", t.get("target_loss_recovered"), skill.get("loss_recovered_source")],
            ["KL(clean \u2016 spliced), nats per predicted token", t.get("target_kl_spliced"), skill.get("kl_source")],
            ["held-out KL(base \u2016 student), nats per token, fresh adapter", t.get("kl_heldout_before"), None],
            ["held-out KL(base \u2016 student), nats per token, after tuning", t.get("kl_heldout_after"), None],
            ["held-out tokens (content positions)", f"{_cell(t.get('heldout_tokens'))} ({_cell(t.get('content_tokens'))})", None],
        ]
        lines += _table(["quantity", "on the target", "on the source"], rows) + [""]
        l2, rel = t.get("residual_delta_l2") or {}, t.get("residual_delta_rel") or {}
        if l2:
            lines += ["Residual-stream change the adapter makes at each block's output (no SAE), mean over held-out content tokens:", ""]
            rows = [[str(k), l2[k], rel.get(k)] for k in sorted(l2, key=int)]
            lines += _table(["layer", "mean \u2016\u0394h\u2016", "mean \u2016\u0394h\u2016 / \u2016h\u2016"], rows) + [""]
    else:
        lines += ["The adapter's manifest records no transfer diagnostics.", ""]

    lines += ["## Stages and compute", ""]
    rows = [[s["name"], "" if s.get("wall_s") is None else f"{s['wall_s']:.1f}", s.get("compute") or ""] for s in report.get("stages") or []]
    if report.get("total_wall_s") is not None:
        rows.append(["total", f"{report['total_wall_s']:.1f}", ""])
    lines += _table(["stage", "wall s", "compute"], rows) + [""]

    lines += ["## Settings", "", "### Skill (Stage I)", ""]
    lines += _settings(skill) + ["", "### Adapter (Stage II)", ""] + _settings(adapter) + [""]
    if report.get("protocol"):
        lines += ["### Evaluation protocol", ""] + _settings(report["protocol"]) + [""]
    return "\n".join(lines)
