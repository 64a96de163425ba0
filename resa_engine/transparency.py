"""Transparency: what a skill's SAE encodes, read off the SAE that carries it.

The SAE that transfers a skill also explains it (paper §5). This module answers:
- which latents fire on each token of a prompt (`inspect_prompt`);
- what each latent responds to over a corpus: firing density, mean activation and its
  top-activating contexts (`latent_cards`, stored as `sae/layers.<i>/latents.json`);
- which latents are "reasoning features": active on the `<think>`/`</think>` tokens of the
  Resa system prompt and nowhere else in it (`reasoning_features`, paper §5);
- how layers compare: FVU, dead fraction, loss recovered and reasoning features per
  layer (`layer_report`, `render_report_png`/`render_report_svg`);
- how to steer with single latents (`LatentEdit`, `make_edit_fn`, for `hookpoint.splice_sae`).

A latent is *active* at a token when it is among the SAE's top-k there with a positive
activation (TopK SAEs rarely keep a zero in the top-k; a zero would decode to nothing).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import Tensor

from .data import SYSTEM_PROMPT, special_token_mask
from .hookpoint import run_until
from .models import LoadedModel, ModelError

CARDS_FILE = "latents.json"
CARDS_FORMAT = "resa.latent_cards"
CARDS_VERSION = 1
THINK_TAGS = ("<think>", "</think>")
FIRING_OPEN, FIRING_CLOSE = "«", "»"


# ---------------------------------------------------------------- shared pieces


def _check_sae(model: LoadedModel, sae, layer: int) -> int:
    """The SAE must read this model's residual stream at a layer the model has."""
    layer = model.check_layer(layer)
    if int(sae.d_in) != model.hidden_size:
        raise ModelError(f"SAE width {sae.d_in} does not match {model.name} hidden size {model.hidden_size}")
    return layer


def _tokenize(model: LoadedModel, text: str, *, offsets: bool = False):
    """Prompt tokens as the SAE saw them in training: no special tokens added (data.TriggerDataset)."""
    if not isinstance(text, str) or not text:
        raise ValueError("text to inspect is empty")
    tok = model.tokenizer
    if offsets and not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer of {model.name} gives no character offsets (needs a fast tokenizer)")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=offsets)
    if not enc["input_ids"]:
        raise ValueError("text to inspect has no tokens")
    return enc


@torch.no_grad()
def _encode_layer(model: LoadedModel, sae, layer: int, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k (acts, indices) of the SAE on block `layer`'s output, float32 acts, shapes [B, T, k]."""
    resid = run_until(model.model, input_ids.to(model.device), model.layers, [layer])[layer]
    # sparsify's coder works on [tokens, d_in]; restore [batch, T] afterwards.
    top_acts, top_indices, _ = sae.encode(resid.to(sae.device, sae.dtype).reshape(-1, resid.shape[-1]))
    shape = (*resid.shape[:-1], -1)
    return top_acts.float().view(shape), top_indices.view(shape)


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


# ---------------------------------------------------------------- 1. per-token latents


@dataclass
class TokenLatents:
    """The strongest latents at one prompt token."""

    token: str
    """The token as text (decoded on its own)."""
    token_id: int
    """Vocabulary id of the token."""
    position: int
    """0-based position in the prompt."""
    latents: list[tuple[int, float]]
    """(latent index, activation) pairs, strongest first; only active latents (activation > 0)."""

    def to_dict(self) -> dict:
        return {
            "token": self.token,
            "token_id": self.token_id,
            "position": self.position,
            "latents": [{"index": i, "activation": a} for i, a in self.latents],
        }


def inspect_prompt(model: LoadedModel, sae, layer: int, text: str, top_n: int = 8) -> list[TokenLatents]:
    """For each token of `text`, the `top_n` strongest active latents of the SAE at `layer`."""
    if top_n < 1:
        raise ValueError(f"top_n must be at least 1, got {top_n}")
    layer = _check_sae(model, sae, layer)
    ids = _tokenize(model, text)["input_ids"]
    acts, indices = _encode_layer(model, sae, layer, torch.tensor([ids], dtype=torch.long))
    acts, order = acts[0].sort(dim=-1, descending=True)
    indices = indices[0].gather(-1, order)
    out = []
    for pos, token_id in enumerate(ids):
        pairs = [(int(i), float(a)) for a, i in zip(acts[pos, :top_n].tolist(), indices[pos, :top_n].tolist()) if a > 0]
        out.append(TokenLatents(_token_text(model.tokenizer, token_id), int(token_id), pos, pairs))
    return out


# ---------------------------------------------------------------- 2. latent cards


@dataclass
class LatentContext:
    """One top-activating occurrence of a latent: a token window around the firing token."""

    chunk: int
    """Row of `token_chunks` the token is in."""
    position: int
    """Position of the firing token inside that chunk."""
    activation: float
    """The latent's activation at that token."""
    token_id: int
    """Vocabulary id of the firing token."""
    token: str
    """The firing token as text."""
    before: str
    """Up to `window` tokens before it, as text."""
    after: str
    """Up to `window` tokens after it, as text."""

    @property
    def text(self) -> str:
        """The window with the firing token marked: `before «token» after`."""
        return f"{self.before}{FIRING_OPEN}{self.token}{FIRING_CLOSE}{self.after}"

    def to_dict(self) -> dict:
        return {**self.__dict__, "text": self.text}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentContext":
        return cls(
            chunk=int(d["chunk"]),
            position=int(d["position"]),
            activation=float(d["activation"]),
            token_id=int(d["token_id"]),
            token=str(d["token"]),
            before=str(d["before"]),
            after=str(d["after"]),
        )


@dataclass
class LatentCard:
    """What one latent responds to over a corpus."""

    index: int
    """Latent index in the SAE."""
    density: float
    """Fraction of counted tokens where the latent is active (0 = dead)."""
    mean_activation: float
    """Mean activation over the tokens where it is active (0 when dead)."""
    contexts: list[LatentContext] = field(default_factory=list)
    """Top-activating contexts, strongest first."""

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "density": self.density,
            "mean_activation": self.mean_activation,
            "contexts": [c.to_dict() for c in self.contexts],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LatentCard":
        return cls(
            index=int(d["index"]),
            density=float(d["density"]),
            mean_activation=float(d["mean_activation"]),
            contexts=[LatentContext.from_dict(c) for c in d.get("contexts", [])],
        )


@dataclass
class LatentCards:
    """Cards for the live latents of one layer's SAE; dead latents (density 0) have none."""

    layer: int
    """Hookpoint layer of the SAE."""
    num_latents: int
    """Latents in the SAE (live and dead)."""
    k: int
    """The SAE's top-k."""
    num_tokens: int
    """Tokens counted (non-special unless a mask said otherwise)."""
    window: int
    """Tokens kept on each side of a firing token in contexts."""
    cards: dict[int, LatentCard]
    """Latent index -> card, live latents only."""

    @property
    def live(self) -> int:
        return len(self.cards)

    @property
    def dead_fraction(self) -> float:
        return 1.0 - self.live / self.num_latents if self.num_latents else 0.0

    def card(self, index: int) -> LatentCard:
        """The card of a latent; a dead latent gets an empty card (density 0, no contexts)."""
        if not isinstance(index, int) or not 0 <= index < self.num_latents:
            raise ValueError(f"latent {index} is out of range (SAE has {self.num_latents} latents: 0..{self.num_latents - 1})")
        return self.cards.get(index) or LatentCard(index=index, density=0.0, mean_activation=0.0)

    def to_dict(self) -> dict:
        return {
            "format": CARDS_FORMAT,
            "version": CARDS_VERSION,
            "layer": self.layer,
            "num_latents": self.num_latents,
            "k": self.k,
            "num_tokens": self.num_tokens,
            "window": self.window,
            "live": self.live,
            "dead_fraction": self.dead_fraction,
            "cards": [self.cards[i].to_dict() for i in sorted(self.cards)],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LatentCards":
        if not isinstance(d, dict) or d.get("format") != CARDS_FORMAT:
            raise ValueError(f"not a latent cards document (expected format {CARDS_FORMAT!r})")
        if d.get("version") != CARDS_VERSION:
            raise ValueError(f"latent cards version {d.get('version')!r} is not supported (expected {CARDS_VERSION})")
        try:
            cards = [LatentCard.from_dict(c) for c in d["cards"]]
            return cls(
                layer=int(d["layer"]),
                num_latents=int(d["num_latents"]),
                k=int(d["k"]),
                num_tokens=int(d["num_tokens"]),
                window=int(d["window"]),
                cards={c.index: c for c in cards},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed latent cards document: {exc!r}") from None


def _merge_top(
    top_vals: Tensor, top_locs: Tensor, latents: Tensor, vals: Tensor, locs: Tensor
) -> tuple[Tensor, Tensor]:
    """Running top-N per latent: merge new (latent, activation, location) triples into [F, N] tables.

    Vectorised group-wise top-N: sort by activation (descending), then stably by latent, and keep
    the first N of each latent's run. Earlier entries win ties, so the result is deterministic.
    """
    num_latents, n = top_vals.shape
    held = top_vals.flatten() > -math.inf
    all_lat = torch.cat([torch.arange(num_latents, device=latents.device).repeat_interleave(n)[held], latents])
    all_val = torch.cat([top_vals.flatten()[held], vals])
    all_loc = torch.cat([top_locs.flatten()[held], locs])
    order = torch.sort(all_val, descending=True, stable=True).indices
    order = order[torch.sort(all_lat[order], stable=True).indices]
    lat, val, loc = all_lat[order], all_val[order], all_loc[order]
    counts = torch.bincount(lat, minlength=num_latents)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(lat.numel(), device=lat.device) - starts[lat]
    keep = rank < n
    new_vals = torch.full_like(top_vals, -math.inf)
    new_locs = torch.full_like(top_locs, -1)
    new_vals[lat[keep], rank[keep]] = val[keep]
    new_locs[lat[keep], rank[keep]] = loc[keep]
    return new_vals, new_locs


@torch.no_grad()
def latent_cards(
    model: LoadedModel,
    sae,
    layer: int,
    token_chunks: Tensor,
    tokenizer,
    *,
    top_contexts: int = 5,
    window: int = 8,
    mask: Tensor | None = None,
    batch_size: int = 8,
    progress=None,
) -> LatentCards:
    """Density, mean activation and top contexts of every live latent, in one pass over `token_chunks`.

    token_chunks: LongTensor [n, L] (e.g. `TriggerDataset.chunks`). mask: BoolTensor [n, L], True
    where a token counts; default every token that is not BOS/EOS/PAD (the SAE never trained on
    those). Memory stays bounded: per latent only a running top-`top_contexts` table of
    (activation, location) tensors is kept. progress: an optional ProgressTracker (step = chunks done).
    """
    layer = _check_sae(model, sae, layer)
    if not isinstance(token_chunks, Tensor) or token_chunks.dim() != 2 or token_chunks.dtype != torch.long:
        raise ValueError("token_chunks must be a LongTensor [n_chunks, chunk_len]")
    if token_chunks.numel() == 0:
        raise ValueError("token_chunks is empty")
    if top_contexts < 1 or window < 0 or batch_size < 1:
        raise ValueError("top_contexts and batch_size must be at least 1 and window at least 0")
    n_chunks, chunk_len = token_chunks.shape
    if mask is None:
        mask = ~special_token_mask(token_chunks, tokenizer)
    elif mask.shape != token_chunks.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a BoolTensor of shape {tuple(token_chunks.shape)}")

    # Running statistics live next to the SAE (GPU when there is one); all are O(num_latents).
    dev, num_latents = sae.device, int(sae.num_latents)
    counts = torch.zeros(num_latents, dtype=torch.long, device=dev)
    sums = torch.zeros(num_latents, dtype=torch.float64, device=dev)
    top_vals = torch.full((num_latents, top_contexts), -math.inf, device=dev)
    top_locs = torch.full((num_latents, top_contexts), -1, dtype=torch.long, device=dev)
    for start in range(0, n_chunks, batch_size):
        ids = token_chunks[start : start + batch_size]
        acts, indices = _encode_layer(model, sae, layer, ids)
        active = (acts > 0) & mask[start : start + batch_size, :, None].to(dev)
        b, t, k = acts.shape
        # Global token location = chunk * L + position, the same for every slot of that token.
        pos = torch.arange(start, start + b, device=dev)[:, None] * chunk_len + torch.arange(t, device=dev)[None, :]
        locs = pos[..., None].expand(b, t, k)
        lat, val, loc = indices[active], acts[active], locs[active]
        counts += torch.bincount(lat, minlength=num_latents)
        sums.index_add_(0, lat, val.double())
        top_vals, top_locs = _merge_top(top_vals, top_locs, lat, val, loc)
        if progress is not None:
            progress.update(start + b)

    num_tokens = int(mask.sum())
    counts, sums, top_vals, top_locs = counts.cpu(), sums.cpu(), top_vals.cpu(), top_locs.cpu()
    cards = {}
    for i in torch.nonzero(counts).flatten().tolist():
        contexts = []
        for val, loc in zip(top_vals[i].tolist(), top_locs[i].tolist()):
            if loc < 0:
                break
            chunk, pos = divmod(loc, chunk_len)
            lo = max(0, pos - window)
            span = token_chunks[chunk, lo : pos + 1 + window].tolist()
            token_id = span[pos - lo]
            contexts.append(
                LatentContext(
                    chunk=chunk,
                    position=pos,
                    activation=float(val),
                    token_id=token_id,
                    token=_token_text(tokenizer, token_id),
                    before=tokenizer.decode(span[: pos - lo]),
                    after=tokenizer.decode(span[pos - lo + 1 :]),
                )
            )
        cards[i] = LatentCard(
            index=i,
            density=int(counts[i]) / num_tokens if num_tokens else 0.0,
            mean_activation=float(sums[i] / counts[i]),
            contexts=contexts,
        )
    return LatentCards(layer=layer, num_latents=num_latents, k=int(sae.cfg.k), num_tokens=num_tokens, window=window, cards=cards)


def save_cards(cards: LatentCards, folder: Path | str) -> Path:
    """Write `<folder>/latents.json` atomically (next to the layer's cfg.json + sae.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CARDS_FILE
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".latents-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(cards.to_dict(), fh, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_cards(folder: Path | str) -> LatentCards:
    """Read `<folder>/latents.json`; a missing or malformed file is a clear error."""
    path = Path(folder) / CARDS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no latent cards at {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    try:
        return LatentCards.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


# ---------------------------------------------------------------- 3. reasoning features (paper §5)


@dataclass
class ReasoningFeatures:
    """Latents that fire on the think tags of a prompt and on no other token of it."""

    layer: int
    """Hookpoint layer of the SAE."""
    latents: list[int]
    """The reasoning features, ascending latent index."""
    think_positions: list[int]
    """Token positions whose character span overlaps a `<think>` or `</think>` occurrence."""
    tokens: list[str]
    """Every token of the prompt as text, for display."""

    @property
    def count(self) -> int:
        return len(self.latents)

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "latents": self.latents,
            "count": self.count,
            "think_positions": self.think_positions,
            "think_tokens": [self.tokens[p] for p in self.think_positions],
        }


def think_mask_from_offsets(text: str, offsets: list[tuple[int, int]], tags: tuple[str, ...] = THINK_TAGS) -> Tensor:
    """True at a token whose character span [start, end) overlaps an occurrence of a tag.

    Tokenizers split `<think>` into several pieces (`<`, `think`, `>` or ` </`, ...) and may glue a
    neighbouring space or newline onto a piece; every piece touching a tag counts, zero-width
    tokens never do.
    """
    spans = [(m.start(), m.end()) for tag in tags for m in re.finditer(re.escape(tag), text)]
    return torch.tensor([any(s < te and ts < e for ts, te in spans) for s, e in offsets], dtype=torch.bool)


def find_reasoning_latents(active: Tensor, think_mask: Tensor, num_latents: int | None = None) -> list[int]:
    """Latents active at one or more think positions and at no position outside them.

    active: BoolTensor [T, num_latents] (True = active), or an integer tensor [T, k] of top-k latent
    indices per token (negative entries are empty slots). think_mask: BoolTensor [T].
    """
    if think_mask.dim() != 1 or think_mask.dtype != torch.bool:
        raise ValueError("think_mask must be a BoolTensor [T]")
    if active.dim() != 2 or active.shape[0] != think_mask.shape[0]:
        raise ValueError(f"active must be [T, ...] with T = {think_mask.shape[0]}, got {tuple(active.shape)}")
    if active.dtype != torch.bool:
        if active.dtype.is_floating_point:
            raise ValueError("active must be a BoolTensor or an integer tensor of latent indices")
        indices = active.long()
        size = num_latents if num_latents is not None else int(indices.max().clamp(min=-1)) + 1
        dense = torch.zeros(indices.shape[0], size + 1, dtype=torch.bool, device=indices.device)
        # Empty slots (negative) land in an extra column that is dropped.
        dense.scatter_(1, torch.where(indices < 0, size, indices), True)
        active = dense[:, :size]
    think_mask = think_mask.to(active.device)
    inside = active[think_mask].any(0)
    outside = active[~think_mask].any(0)
    return torch.nonzero(inside & ~outside).flatten().tolist()


def reasoning_features(model: LoadedModel, sae, layer: int, text: str = SYSTEM_PROMPT) -> ReasoningFeatures:
    """Reasoning features of one layer's SAE on `text` (default: the Resa system prompt, paper §5)."""
    layer = _check_sae(model, sae, layer)
    enc = _tokenize(model, text, offsets=True)
    think = think_mask_from_offsets(text, [tuple(o) for o in enc["offset_mapping"]])
    if not think.any():
        raise ValueError("text has no <think> or </think> tag to look for reasoning features on")
    acts, indices = _encode_layer(model, sae, layer, torch.tensor([enc["input_ids"]], dtype=torch.long))
    active_indices = torch.where(acts[0] > 0, indices[0], -1).cpu()
    latents = find_reasoning_latents(active_indices, think, num_latents=int(sae.num_latents))
    tokens = [_token_text(model.tokenizer, t) for t in enc["input_ids"]]
    return ReasoningFeatures(layer=layer, latents=latents, think_positions=torch.nonzero(think).flatten().tolist(), tokens=tokens)


def count_reasoning_features(model: LoadedModel, saes: dict[int, object], text: str = SYSTEM_PROMPT) -> dict[int, int]:
    """Reasoning-feature count per layer, for `layer_report`: {layer: count}."""
    return {layer: reasoning_features(model, sae, layer, text).count for layer, sae in sorted(saes.items())}


# ---------------------------------------------------------------- 4. layer report

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


# ---------------------------------------------------------------- 5. steering edits

EditMode = Literal["clamp", "add", "scale"]
EDIT_MODES = ("clamp", "add", "scale")


@dataclass(frozen=True)
class LatentEdit:
    """One steering edit of one latent, applied to the SAE code at every spliced token."""

    latent: int
    """Latent index in the SAE."""
    mode: EditMode
    """`clamp`: set the activation to value; `add`: add value; `scale`: multiply by value."""
    value: float
    """The clamp target, the amount added, or the factor."""

    def __post_init__(self):
        if self.mode not in EDIT_MODES:
            raise ValueError(f"unknown edit mode {self.mode!r} (use one of {', '.join(EDIT_MODES)})")
        if isinstance(self.latent, bool) or not isinstance(self.latent, int) or self.latent < 0:
            raise ValueError(f"latent index must be a non-negative integer, got {self.latent!r}")
        if not math.isfinite(float(self.value)):
            raise ValueError(f"edit value must be finite, got {self.value!r}")


def make_edit_fn(edits: list[LatentEdit], *, num_latents: int | None = None) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A `(top_acts, top_indices) -> (acts, indices)` edit for `hookpoint.splice_sae(edit=...)`.

    clamp/add on a latent that is not in a token's top-k append one column (index = latent,
    activation = value, i.e. pre-activation taken as 0); where it is present the appended slot
    carries 0 and decodes to nothing. sparsify's decoders (embedding_bag, eager or Triton) sum
    activation * W_dec[index] over any number of slots, so extra columns decode correctly.
    scale leaves absent latents absent. With `keep_error=True` no edits reproduce the input exactly.
    """
    edits = list(edits)
    seen = set()
    for e in edits:
        if not isinstance(e, LatentEdit):
            raise ValueError(f"edits must be LatentEdit values, got {type(e).__name__}")
        if num_latents is not None and e.latent >= num_latents:
            raise ValueError(f"latent {e.latent} is out of range (SAE has {num_latents} latents: 0..{num_latents - 1})")
        if e.latent in seen:
            raise ValueError(f"latent {e.latent} is edited more than once")
        seen.add(e.latent)

    def edit(top_acts: Tensor, top_indices: Tensor) -> tuple[Tensor, Tensor]:
        acts, indices = top_acts, top_indices
        for e in edits:
            hit = indices == e.latent
            if e.mode == "scale":
                acts = torch.where(hit, acts * e.value, acts)
                continue
            present = hit.any(-1, keepdim=True)
            if e.mode == "clamp":
                acts = torch.where(hit, torch.full_like(acts, e.value), acts)
            else:
                acts = torch.where(hit, acts + e.value, acts)
            extra = torch.where(present, torch.zeros_like(acts[..., :1]), torch.full_like(acts[..., :1], e.value))
            acts = torch.cat([acts, extra], dim=-1)
            indices = torch.cat([indices, torch.full_like(indices[..., :1], e.latent)], dim=-1)
        return acts, indices

    return edit


class Steering:
    """One request's SAE edits, for the serving scheduler: at block `layer`'s output each token's
    residual x becomes x + decode(edit(encode(x))) - decode(encode(x)).

    That is `splice_sae(edit=make_edit_fn(edits), keep_error=True)` computed without decoding
    the whole code: the decoder is linear, so only the edited latents' decoder rows move x
    (by (new - old) * W_dec[latent], `old` being the latent's top-k activation or 0). `add`
    needs no encoding at all; no edits leave x exactly as it was.
    """

    def __init__(self, sae, layer: int, edits: list[LatentEdit]):
        make_edit_fn(edits, num_latents=int(sae.num_latents))  # the same checks as the splice edit
        if sae.W_dec is None:
            raise ValueError("the SAE has no decoder weights")
        self.sae, self.layer, self.edits = sae, int(layer), list(edits)
        self._latents = torch.tensor([e.latent for e in self.edits], dtype=torch.long, device=sae.W_dec.device)
        self._rows = sae.W_dec.detach()[self._latents]  # [edits, d_in]
        self._needs_code = any(e.mode != "add" for e in self.edits)

    def __repr__(self) -> str:
        return f"Steering(layer={self.layer}, edits={self.edits})"

    @torch.no_grad()
    def apply(self, x: Tensor) -> Tensor:
        """x [..., d_in] -> the steered residual, same shape and dtype."""
        if not self.edits:
            return x
        h = x.reshape(-1, x.shape[-1]).to(self.sae.dtype)
        old = torch.zeros(h.shape[0], len(self.edits), dtype=h.dtype, device=h.device)
        if self._needs_code:
            top_acts, top_indices, _ = self.sae.encode(h)
            # old[t, j]: latent j's activation at token t if in its top-k, else 0 (TopK indices are distinct).
            old = ((top_indices[:, :, None] == self._latents[None, None, :]) * top_acts[:, :, None]).sum(1)
        coef = torch.stack([self._coefficient(e, old[:, j]) for j, e in enumerate(self.edits)], dim=1)
        return (h + coef @ self._rows).view(x.shape).to(x.dtype)

    @staticmethod
    def _coefficient(e: LatentEdit, old: Tensor) -> Tensor:
        if e.mode == "clamp":
            return e.value - old
        if e.mode == "scale":
            return old * (e.value - 1.0)
        return torch.full_like(old, e.value)
