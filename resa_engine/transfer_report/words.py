"""Numbers as words: formatting, the effect of a paired difference, and the verdict's sentences
(computed from the numbers alone; nothing in them is written in advance)."""

from __future__ import annotations

from .arms import CONTRASTS


def num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def signed(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}".replace("-", "\u2212")


def interval(ci, with_sign: bool = False) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "[n/a]"
    f = signed if with_sign else num
    return f"[{f(ci[0])}, {f(ci[1])}]"


def p_text(p: float | None) -> str:
    if p is None:
        return "p n/a"
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.2f}" if p >= 0.01 else f"p = {p:.3f}"


def p_cell(p: float | None) -> str:
    return "" if p is None else p_text(p).removeprefix("p = ").removeprefix("p ")


def effect(ci, p: float | None) -> str:
    """`better`, `worse`, `none` (no measurable effect) or `borderline` (the 95% interval and McNemar's test
    disagree) for a paired difference; `unknown` without an interval or a p-value."""
    has_ci = bool(ci) and ci[0] is not None and ci[1] is not None
    if not has_ci and p is None:
        return "unknown"
    excludes = has_ci and (ci[0] > 0 or ci[1] < 0)
    direction = ("better" if ci[0] > 0 else "worse") if excludes else None
    if p is None:
        return direction or "none"
    significant = p < 0.05
    if not has_ci:
        return "significant" if significant else "none"
    if excludes and significant:
        return direction
    if not excludes and not significant:
        return "none"
    return "borderline"


_VS_BASE = {
    "better": "better than the base",
    "worse": "worse than the base",
    "none": "indistinguishable from no effect at this sample size",
    "borderline": "borderline: the 95% paired interval and McNemar's test disagree",
    "significant": "a significant difference from the base (McNemar)",
    "unknown": "no paired test is available",
}


def _difference_of(subject: str) -> str:
    """ "Resa's difference", or "The difference of Resa with the SAE kept" where a possessive reads badly."""
    if any(t in subject for t in (" with ", ",", "=")):
        return f"The difference of {subject}"
    return f"{_cap(subject)}'s difference"


def verdict(report: dict) -> list[str]:
    """Plain sentences of what the run shows, computed from the report's numbers only."""
    out: list[str] = []
    ev = report.get("evaluation")
    if ev is None:
        out.append("No evaluation of this pair is recorded: the report shows the skill, the adapter and its transfer diagnostics only.")
    else:
        out += _arm_sentences(ev)
    out += _diagnostic_sentences(report)
    return out


def _arm_sentences(ev: dict) -> list[str]:
    out = []
    arms = {a["label"]: a for a in ev["arms"]}
    if ev.get("base") is None:
        out.append("No base arm was evaluated, so no arm can be paired with the base.")
    for a in ev["arms"]:
        if a["label"] == ev.get("base") or a.get("diff_vs_base") is None:
            continue
        kind = effect(a.get("diff_ci95"), a.get("mcnemar_p"))
        out.append(
            f"{_difference_of(a['subject'])} from the base is {signed(a['diff_vs_base'])} {interval(a.get('diff_ci95'), True)}, "
            f"{p_text(a.get('mcnemar_p'))} (n = {a.get('n')}): {_VS_BASE[kind]}."
        )
    for a in ev["arms"]:
        if a["label"] in ("base", "source"):
            continue
        ret = a.get("retention")
        if ret is None:
            if a["label"] == "skill" and ev.get("base") is not None and "source" not in arms:
                out.append("Retention of the source's gain is undefined: no source arm was evaluated.")
            continue
        if ret.get("defined"):
            ci = interval(ret.get("ci95"))
            out.append(f"{_cap(a['subject'])} keeps {num(ret.get('value'), 2)} of the source's gain over the base (95% interval {ci}).")
        else:
            out.append(f"Retention of the source's gain by {a['subject']} is undefined: {ret.get('reason') or 'no reason recorded'}.")
    for c in ev.get("contrasts") or []:
        out.append(_contrast_sentence(c, arms))
    return out


def _contrast_sentence(c: dict, arms: dict) -> str:
    spec = next(s for s in CONTRASTS if s[0] == c["a"] and s[1] == c["b"])
    better, worse, none = spec[3], spec[4], spec[5]
    head = f"{_cap(arms[c['a']]['subject'])} vs {arms[c['b']]['subject']}"
    if not c["paired"]:
        return (f"{head}: pass@1 {num(c['acc_a'])} vs {num(c['acc_b'])}; without per-question results the two cannot be paired, "
                f"so no test is made ({spec[2]}).")  # fmt: skip
    kind = effect(c["ci95"], c["mcnemar_p"])
    reading = {"better": better, "worse": worse, "none": none}.get(kind, _VS_BASE[kind].replace(" from the base", ""))
    return f"{head}: {signed(c['diff'])} {interval(c['ci95'], True)}, {p_text(c['mcnemar_p'])}, paired on the same questions: {reading}."


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _diagnostic_sentences(report: dict) -> list[str]:
    t = report.get("transfer")
    if not isinstance(t, dict):
        return ["The adapter's manifest records no transfer diagnostics."]
    out = []
    skill = report.get("skill") or {}
    if (report.get("adapter") or {}).get("random_sae"):  # the control was tuned, and measured, against an untrained SAE
        skill, whose = {}, "the untrained control SAE"
    else:
        whose = "the skill's SAE"
    parts = []
    if t.get("target_fvu") is not None:
        src = f" ({num(skill['fvu_source'])} on the source)" if skill.get("fvu_source") is not None else ""
        parts.append(f"has FVU {num(t['target_fvu'])}{src}")
    if t.get("target_loss_recovered") is not None:
        src = f" ({num(skill['loss_recovered_source'])} on the source)" if skill.get("loss_recovered_source") is not None else ""
        parts.append(f"recovers {num(t['target_loss_recovered'])} of the next-token loss{src}")
    elif "target_loss_recovered" in t:
        parts.append("has no defined loss recovered (clean and zero-ablated losses coincide)")
    if parts:
        out.append(f"On the target's own activations at layer {t.get('layer')} {whose} {' and '.join(parts)}.")
    before, after = t.get("kl_heldout_before"), t.get("kl_heldout_after")
    if before is not None and after is not None:
        if after == before:
            out.append(f"Held-out KL(base \u2016 student) stayed at {num(before)} nats per token through tuning.")
        else:
            verb = "fell" if after < before else "rose"
            pct = f" ({signed(100 * (after - before) / before, 0)}%)" if before > 0 else ""
            out.append(f"Held-out KL(base \u2016 student) {verb} from {num(before)} to {num(after)} nats per token with tuning{pct}.")
    l2 = {int(k): v for k, v in (t.get("residual_delta_l2") or {}).items() if v is not None}
    rel = {int(k): v for k, v in (t.get("residual_delta_rel") or {}).items() if v is not None}
    if l2:
        top = max(l2, key=lambda i: l2[i])
        share = f", {100 * rel[top]:.1f}% of \u2016h\u2016" if top in rel else ""
        if l2[top] > 0:
            out.append(f"The adapter moves the residual stream most at layer {top}: mean \u2016\u0394h\u2016 = {l2[top]:.3g}{share}.")
        still = sorted(i for i, v in l2.items() if v == 0)
        if still and len(still) < len(l2):
            out.append(f"Layer(s) {', '.join(map(str, still))} are exactly unchanged by the adapter (\u0394h = 0).")
        elif len(still) == len(l2):
            out.append("The adapter leaves the residual stream exactly unchanged at every layer (\u0394h = 0).")
    return out
