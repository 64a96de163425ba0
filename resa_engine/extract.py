"""Stage I, skill extraction: TopK SAEs trained on a source model's residual stream (paper §3).

One pass over the trigger data feeds every requested layer: each batch runs the model
only up to the deepest hookpoint (hookpoint.run_until), and each layer's block output
(= `hidden_states[i+1]`) trains that layer's sparsify `SparseCoder` with sparsify's own
recipe: FVU loss plus AuxK on dead latents, unit-norm decoder rows with the parallel
gradient removed, SignSGD under a schedule-free wrapper (or Adam with linear warmup),
learning rate scaled by 1/sqrt(num_latents / 2**14).

The loop is short on purpose (nanoGPT style) so that it can report progress, stop when
asked, and checkpoint (safetensors + JSON, never pickle) and resume to the same result.
After training, each SAE is scored on held-out rows: FVU, L0, dead latents, and the
model's next-token loss with the SAE spliced in, against clean and zero-ablated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from . import __version__
from .data import DatasetError, QARow, TriggerDataset, dataset_sha256, special_token_mask, trigger_text
from .hookpoint import capture_residual, run_until, splice_sae
from .models import LoadedModel, ModelError
from .progress import Cancelled, ProgressFn, ProgressTracker, StopFn
from .skill import sae_subdir

OPTIMIZERS = ("signum", "adam")
SAE_FIELDS = ("num_latents", "expansion_factor", "k")
TRAIN_FIELDS = (
    "chunk_len",
    "batch_size",
    "max_tokens",
    "epochs",
    "lr",
    "optimizer",
    "lr_warmup_steps",
    "auxk_alpha",
    "dead_feature_threshold",
    "heldout_fraction",
    "heldout_max_tokens",
    "micro_batch_tokens",
    "mask_special_tokens",
    "checkpoint_every",
    "cards",
    "seed",
)
STATE_FILE = "state.json"
# Held-out logits are materialised per batch; keep a batch under ~2**28 floats (1 GiB fp32).
_HELDOUT_LOGIT_BUDGET = 2**28


def _import_sparsify():
    """sparsify prints a notice on stdout at import; keep stdout clean for `--json` output."""
    with contextlib.redirect_stdout(sys.stderr):
        import sparsify
    return sparsify


@dataclass
class ExtractConfig:
    """Everything that shapes a skill: hookpoints, SAE size and the training recipe."""

    layers: list[int]
    """Decoder blocks whose outputs get an SAE (0-based); all are trained in one pass."""
    num_latents: int = 0
    """SAE width in latents; 0 means `d_in * expansion_factor` (paper: 65,536 for d_in 1536)."""
    expansion_factor: int = 32
    """Latents per residual dimension when `num_latents` is 0 (sparsify's default)."""
    k: int = 32
    """Active latents per token (TopK), the paper's k."""
    chunk_len: int = 2048
    """Tokens per training sequence; trigger texts are EOS-joined and cut to this length (authors: 2048)."""
    batch_size: int = 8
    """Sequences per optimizer step."""
    max_tokens: int | None = None
    """Cap on training tokens fed through the model (None: every chunk, `epochs` times)."""
    epochs: int = 1
    """Passes over the training chunks, each in a fresh seeded order."""
    lr: float | None = None
    """Learning rate; None picks sparsify's: signum 5e-3/sqrt(latents/2**14), adam 2e-4/sqrt(latents/2**14)."""
    optimizer: str = "signum"
    """`signum` (SignSGD in a schedule-free wrapper, sparsify's default) or `adam` (linear warmup and decay)."""
    lr_warmup_steps: int | None = None
    """Adam warmup in steps; None is 10% of the run, at most sparsify's 1000."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss that revives dead latents (Gao et al. 2024 use 1/32)."""
    dead_feature_threshold: int = 1_000_000
    """Tokens without firing after which a latent counts as dead for AuxK (trigger sets are small)."""
    heldout_fraction: float = 0.1
    """Share of rows held out of training for the metrics (split by the caller with data.split_rows)."""
    heldout_max_tokens: int = 8192
    """Cap on held-out tokens scored; each is run through the full model 1 + 2 x len(layers) times."""
    micro_batch_tokens: int = 4096
    """Tokens per SAE forward/backward slice; bounds the [tokens, latents] pre-activation memory."""
    mask_special_tokens: bool = True
    """Leave BOS/EOS/PAD positions out of SAE training and FVU (their norms are outliers)."""
    checkpoint_every: int = 100
    """Optimizer steps between checkpoints (0: only on cancel and at the end)."""
    cards: bool = True
    """After training, write latent cards per layer over the held-out chunks (sae/layers.<i>/latents.json),
    count reasoning features on the system prompt, and with several layers a report.json/report.png."""
    seed: int = 0
    """Seeds the SAE initialisation and the chunk order."""
    default_layer: int | None = None
    """Layer the skill uses when none is named; None picks the best held-out loss_recovered."""
    init_from: Path | None = None
    """Fine-tune from an existing skill folder (sae/layers.<i>/) or one sparsify SAE folder; its width and k are kept."""

    def __post_init__(self):
        if not isinstance(self.layers, (list, tuple)) or not self.layers:
            raise ValueError("layers must be a non-empty list of layer indices")
        if any(isinstance(i, bool) or not isinstance(i, int) for i in self.layers):
            raise ValueError(f"layers must be integers, got {list(self.layers)}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must not repeat, got {list(self.layers)}")
        self.layers = sorted(self.layers)
        _positive(self, "k", "chunk_len", "batch_size", "epochs", "micro_batch_tokens", "dead_feature_threshold", "heldout_max_tokens")
        if self.num_latents < 0 or self.expansion_factor <= 0:
            raise ValueError("num_latents must be >= 0 and expansion_factor > 0")
        if self.chunk_len < 2:
            raise ValueError(f"chunk_len must be at least 2 tokens, got {self.chunk_len}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.lr_warmup_steps is not None and self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.auxk_alpha < 0:
            raise ValueError(f"auxk_alpha must be >= 0, got {self.auxk_alpha}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.default_layer is not None and self.default_layer not in self.layers:
            raise ValueError(f"default_layer {self.default_layer} is not one of the layers {self.layers}")
        if self.init_from is not None:
            self.init_from = Path(self.init_from)

    @classmethod
    def from_params(cls, layers: list[int], sae: dict | None = None, train: dict | None = None, **extra) -> "ExtractConfig":
        """Build from JSON-shaped option groups (`sae`, `train`), refusing unknown keys and wrong types."""
        sae, train = dict(sae or {}), dict(train or {})
        for group, allowed, given in (("sae", SAE_FIELDS, sae), ("train", TRAIN_FIELDS, train)):
            unknown = sorted(set(given) - set(allowed))
            if unknown:
                raise ValueError(f"unknown {group} option(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        if sae.get("num_latents") and sae.get("expansion_factor"):
            raise ValueError("give sae.num_latents or sae.expansion_factor, not both")
        values = {**sae, **train, **extra}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, value in values.items():
            _check_type(key, value, types[key])
        return cls(layers=layers, **values)

    def resolved_num_latents(self, d_in: int) -> int:
        return self.num_latents or d_in * self.expansion_factor

    def resolved_lr(self, num_latents: int) -> float:
        """sparsify's automatic learning rate (trainer.py), unless one is given."""
        if self.lr is not None:
            return float(self.lr)
        base = 5e-3 if self.optimizer == "signum" else 2e-4
        return base / math.sqrt(num_latents / 2**14)


def _positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_type(key: str, value: Any, annotation: str) -> None:
    if value is None:
        if "None" not in annotation:
            raise ValueError(f"{key} must not be null")
        return
    if annotation.startswith("int") or annotation.startswith("list"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif annotation.startswith("bool"):
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, (str, Path))
    if not ok:
        raise ValueError(f"{key} has the wrong type ({type(value).__name__}; expected {annotation})")


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


# ---------------------------------------------------------------- data


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
    sparsify = _import_sparsify()
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


# ---------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
    """Everything a resumed run needs besides the SAE and optimizer tensors."""

    step: int = 0
    tokens_seen: int = 0
    train_tokens: int = 0
    """Unmasked tokens the SAEs trained on."""
    wall_s: float = 0.0
    last_fvu: dict[str, float] = field(default_factory=dict)


class Checkpoint:
    """SAE weights, optimizer state and dead-latent counters as safetensors; the rest as JSON.

    `state.json` is replaced last and names its tensor file, so a crash mid-save leaves the
    previous checkpoint intact. A checkpoint made for another config is ignored.
    """

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = Path(folder), key

    def load(self, saes, optimizer, since_fired, fired_ever) -> TrainState | None:
        from safetensors.torch import load_file

        try:
            meta = json.loads((self.folder / STATE_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if meta.get("key") != self.key or not (self.folder / meta.get("tensors", "")).is_file():
            return None
        device = next(iter(saes.values())).device
        tensors = load_file(str(self.folder / meta["tensors"]), device=str(device))
        with torch.no_grad():
            for layer, sae in saes.items():
                for name, p in sae.named_parameters():
                    p.copy_(tensors[f"sae.{layer}.{name}"])
                since_fired[layer].copy_(tensors[f"since_fired.{layer}"])
                fired_ever[layer].copy_(tensors[f"fired_ever.{layer}"])
        fresh = optimizer.state_dict()
        groups = []
        for new, old in zip(fresh["param_groups"], meta["param_groups"]):
            merged = dict(new)
            for k, v in old.items():
                merged[k] = tuple(v) if isinstance(new.get(k), tuple) else v
            groups.append(merged)
        state: dict[int, dict] = {}
        for name, t in tensors.items():
            if name.startswith("opt."):
                _, idx, key = name.split(".", 2)
                state.setdefault(int(idx), {})[key] = t
        for idx, scalars in meta.get("opt_scalars", {}).items():
            state.setdefault(int(idx), {}).update(scalars)
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        return TrainState(**meta["train_state"])

    def save(self, saes, optimizer, since_fired, fired_ever, ts: TrainState) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        for layer, sae in saes.items():
            for name, p in sae.named_parameters():
                tensors[f"sae.{layer}.{name}"] = p.detach()
            tensors[f"since_fired.{layer}"] = since_fired[layer]
            tensors[f"fired_ever.{layer}"] = fired_ever[layer]
        opt_state = optimizer.state_dict()
        scalars: dict[str, dict] = {}
        for idx, entries in opt_state["state"].items():
            for key, value in entries.items():
                if isinstance(value, Tensor):
                    tensors[f"opt.{idx}.{key}"] = value
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        name = f"state-{ts.step:09d}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.folder / name)
        meta = {
            "key": self.key,
            "tensors": name,
            "train_state": dataclasses.asdict(ts),
            "param_groups": [_jsonable(g) for g in opt_state["param_groups"]],
            "opt_scalars": scalars,
        }
        tmp_meta = self.folder / f".{STATE_FILE}.tmp"
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, self.folder / STATE_FILE)
        for old in self.folder.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)


def _jsonable(group: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}


def _run_key(model: LoadedModel, cfg: ExtractConfig, plan: TrainPlan, init_sha: str | None, num_latents: int) -> str:
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


def _init_sha(cfg: ExtractConfig) -> str | None:
    if cfg.init_from is None:
        return None
    combined = hashlib.sha256()
    for layer in cfg.layers:
        path = _init_sae_dir(cfg.init_from, layer) / "sae.safetensors"
        combined.update(f"{layer}:{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return combined.hexdigest()


# ---------------------------------------------------------------- training


def _training_positions(ids: Tensor, tokenizer, cfg: ExtractConfig) -> Tensor:
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


def _train(model, saes, optimizer, plan: TrainPlan, cfg: ExtractConfig, ckpt: Checkpoint | None, ts: TrainState,
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
            ckpt.save(saes, optimizer, since_fired, fired_ever, ts)

    try:
        tracker.update(ts.tokens_seen, force=True)
        while ts.step < plan.steps:
            ids = plan.batch(ts.step).to(device)
            keep = _training_positions(ids, model.tokenizer, cfg)
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


# ---------------------------------------------------------------- held-out metrics


@contextlib.contextmanager
def zero_ablate(layers, layer: int) -> Iterator[None]:
    """Replace block `layer`'s output by zeros: the floor for loss_recovered."""

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _next_token_logprobs(lm, ids: Tensor) -> Tensor:
    return F.log_softmax(lm(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)


class _FVU:
    """Fraction of variance unexplained over all tokens fed to it, around their global mean."""

    def __init__(self):
        self.err, self.sq, self.sum, self.n, self.l0 = 0.0, 0.0, None, 0, 0.0

    def update(self, x: Tensor, recon: Tensor, active: Tensor) -> None:
        xd = x.double()
        self.err += float((xd - recon.double()).pow(2).sum())
        self.sq += float(xd.pow(2).sum())
        self.sum = xd.sum(0) if self.sum is None else self.sum + xd.sum(0)
        self.n += x.shape[0]
        self.l0 += float(active.sum())

    @property
    def value(self) -> float:
        if not self.n:
            return float("nan")
        total_var = self.sq - float(self.sum.pow(2).sum()) / self.n
        return self.err / total_var if total_var > 0 else float("nan")


@torch.no_grad()
def heldout_metrics(model: LoadedModel, saes: dict[int, Any], data: TriggerDataset, cfg: ExtractConfig,
                    progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> dict[int, dict]:
    """Per layer on held-out chunks: FVU, L0, and next-token loss clean / spliced / zero-ablated.

    `fvu` and `l0` cover content positions: not BOS/EOS/PAD and not a chunk's first position,
    which acts as the attention sink (its norm is ~100x the rest in mid layers and would
    otherwise make up most of the variance); `fvu_all` keeps first positions, as training
    does. The losses splice every position, as Stage II does.
    """
    lm, blocks, layers = model.model, model.layers, sorted(saes)
    vocab = int(model.config.vocab_size)
    hb = max(1, min(16, _HELDOUT_LOGIT_BUDGET // (data.chunk_len * vocab)))
    fvu_content = {i: _FVU() for i in layers}
    fvu_all = {i: _FVU() for i in layers}
    nll = {i: dict(spliced=0.0, zero=0.0, kl=0.0) for i in layers}
    nll_clean, n_pred = 0.0, 0
    tracker = ProgressTracker("heldout", data.num_tokens, progress, should_stop)
    done = 0
    for _, ids in data.batches(hb):
        ids = ids.to(model.device)
        targets = ids[:, 1:].unsqueeze(-1)
        keep = _training_positions(ids, model.tokenizer, cfg)
        first = (torch.arange(ids.shape[1], device=ids.device) == 0).expand_as(ids).flatten()[keep]
        with capture_residual(blocks, layers) as captured:
            logp_clean = _next_token_logprobs(lm, ids)
        nll_clean += float(-logp_clean.gather(-1, targets).sum())
        n_pred += targets.numel()
        for i in layers:
            sae = saes[i]
            x = captured[i].flatten(0, 1)[keep].float()
            for part, is_first in zip(x.split(cfg.micro_batch_tokens), first.split(cfg.micro_batch_tokens)):
                top_acts, top_idx, _ = sae.encode(part)
                recon = sae.decode(top_acts, top_idx)
                active = (top_acts > 0).sum(-1)
                fvu_all[i].update(part, recon, active)
                fvu_content[i].update(part[~is_first], recon[~is_first], active[~is_first])
            with splice_sae(blocks, i, sae):
                logp = _next_token_logprobs(lm, ids)
            nll[i]["spliced"] += float(-logp.gather(-1, targets).sum())
            # KL(clean || spliced) = sum_v p_clean (log p_clean - log p_spliced), summed over positions
            nll[i]["kl"] += float(F.kl_div(logp, logp_clean, log_target=True, reduction="sum"))
            del logp
            with zero_ablate(blocks, i):
                logp = _next_token_logprobs(lm, ids)
            nll[i]["zero"] += float(-logp.gather(-1, targets).sum())
            del logp
        done += ids.numel()
        tracker.update(done)
    out = {}
    for i in layers:
        fvu = fvu_content[i].value
        clean, spliced, zero = nll_clean / n_pred, nll[i]["spliced"] / n_pred, nll[i]["zero"] / n_pred
        recovered = (zero - spliced) / (zero - clean) if abs(zero - clean) > 1e-12 else None
        out[i] = {
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "fvu_all": fvu_all[i].value,
            "l0": fvu_content[i].l0 / fvu_content[i].n if fvu_content[i].n else 0.0,
            "loss_clean": clean,
            "loss_spliced": spliced,
            "loss_zero": zero,
            "loss_recovered": recovered,
            "kl": nll[i]["kl"] / n_pred,
            "heldout_tokens": fvu_content[i].n,
        }
    return out


# ---------------------------------------------------------------- the whole stage


def _versions() -> dict[str, str]:
    out = {}
    for key, dist in (("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"), ("sparsify", "eai-sparsify")):
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = "unknown"
    out["resa"] = __version__
    return out


def _clean(value):
    """JSON-safe figures: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


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
    for layer in cfg.layers:
        model.check_layer(layer)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.chunk_len > max_pos:
        raise ValueError(f"chunk_len {cfg.chunk_len} exceeds {model.name}'s context of {max_pos} tokens")
    plan = plan_training(train_rows, model.tokenizer, cfg)
    heldout = heldout_dataset(heldout_rows, model.tokenizer, cfg)
    saes = build_saes(model, cfg)
    d_in = model.hidden_size
    num_latents = next(iter(saes.values())).num_latents
    lr = cfg.resolved_lr(num_latents)
    optimizer = make_optimizer(saes, lr, cfg.optimizer)
    since_fired = {i: torch.zeros(num_latents, dtype=torch.long, device=model.device) for i in cfg.layers}
    fired_ever = {i: torch.zeros(num_latents, dtype=torch.bool, device=model.device) for i in cfg.layers}
    init_sha = _init_sha(cfg)

    ckpt = Checkpoint(checkpoint_dir, _run_key(model, cfg, plan, init_sha, num_latents)) if checkpoint_dir else None
    ts = ckpt.load(saes, optimizer, since_fired, fired_ever) if ckpt else None
    resumed = ts is not None
    ts = ts or TrainState()
    resumed_tokens = ts.tokens_seen
    wall_before = ts.wall_s

    train_s = _train(model, saes, optimizer, plan, cfg, ckpt, ts, since_fired, fired_ever, lr, progress, should_stop)
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
            "init_from_sha256": init_sha,
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
        "metrics": {str(i): _clean(raw[i]) for i in cfg.layers},
        "tokens_seen": ts.tokens_seen,
        "train_tokens": ts.train_tokens,
        "wall_s": round(wall_s, 3),
        "resumed": resumed,
        "versions": _versions(),
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
    from .transparency import latent_cards, reasoning_features

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
    from .transparency import layer_report, render_report_png, save_cards

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
