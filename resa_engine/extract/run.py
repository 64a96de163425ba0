"""Stage I, skill extraction: TopK SAEs trained on a source model's residual stream (paper §3),
scored on held-out rows, explained (latent cards, reasoning features), written as a skill folder.

  extract_skill(model, train_rows, heldout_rows, ExtractConfig(layers=[12]), out_dir)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import sae_subdir
from ..checkpoint import Checkpoint
from ..data import QARow, TriggerDataset, dataset_sha256, special_token_mask
from ..models import LoadedModel
from ..progress import ProgressFn, ProgressTracker, StopFn
from ..provenance import finite, versions
from .config import TRAIN_FIELDS, ExtractConfig
from .metrics import heldout_metrics
from .train import TrainState, build_saes, heldout_dataset, init_sha, load_state, make_optimizer, plan_training, run_key, train, warmup_steps


@dataclass
class ExtractResult:
    """What an extraction produced: the skill folder, its manifest and the figures in it."""

    out_dir: Path
    """Folder holding sae/layers.<i>/ (sparsify format) and manifest.json."""
    manifest: dict
    """The skill manifest (the store adds `files` and `created_at` on commit)."""
    layers: list[int]
    default_layer: int
    metrics: dict[str, dict]
    """Per layer (string key): fvu, explained_variance, l0, dead_fraction, losses, loss_recovered, kl."""
    tokens_seen: int
    """Training tokens fed through the model, over all resumed runs."""
    steps: int
    """Optimizer steps of the whole run."""
    wall_s: float
    """Seconds spent over all resumed runs, held-out scoring included."""
    train_s: float
    """Seconds of this call spent in the training loop (for throughput figures)."""
    resumed_tokens: int = 0
    """Tokens already seen in the checkpoint this call resumed from (0: fresh start)."""
    report: Path | None = None
    """The per-layer report chart (report.png) in out_dir; written with `cards` and several layers."""


def choose_default_layer(metrics: dict[int, dict], requested: int | None) -> int:
    """The caller's choice, else the layer whose splice recovers the most next-token loss."""
    if requested is not None:
        return requested
    return max(sorted(metrics), key=lambda i: metrics[i]["loss_recovered"] if metrics[i]["loss_recovered"] is not None else -math.inf)


def extract_skill(
    model: LoadedModel,
    train_rows: list[QARow],
    heldout_rows: list[QARow],
    cfg: ExtractConfig,
    out_dir: Path,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    checkpoint_dir: Path | None = None,
    name: str | None = None,
    dataset_sha256: str | None = None,
) -> ExtractResult:
    """Train one SAE per layer in `cfg.layers` in one pass, score them, write the skill to `out_dir`.

    Raises ValueError subclasses (ModelError, DatasetError) on bad input before anything is
    written; Cancelled (after saving a checkpoint) when `should_stop` says so. With a
    `checkpoint_dir` holding a checkpoint of the same run, training resumes from it.
    `dataset_sha256` names the stored dataset the rows came from (default: the hash of
    train rows followed by held-out rows).
    """
    t_start = time.perf_counter()
    cfg.check_model(model.name, model.num_layers, model.context)
    plan = plan_training(train_rows, model.tokenizer, cfg)
    heldout = heldout_dataset(heldout_rows, model.tokenizer, cfg)
    saes = build_saes(model, cfg)
    d_in = model.hidden_size
    num_latents = next(iter(saes.values())).num_latents
    lr = cfg.resolved_lr(num_latents)
    optimizer = make_optimizer(saes, lr, cfg.optimizer)
    since_fired = {i: torch.zeros(num_latents, dtype=torch.long, device=model.device) for i in cfg.layers}
    fired_ever = {i: torch.zeros(num_latents, dtype=torch.bool, device=model.device) for i in cfg.layers}
    init_digest = init_sha(cfg)

    ckpt = Checkpoint(checkpoint_dir, run_key(model, cfg, plan, init_digest, num_latents)) if checkpoint_dir else None
    ts = load_state(ckpt, saes, optimizer, since_fired, fired_ever) if ckpt else None
    resumed = ts is not None
    ts = ts or TrainState()
    resumed_tokens = ts.tokens_seen
    wall_before = ts.wall_s

    train_s = train(model, saes, optimizer, plan, cfg, ckpt, ts, since_fired, fired_ever, lr, progress, should_stop)
    if hasattr(optimizer, "eval"):
        optimizer.eval()  # schedule-free: the averaged weights are the trained SAE (sparsify saves these)
    for sae in saes.values():
        sae.eval()
        sae.requires_grad_(False)

    raw = heldout_metrics(model, saes, heldout, cfg, progress, should_stop)
    for i in cfg.layers:
        raw[i]["dead_fraction"] = float(1 - fired_ever[i].float().mean())
        raw[i]["train_fvu"] = ts.last_fvu.get(str(i))
    cards = skill_cards(model, saes, heldout, cfg, progress, should_stop) if cfg.cards else None
    if cards is not None:
        for i in cfg.layers:
            found = cards.reasoning[i]
            raw[i]["reasoning_features"] = found.count if found is not None else None
            raw[i]["reasoning_latents"] = found.latents if found is not None else None
    default_layer = choose_default_layer(raw, cfg.default_layer)

    first = saes[cfg.layers[0]]
    expansion = num_latents // d_in if num_latents % d_in == 0 else num_latents / d_in
    wall_s = wall_before + (time.perf_counter() - t_start)  # earlier (cancelled) runs count their training time
    manifest = {
        "name": name,
        "source": {
            "model": model.name,
            "sha256": model.sha256,
            "adapter": model.extra.get("adapter"),
            "adapter_sha256": model.extra.get("adapter_sha256"),
        },
        "hookpoint": "decoder block output (hidden_states[i+1])",
        "layers": list(cfg.layers),
        "default_layer": default_layer,
        "d_in": d_in,
        "sae": {
            "num_latents": num_latents,
            "k": first.cfg.k,
            "expansion_factor": expansion,
            "activation": first.cfg.activation,
            "normalize_decoder": first.cfg.normalize_decoder,
        },
        "train": {
            **{k: getattr(cfg, k) for k in TRAIN_FIELDS if k != "seed"},
            "lr": lr,
            "lr_warmup_steps": warmup_steps(cfg, plan.steps),
            "steps": plan.steps,
            "tokens_per_step": plan.tokens_per_step,
            "init_from": str(cfg.init_from) if cfg.init_from else None,
            "init_from_sha256": init_digest,
        },
        "seed": cfg.seed,
        "dataset": {
            "sha256": dataset_sha256 or _rows_sha(train_rows, heldout_rows),
            "rows": len(train_rows) + len(heldout_rows),
            "train_rows": len(train_rows),
            "heldout_rows": len(heldout_rows),
            "train_chunks": len(plan.data),
            "heldout_chunks": len(heldout),
            "heldout_chunk_len": heldout.chunk_len,
        },
        "metrics": {str(i): finite(raw[i]) for i in cfg.layers},
        "tokens_seen": ts.tokens_seen,
        "train_tokens": ts.train_tokens,
        "wall_s": round(wall_s, 3),
        "resumed": resumed,
        "versions": versions(),
    }

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / "sae", ignore_errors=True)
    for i, sae in saes.items():
        sae.save_to_disk(out_dir / sae_subdir(i))
    report = write_transparency(out_dir, manifest, cards) if cards is not None else None
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return ExtractResult(
        out_dir=out_dir,
        manifest=manifest,
        layers=list(cfg.layers),
        default_layer=default_layer,
        metrics=manifest["metrics"],
        tokens_seen=ts.tokens_seen,
        steps=plan.steps,
        wall_s=manifest["wall_s"],
        train_s=train_s,
        resumed_tokens=resumed_tokens,
        report=report,
    )


# ---------------------------------------------------------------- transparency (paper §5)


@dataclass
class SkillCards:
    """What each layer's SAE encodes, computed once at extraction and stored with the skill."""

    cards: dict[int, Any]
    """Layer -> transparency.LatentCards over the held-out chunks."""
    reasoning: dict[int, Any]
    """Layer -> transparency.ReasoningFeatures on the Resa system prompt (None: the tokenizer gives no offsets)."""


def skill_cards(model: LoadedModel, saes: dict[int, Any], data: TriggerDataset, cfg: ExtractConfig,
                progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> SkillCards:
    """Latent cards over the held-out chunks (bounded by heldout_max_tokens) and reasoning features per layer.

    Cards count the positions FVU counts: not BOS/EOS/PAD (when masked) and not a chunk's first
    position, the attention sink (see heldout_metrics), which would otherwise top every card.
    """
    from ..transparency.cards import latent_cards
    from ..transparency.reasoning import reasoning_features

    chunks = data.chunks
    mask = ~special_token_mask(chunks, model.tokenizer) if cfg.mask_special_tokens else torch.ones_like(chunks, dtype=torch.bool)
    mask[:, 0] = False
    tracker = ProgressTracker("cards", len(chunks) * len(saes), progress, should_stop)
    cards, reasoning = {}, {}
    for n, (layer, sae) in enumerate(sorted(saes.items())):
        step = _Offset(tracker, n * len(chunks))
        cards[layer] = latent_cards(model, sae, layer, chunks, model.tokenizer, mask=mask, batch_size=cfg.batch_size, progress=step)
        # Needs character offsets (a fast tokenizer); without them the count is unknown, not zero.
        reasoning[layer] = reasoning_features(model, sae, layer) if getattr(model.tokenizer, "is_fast", False) else None
    return SkillCards(cards=cards, reasoning=reasoning)


@dataclass
class _Offset:
    """One layer's share of the `cards` stage: its chunk count shifted by the layers before it."""

    tracker: ProgressTracker
    offset: int

    def update(self, step: int) -> None:
        self.tracker.update(self.offset + step)


def write_transparency(out_dir: Path, manifest: dict, cards: SkillCards) -> Path | None:
    """Cards into sae/layers.<i>/latents.json; with several layers, report.json and report.png too."""
    from ..transparency.cards import save_cards
    from ..transparency.report import layer_report, render_report_png

    for layer, layer_cards in cards.cards.items():
        save_cards(layer_cards, out_dir / sae_subdir(layer))
    for stale in ("report.json", "report.png"):
        (out_dir / stale).unlink(missing_ok=True)  # a resumed staging folder may hold an older run's
    if len(cards.cards) < 2:
        return None
    report = layer_report(manifest, {i: r.count for i, r in cards.reasoning.items() if r is not None})
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return render_report_png(report, out_dir / "report.png")


def _rows_sha(train_rows: list[QARow], heldout_rows: list[QARow]) -> str:
    return dataset_sha256(list(train_rows) + list(heldout_rows))
