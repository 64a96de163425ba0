"""Stage I training: the chunk order, the SAEs and their optimizer, and the loop (one screen).

One pass over the trigger data feeds every requested layer: each batch runs the model only up to
the deepest hookpoint, and each layer's block output trains that layer's sparsify `SparseCoder`
with sparsify's own recipe (FVU + AuxK, unit-norm decoder rows with the parallel gradient removed,
SignSGD under a schedule-free wrapper or Adam with linear warmup).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..artifacts import sae_subdir
from ..checkpoint import Checkpoint, optimizer_state, restore_optimizer
from ..data import QARow, TriggerDataset, special_token_mask, trigger_text
from ..errors import Cancelled, DatasetError, ModelError
from ..models import LoadedModel
from ..progress import ProgressFn, ProgressTracker, StopFn
from ..sae.hooks import run_until
from ..sae.load import import_sparsify
from .config import TRAIN_FIELDS, ExtractConfig

@dataclass
class TrainPlan:
    """The deterministic chunk order of the whole run: `order[s*B:(s+1)*B]` feeds step s."""

    data: TriggerDataset
    order: Tensor
    steps: int
    batch_size: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.data.chunk_len

    def batch(self, step: int) -> Tensor:
        return self.data.chunks[self.order[step * self.batch_size : (step + 1) * self.batch_size]]


def plan_training(rows: list[QARow], tokenizer, cfg: ExtractConfig) -> TrainPlan:
    """Tokenize, chunk, and fix the seeded order of chunks over `epochs` (capped by max_tokens)."""
    if not rows:
        raise DatasetError("no training rows")
    data = TriggerDataset.from_rows(rows, tokenizer, cfg.chunk_len)
    if len(data) < cfg.batch_size:
        raise DatasetError(
            f"dataset too small for one batch: {data.num_tokens} tokens from {len(rows)} training rows make "
            f"{len(data)} chunk(s) of {cfg.chunk_len} tokens; batch_size {cfg.batch_size} needs {cfg.batch_size}"
        )
    orders = [torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed + e)) for e in range(cfg.epochs)]
    order = torch.cat(orders)
    if cfg.max_tokens is not None:
        order = order[: cfg.max_tokens // cfg.chunk_len]
    steps = len(order) // cfg.batch_size
    if steps == 0:
        raise ValueError(f"max_tokens {cfg.max_tokens} is less than one batch ({cfg.batch_size} x {cfg.chunk_len} tokens)")
    return TrainPlan(data=data, order=order[: steps * cfg.batch_size], steps=steps, batch_size=cfg.batch_size)


def heldout_dataset(rows: list[QARow], tokenizer, cfg: ExtractConfig) -> TriggerDataset:
    """Held-out chunks: the training chunk length, shortened when the held-out text is shorter."""
    if not rows:
        raise DatasetError("dataset too small: no held-out rows to score the SAEs on")
    stream = sum(len(ids) + 1 for ids in tokenizer([trigger_text(r) for r in rows], add_special_tokens=False)["input_ids"])
    chunk_len = max(2, min(cfg.chunk_len, stream, cfg.heldout_max_tokens))
    return TriggerDataset.from_rows(rows, tokenizer, chunk_len, max_tokens=cfg.heldout_max_tokens)


# ---------------------------------------------------------------- SAEs and optimizer


def _init_sae_dir(folder: Path, layer: int) -> Path:
    """An existing skill folder (sae/layers.<i>/) or a single sparsify SAE folder (cfg.json)."""
    for candidate in (folder / sae_subdir(layer), folder / f"layers.{layer}", folder):
        if (candidate / "cfg.json").is_file() and (candidate / "sae.safetensors").is_file():
            return candidate
    raise ModelError(f"init_from {folder} holds no SAE for layer {layer} (expected sae/layers.{layer}/ or cfg.json)")


def build_saes(model: LoadedModel, cfg: ExtractConfig) -> dict[int, Any]:
    """Fresh seeded SparseCoders (sparsify seeds each hookpoint alike), or loaded from `init_from`."""
    sparsify = import_sparsify()
    d_in = model.hidden_size
    saes = {}
    for layer in cfg.layers:
        if cfg.init_from is not None:
            sae = sparsify.SparseCoder.load_from_disk(_init_sae_dir(cfg.init_from, layer), device=model.device)
            if sae.d_in != d_in:
                raise ModelError(
                    f"init_from SAE for layer {layer} has width {sae.d_in}, but {model.name} has hidden size {d_in}"
                )
            sae = sae.float()
        else:
            sae_cfg = sparsify.SparseCoderConfig(
                activation="topk", expansion_factor=cfg.expansion_factor, num_latents=cfg.num_latents, k=cfg.k, normalize_decoder=True
            )
            if sae_cfg.k > cfg.resolved_num_latents(d_in):
                raise ValueError(f"k {cfg.k} exceeds the SAE width {cfg.resolved_num_latents(d_in)}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                sae = sparsify.SparseCoder(d_in, sae_cfg, device=model.device, dtype=torch.float32)
        sae.requires_grad_(True)
        saes[layer] = sae.train()
    return saes


def make_optimizer(saes: dict[int, Any], lr: float, optimizer: str):
    """sparsify's choices: SignSGD inside ScheduleFreeWrapper(momentum 0.95), or Adam."""
    groups = [dict(params=list(sae.parameters()), lr=lr) for sae in saes.values()]
    if optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD(groups), momentum=0.95)
        opt.train()
        return opt
    return torch.optim.Adam(groups)


def warmup_steps(cfg: ExtractConfig, steps: int) -> int:
    """Adam warmup: as configured, else 10% of the run capped at sparsify's 1000 steps."""
    return cfg.lr_warmup_steps if cfg.lr_warmup_steps is not None else min(1000, steps // 10)


def _adam_lr(step: int, total: int, warmup: int, lr: float) -> float:
    """transformers' linear schedule with warmup, as sparsify's trainer uses for Adam."""
    if step < warmup:
        return lr * step / max(1, warmup)
    return lr * max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class TrainState:
    """Everything a resumed run needs besides the SAE and optimizer tensors."""

    step: int = 0
    tokens_seen: int = 0
    train_tokens: int = 0
    """Unmasked tokens the SAEs trained on."""
    wall_s: float = 0.0
    last_fvu: dict[str, float] = field(default_factory=dict)


def run_key(model: LoadedModel, cfg: ExtractConfig, plan: TrainPlan, init_sha: str | None, num_latents: int) -> str:
    """Identity of a training run: a checkpoint resumes only the very same run."""
    ident = {
        "model": model.sha256,
        "adapter": model.extra.get("adapter_sha256"),
        "layers": cfg.layers,
        "num_latents": num_latents,
        "k": cfg.k,
        "init_from": init_sha,
        "data": hashlib.sha256(plan.data.chunks.numpy().tobytes()).hexdigest(),
        "order": hashlib.sha256(plan.order.numpy().tobytes()).hexdigest(),
        **{k: getattr(cfg, k) for k in TRAIN_FIELDS if k not in ("checkpoint_every", "heldout_fraction", "heldout_max_tokens", "cards")},
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def init_sha(cfg: ExtractConfig) -> str | None:
    if cfg.init_from is None:
        return None
    combined = hashlib.sha256()
    for layer in cfg.layers:
        path = _init_sae_dir(cfg.init_from, layer) / "sae.safetensors"
        combined.update(f"{layer}:{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return combined.hexdigest()


def save_state(ckpt: Checkpoint, saes, optimizer, since_fired, fired_ever, ts: TrainState) -> None:
    """SAE weights, optimizer state and dead-latent counters; the train state as JSON."""
    tensors, opt_json = optimizer_state(optimizer)
    for layer, sae in saes.items():
        for name, p in sae.named_parameters():
            tensors[f"sae.{layer}.{name}"] = p
        tensors[f"since_fired.{layer}"] = since_fired[layer]
        tensors[f"fired_ever.{layer}"] = fired_ever[layer]
    ckpt.save(ts.step, tensors, {"train_state": dataclasses.asdict(ts), "optimizer": opt_json})


def load_state(ckpt: Checkpoint, saes, optimizer, since_fired, fired_ever) -> TrainState | None:
    """Restore a checkpoint of this run into the SAEs, optimizer and counters; None when there is none."""
    loaded = ckpt.load(next(iter(saes.values())).device)
    if loaded is None:
        return None
    meta, tensors = loaded
    with torch.no_grad():
        for layer, sae in saes.items():
            for name, p in sae.named_parameters():
                p.copy_(tensors[f"sae.{layer}.{name}"])
            since_fired[layer].copy_(tensors[f"since_fired.{layer}"])
            fired_ever[layer].copy_(tensors[f"fired_ever.{layer}"])
    restore_optimizer(optimizer, tensors, meta["optimizer"])
    return TrainState(**meta["train_state"])


# ---------------------------------------------------------------- training


def training_positions(ids: Tensor, tokenizer, cfg: ExtractConfig) -> Tensor:
    """Flat bool mask of the positions SAEs train on: all but BOS/EOS/PAD (when masked)."""
    if not cfg.mask_special_tokens:
        return torch.ones(ids.numel(), dtype=torch.bool, device=ids.device)
    return ~special_token_mask(ids, tokenizer).flatten()


def _train_step(sae, x: Tensor, *, init_bias: bool, dead_mask: Tensor | None, cfg: ExtractConfig, did_fire: Tensor) -> float:
    """One layer's share of a step: FVU (+ AuxK) backward over micro-batches, as sparsify's hook does."""
    if init_bias:
        # sparsify: centre the pre-activations at the first batch's mean
        sae.b_dec.data = x.mean(0).to(sae.dtype)
    if sae.cfg.normalize_decoder:
        sae.set_decoder_norm_to_unit_norm()
    # Every slice is normalised by the whole batch's variance, so the slice FVUs add up.
    total_variance = (x - x.mean(0)).pow(2).sum()
    fvu = 0.0
    for part in x.split(cfg.micro_batch_tokens):
        out = sae(part, dead_mask=dead_mask, total_variance=total_variance)
        (out.fvu + cfg.auxk_alpha * out.auxk_loss).backward()
        did_fire[out.latent_indices.flatten()] = True
        fvu += float(out.fvu.detach())
    return fvu


def train(model, saes, optimizer, plan: TrainPlan, cfg: ExtractConfig, ckpt: Checkpoint | None, ts: TrainState,
           since_fired, fired_ever, lr: float, progress: ProgressFn | None, should_stop: StopFn | None) -> float:
    """The training loop; returns its own seconds. Leaves `ts` at the end of the run."""
    layers = cfg.layers
    device = model.device
    warmup = warmup_steps(cfg, plan.steps)
    did_fire = {i: torch.zeros_like(fired_ever[i]) for i in layers}
    tracker = ProgressTracker("extract", plan.steps * plan.tokens_per_step, progress, should_stop, start_step=ts.tokens_seen)
    t0, start_tokens, wall0 = time.perf_counter(), ts.tokens_seen, ts.wall_s

    def save():
        ts.wall_s = wall0 + time.perf_counter() - t0
        if ckpt is not None:
            save_state(ckpt, saes, optimizer, since_fired, fired_ever, ts)

    try:
        tracker.update(ts.tokens_seen, force=True)
        while ts.step < plan.steps:
            ids = plan.batch(ts.step).to(device)
            keep = training_positions(ids, model.tokenizer, cfg)
            with torch.no_grad():
                acts = run_until(model.model, ids, model.layers, layers)
            n = int(keep.sum())
            if cfg.optimizer == "adam":
                for group in optimizer.param_groups:
                    group["lr"] = _adam_lr(ts.step, plan.steps, warmup, lr)
            for i in layers:
                x = acts[i].flatten(0, 1)[keep].float()
                dead = since_fired[i] > cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
                if n:
                    init_bias = ts.step == 0 and cfg.init_from is None
                    ts.last_fvu[str(i)] = _train_step(saes[i], x, init_bias=init_bias, dead_mask=dead, cfg=cfg, did_fire=did_fire[i])
                if saes[i].cfg.normalize_decoder and saes[i].W_dec.grad is not None:
                    saes[i].remove_gradient_parallel_to_decoder_directions()
            del acts
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                for i in layers:
                    since_fired[i] += n
                    since_fired[i][did_fire[i]] = 0
                    fired_ever[i] |= did_fire[i]
                    did_fire[i].zero_()
            ts.step += 1
            ts.tokens_seen += plan.tokens_per_step
            ts.train_tokens += n
            if cfg.checkpoint_every and ts.step % cfg.checkpoint_every == 0 and ts.step < plan.steps:
                save()
            rate = (ts.tokens_seen - start_tokens) / max(time.perf_counter() - t0, 1e-9)
            fvus = {f"fvu_{i}": ts.last_fvu[str(i)] for i in layers if str(i) in ts.last_fvu}
            mean_fvu = sum(fvus.values()) / len(fvus) if fvus else float("nan")
            tracker.update(ts.tokens_seen, tokens_per_s=rate, fvu=mean_fvu, **(fvus if len(layers) > 1 else {}))
    except Cancelled:
        save()
        raise
    elapsed = time.perf_counter() - t0
    save()  # the finished state: a run cancelled while scoring resumes straight into scoring
    return elapsed
