"""The report as a chart: pass@1 per arm with intervals, and each arm's paired difference from the base."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from .arms import COLORS
from .words import num


def render_chart(report: dict, path: Path | str, fmt: Literal["png", "svg"] = "png") -> Path:
    """Two panels: pass@1 per arm with 95% intervals, and each arm's paired difference from the base with its
    interval and a zero line. A bare Figure on the Agg canvas (no pyplot state); SVG text stays text."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if fmt not in ("png", "svg"):
        raise ValueError(f"fmt must be png or svg, got {fmt!r}")
    ev = report.get("evaluation")
    if not ev or not ev.get("arms"):
        raise ValueError("report has no evaluation to draw")
    arms = ev["arms"]
    fig = Figure(figsize=(max(8.0, 1.6 * len(arms) + 4), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [len(arms), max(1, len(arms) - 1)]})

    x = list(range(len(arms)))
    acc = [a["acc"] if a.get("acc") is not None else 0.0 for a in arms]
    err = [_errs(a["acc"], a.get("ci95")) for a in arms]
    left.bar(x, acc, yerr=list(zip(*err)), capsize=4, width=0.6, color=[COLORS.get(a["label"], "#777777") for a in arms])
    for xi, a, (_, up) in zip(x, arms, err):
        top = (a.get("acc") or 0.0) + up
        left.annotate(num(a.get("acc")), (xi, top), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    left.set_xticks(x, [_tick(a) for a in arms], fontsize=8)
    left.set_ylim(0, 1)
    left.set_ylabel("pass@1 (95% Wilson interval)")
    left.set_title("pass@1 per arm", fontsize=10)
    left.grid(axis="y", alpha=0.3)

    paired = [a for a in arms if a["label"] != ev.get("base") and a.get("diff_vs_base") is not None]
    right.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
    if paired:
        xs = list(range(len(paired)))
        for xi, a in zip(xs, paired):
            right.errorbar([xi], [a["diff_vs_base"]], yerr=[[e] for e in _errs(a["diff_vs_base"], a.get("diff_ci95"))], fmt="o", capsize=5,
                           color=COLORS.get(a["label"], "#777777"))  # fmt: skip
        right.set_xticks(xs, [_tick(a) for a in paired], fontsize=8)
        right.set_xlim(-0.6, len(paired) - 0.4)
    else:
        right.set_xticks([])
        right.text(0.5, 0.5, "no arm paired with a base", ha="center", va="center", transform=right.transAxes, fontsize=9)
    right.set_ylabel("pass@1 \u2212 base (95% paired interval)")
    right.set_title("paired difference from the base", fontsize=10)
    right.grid(axis="y", alpha=0.3)

    skill, adapter = report.get("skill") or {}, report.get("adapter") or {}
    fig.suptitle(f"Skill {skill.get('name')!r} \u2192 {adapter.get('target')}", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG labels as text: searchable, and light
        fig.savefig(path, format=fmt)
    return path


def _tick(arm: dict) -> str:
    return arm["label"] if arm["name"] == arm["label"] else f"{arm['name']}\n({arm['label']})"


def _errs(value: float | None, ci) -> tuple[float, float]:
    """Error-bar lengths below and above `value`; zero where the interval is missing."""
    if value is None or not ci or ci[0] is None or ci[1] is None:
        return (0.0, 0.0)
    return (max(0.0, value - ci[0]), max(0.0, ci[1] - value))
