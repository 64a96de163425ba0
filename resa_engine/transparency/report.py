"""The per-layer report of a skill: FVU, dead fraction, loss recovered and reasoning features per
layer, as JSON and as a chart (PNG or SVG)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

REPORT_METRICS = ("fvu", "dead_fraction", "loss_recovered")


def layer_report(skill_manifest: dict, reasoning_counts: dict[int, int]) -> dict:
    """Per-layer quality and reasoning-feature counts of a skill, as a JSON-able dict.

    skill_manifest["metrics"] is {"<layer>": {"fvu", "dead_fraction", "loss_recovered", ...}};
    a metric the manifest lacks is null. Layers: the manifest's `layers` (else its metric keys).
    """
    metrics = skill_manifest.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise ValueError("skill manifest `metrics` must be an object keyed by layer")
    layers = skill_manifest.get("layers")
    layers = sorted({int(i) for i in (layers if layers is not None else metrics)})
    unknown = sorted(set(int(i) for i in reasoning_counts) - set(layers))
    if unknown:
        raise ValueError(f"reasoning counts for layer(s) {unknown} that the skill does not have (layers: {layers})")
    rows = []
    for layer in layers:
        m = metrics.get(str(layer)) or metrics.get(layer) or {}
        row = {"layer": layer}
        for key in REPORT_METRICS:
            row[key] = float(m[key]) if m.get(key) is not None else None
        count = reasoning_counts.get(layer)
        row["reasoning_features"] = int(count) if count is not None else None
        rows.append(row)
    return {"skill": skill_manifest.get("name"), "default_layer": skill_manifest.get("default_layer"), "layers": rows}


_PANELS = (
    ("fvu", "FVU (lower is better)", "tab:red"),
    ("dead_fraction", "Dead latent fraction", "tab:gray"),
    ("loss_recovered", "Loss recovered", "tab:green"),
    ("reasoning_features", "Reasoning features", "tab:blue"),
)


def _render(report: dict, path: Path | str, fmt: Literal["png", "svg"]) -> Path:
    # A bare Figure on the Agg canvas: no pyplot global state, safe in servers and threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report.get("layers") or []
    if not rows:
        raise ValueError("report has no layers to draw")
    layers = [r["layer"] for r in rows]
    fig = Figure(figsize=(max(6.0, 1.2 * len(layers) + 3), 7.5), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(_PANELS), 1, sharex=True)
    x = list(range(len(layers)))
    for ax, (key, label, color) in zip(axes, _PANELS):
        values = [r.get(key) for r in rows]
        heights = [v if v is not None else 0 for v in values]
        bars = ax.bar(x, heights, color=color, width=0.6)
        for bar, v in zip(bars, values):
            text = "n/a" if v is None else (f"{v:d}" if isinstance(v, int) else f"{v:.3g}")
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=9)
        ax.set_ylabel(label, fontsize=9)
        ax.margins(y=0.25)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(x, [f"layer {i}" for i in layers])
    axes[-1].set_xlabel("hookpoint (output of decoder block)")
    title = f"Skill {report['skill']!r}: per-layer SAE quality and reasoning features" if report.get("skill") else "Per-layer SAE quality and reasoning features"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt)
    return path


def render_report_png(report: dict, path: Path | str) -> Path:
    """Draw a `layer_report` as a PNG: one panel per quantity, layers along x."""
    return _render(report, path, "png")


def render_report_svg(report: dict, path: Path | str) -> Path:
    """The same chart as `render_report_png`, as SVG."""
    return _render(report, path, "svg")
