"""Stage II, SAE-guided tuning (paper §3, authors' code): build a LoRA adapter from a skill.

The target stays frozen; LoRA on its projections learns so that the target with the skill's
frozen SAE spliced in after block i matches the target without it:

  loss = KL(p_base || p_student), summed over the vocabulary, mean over token positions
  p_base    = target, adapter disabled, no splice, no grad
  p_student = target + LoRA, block i output replaced by SAE(h_i)

In the authors' code the splice runs under no_grad, so LoRA on blocks <= i never gets a
gradient, keeps B = 0 and computes exactly what the frozen target computes. The student then
reuses the teacher's h_i and runs only blocks i+1.. (same numbers, a cheaper step). With
`splice_grad` the SAE is differentiable and every adapter learns; the student runs in full.
`objective="ce"` is the paper-text variant: next-token cross-entropy with the splice in.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import QARow, TriggerDataset, dataset_sha256
from .hookpoint import capture_residual, run_until, sae_reconstruct, splice_sae
from .models import LoadedModel, ModelError, decoder_layers
from .progress import Cancelled, ProgressFn, ProgressTracker, StopFn
from .skill import Skill, sae_subdir

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OBJECTIVES = ("kl", "ce")
SCHEDULES = ("constant", "cosine")
PROBE_CHUNKS = 4  # chunks on which kl_start / kl_end are measured (eval mode, no dropout)
STATE_FILE = "state.json"


@dataclass
class LoraSettings:
    """The LoRA put on the target's projections (paper: r=32, alpha=128, dropout 0.05)."""

    r: int = 32
    """LoRA rank."""
    alpha: float = 128
    """LoRA scale numerator: the update B·A is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input while training, a probability in [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    """Names of the linear projections that get a LoRA pair (matched as module-name suffixes)."""

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError("lora target_modules must be a non-empty list of module names")


@dataclass
class TuneConfig:
    """SAE-guided tuning hyperparameters; the defaults are the authors' recipe."""

    objective: str = "kl"
    """`kl` (authors' code: match the base model's next-token distribution) or `ce` (paper text: SFT on the trigger text)."""
    layer: int | None = None
    """Decoder block after which the SAE is spliced (0-based); None takes the skill's default layer."""
    splice_grad: bool = False
    """False (faithful): no gradient through the splice, only adapters after the layer learn. True: every adapter learns."""
    lr: float = 1e-6
    """AdamW learning rate."""
    epochs: float = 2
    """Passes over the chunked dataset (a fraction runs that share of the first pass)."""
    batch_size: int = 1
    """Chunks per optimizer step."""
    chunk_len: int = 2048
    """Tokens per chunk (examples joined with EOS, cut to this length)."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    schedule: str = "constant"
    """Learning-rate schedule: `constant` or `cosine` (decay to 0 over the run, no warm-up)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: all epochs)."""
    seed: int = 0
    """Seeds the LoRA initialisation, the chunk order and dropout."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The adapter's shape."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many steps (and always when cancelled)."""

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, float)) or not self.epochs > 0:
            raise ValueError(f"epochs must be a positive number, got {self.epochs!r}")
        for name in ("batch_size", "chunk_len", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.chunk_len < 2:
            raise ValueError(f"chunk_len must be at least 2, got {self.chunk_len}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")
        self.lora.validate()

    def to_dict(self) -> dict:
        return asdict(self)


class StepLoss(NamedTuple):
    loss: Tensor
    """The objective to backpropagate (KL or CE)."""
    kl: float
    """KL(p_base || p_student) per token, nats (NaN for `ce` steps, which skip the teacher)."""
    recon_mse: float
    """Mean squared error of the SAE reconstruction at the splice."""


@dataclass
class TuneResult:
    out_dir: Path
    """The PEFT folder: adapter_config.json, adapter_model.safetensors, manifest.json."""
    manifest: dict
    """Provenance and metrics (the store manifest body)."""
    steps: int
    """Optimizer steps taken in total (including those before a resume)."""
    kl_start: float
    """KL on the probe chunks before training."""
    kl_end: float
    """KL on the probe chunks after training."""
    losses: list[float]
    """The training loss of every step."""
    resumed_from: int = 0
    """Step the run resumed at (0: fresh)."""


# ---------------------------------------------------------------- the objective


class _Skip(nn.Module):
    """Stands in for a block whose output the student takes from the teacher."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Inject(nn.Module):
    """Stands in for block i: returns the (spliced) hidden state computed beforehand."""

    def __init__(self, hidden: Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden


class SpliceObjective:
    """The Stage II loss of one batch for a LoRA-wrapped target with the SAE spliced after `layer`."""

    def __init__(self, peft_model, sae, layer: int, *, objective: str = "kl", splice_grad: bool = False):
        self.model, self.sae, self.layer = peft_model, sae, layer
        self.objective, self.splice_grad = objective, splice_grad
        self.base = peft_model.get_base_model()
        self.layers = decoder_layers(self.base)
        # Blocks <= layer get no gradient without splice_grad, so their LoRA stays exactly zero.
        self.reuse_prefix = not splice_grad

    def __call__(self, input_ids: Tensor) -> StepLoss:
        if self.objective == "ce":
            return self._ce(input_ids)
        return self._kl(input_ids)

    def kl(self, input_ids: Tensor) -> float:
        """KL(p_base || p_student) per token for a batch, without gradient."""
        with torch.no_grad():
            return self._kl(input_ids).kl

    def _teacher(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Base log-probs (adapter off, no splice) and the block-i output, no grad."""
        with torch.no_grad(), self.model.disable_adapter(), capture_residual(self.layers, [self.layer]) as cap:
            logits = self.model(input_ids=input_ids, use_cache=False).logits
            return F.log_softmax(logits.float(), dim=-1), cap[self.layer]

    def _student_logits(self, input_ids: Tensor, h: Tensor | None) -> tuple[Tensor, float]:
        """Student logits with block i's output replaced by SAE(h_i), and the reconstruction MSE."""
        if self.reuse_prefix:
            if h is None:
                with torch.no_grad(), self.model.disable_adapter():
                    h = run_until(self.model, input_ids, self.layers, [self.layer])[self.layer]
            with torch.no_grad():
                recon = sae_reconstruct(self.sae, h)
                mse = float((recon.float() - h.float()).pow(2).mean())
            return self._suffix_logits(input_ids, recon), mse
        with capture_residual(self.layers, [self.layer]) as cap, splice_sae(self.layers, self.layer, self.sae, grad=self.splice_grad):
            logits = self.model(input_ids=input_ids, use_cache=False).logits
        with torch.no_grad():
            h = cap[self.layer]
            mse = float((sae_reconstruct(self.sae, h).float() - h.float()).pow(2).mean())
        return logits, mse

    def _suffix_logits(self, input_ids: Tensor, recon: Tensor) -> Tensor:
        """Run only blocks i+1.. on the spliced hidden state (blocks <= i are skipped, not recomputed)."""
        inner = self.base.model
        original = inner.layers
        skip = _Skip()
        inner.layers = nn.ModuleList([skip] * self.layer + [_Inject(recon)] + list(original)[self.layer + 1 :])
        try:
            return self.model(input_ids=input_ids, use_cache=False).logits
        finally:
            inner.layers = original

    def _kl(self, input_ids: Tensor) -> StepLoss:
        base_logp, h = self._teacher(input_ids)
        logits, mse = self._student_logits(input_ids, h)
        student_logp = F.log_softmax(logits.float(), dim=-1)
        # sum over the vocabulary, mean over token positions (authors' code)
        kl = F.kl_div(student_logp, base_logp, log_target=True, reduction="sum") / (input_ids.numel())
        return StepLoss(kl, float(kl.detach()), mse)

    def _ce(self, input_ids: Tensor) -> StepLoss:
        logits, mse = self._student_logits(input_ids, None)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))
        return StepLoss(loss, float("nan"), mse)


# ---------------------------------------------------------------- LoRA set-up


def check_target_modules(model: LoadedModel, target_modules: list[str]) -> None:
    names = {n.rsplit(".", 1)[-1] for n, m in model.base.named_modules() if isinstance(m, nn.Linear)}
    missing = [m for m in target_modules if m not in names]
    if missing:
        raise ModelError(f"{model.name} has no linear module named {', '.join(missing)} (LoRA target_modules)")


def add_lora(model: LoadedModel, lora: LoraSettings, seed: int):
    """Wrap the frozen target with a fresh LoRA (B = 0, A seeded): the student of Stage II."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model.model, PeftModel):
        raise ModelError(f"{model.name} has adapters attached; tuning needs the plain base model")
    check_target_modules(model, lora.target_modules)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules), task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model.model, config)
    peft_model.peft_config["default"].base_model_name_or_path = model.name
    return peft_model


def remove_lora(model: LoadedModel, peft_model) -> None:
    """Drop the LoRA layers again: the LoadedModel is the untouched frozen base afterwards."""
    base = peft_model.unload()
    base.requires_grad_(False)
    base.eval()
    model.model = base


# ---------------------------------------------------------------- checkpoints (safetensors + JSON, never pickle)


def _save_checkpoint(ckpt: Path, step: int, peft_model, opt, meta: dict) -> None:
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    lora = {n: p.detach().cpu().contiguous() for n, p in peft_model.named_parameters() if p.requires_grad}
    opt_sd = opt.state_dict()
    opt_tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in opt_sd["state"].items() for k, v in s.items()}
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    files = {"lora": f"lora-{step}.safetensors", "optimizer": f"optimizer-{step}.safetensors", "rng": f"rng-{step}.safetensors"}
    save_file(lora, str(ckpt / files["lora"]))
    save_file(opt_tensors, str(ckpt / files["optimizer"]))
    save_file(rng, str(ckpt / files["rng"]))
    state = {**meta, "step": step, "files": files, "param_groups": opt_sd["param_groups"]}
    tmp = ckpt / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, ckpt / STATE_FILE)  # the state file names the complete set; it is written last
    for f in ckpt.glob("*.safetensors"):
        if f.name not in files.values():
            f.unlink(missing_ok=True)


def _load_checkpoint(ckpt: Path, fingerprint: str, peft_model, opt) -> dict | None:
    from safetensors.torch import load_file

    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if state.get("fingerprint") != fingerprint:
        shutil.rmtree(ckpt, ignore_errors=True)  # another run's checkpoint: start over
        return None
    files = state["files"]
    lora = load_file(str(ckpt / files["lora"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_(lora[n].to(p.device, p.dtype))
    flat = load_file(str(ckpt / files["optimizer"]))
    opt_state: dict[int, dict[str, Tensor]] = {}
    for key, value in flat.items():
        i, name = key.split(".", 1)
        opt_state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    rng = load_file(str(ckpt / files["rng"]))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


# ---------------------------------------------------------------- the loop


def _lr_at(cfg: TuneConfig, step: int, total: int) -> float:
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
    return cfg.lr


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """A seeded chunk order per epoch: a resumed run sees the same chunks at the same step."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _versions() -> dict:
    import peft
    import sparsify
    import transformers

    from . import __version__

    return {
        "resa": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "sparsify": getattr(sparsify, "__version__", "unknown"),
    }


def _sae_sha256(skill: Skill, layer: int) -> str:
    listed = (skill.manifest.get("files") or {}).get(f"{sae_subdir(layer)}/sae.safetensors")
    if listed:
        return listed["sha256"]
    digest = hashlib.sha256((skill.folder / sae_subdir(layer) / "sae.safetensors").read_bytes())
    return digest.hexdigest()


def tune_adapter(
    model: LoadedModel,
    skill: Skill,
    rows: list[QARow],
    cfg: TuneConfig,
    out_dir: Path | str,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    checkpoint_dir: Path | str | None = None,
) -> TuneResult:
    """Train a LoRA adapter on `model` from `skill` (Stage II) and save it as a PEFT folder in `out_dir`.

    Raises ModelError when the skill's SAE does not read this model (width, layer), Cancelled when
    `should_stop` says so (after saving a checkpoint). With `checkpoint_dir` a re-run with the same
    inputs resumes at the saved step and ends with the same weights as an uninterrupted run.
    """
    cfg.validate()
    t0 = time.perf_counter()
    layer = skill.check_target(model, cfg.layer)
    data = TriggerDataset.from_rows(rows, model.tokenizer, cfg.chunk_len)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    data_sha = dataset_sha256(rows)
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "cfg": {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"},
                "layer": layer,
                "model": model.sha256,
                "sae": _sae_sha256(skill, layer),
                "data": data_sha,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()

    sae = skill.sae(layer, device=model.device)
    peft_model = add_lora(model, cfg.lora, cfg.seed)
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        objective = SpliceObjective(peft_model, sae, layer, objective=cfg.objective, splice_grad=cfg.splice_grad)
        probe = data.chunks[: min(PROBE_CHUNKS, len(data))].to(model.device)

        ckpt = Path(checkpoint_dir) if checkpoint_dir else None
        state = _load_checkpoint(ckpt, fingerprint, peft_model, opt) if ckpt else None
        if state:
            start, kl_start, losses, prior_wall = state["step"], state["kl_start"], state["losses"], state["wall_s"]
        else:
            peft_model.eval()
            start, kl_start, losses, prior_wall = 0, _probe_kl(objective, probe), [], 0.0

        def meta() -> dict:
            """What a checkpoint records besides tensors."""
            return {"fingerprint": fingerprint, "kl_start": kl_start, "losses": losses, "wall_s": prior_wall + time.perf_counter() - t0}

        tracker = ProgressTracker("tune", total, progress, should_stop, start_step=start)
        peft_model.train()
        step = start
        while step < total:
            epoch, pos = divmod(step, steps_per_epoch)
            idx = _epoch_order(len(data), cfg.seed, epoch)[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
            batch = data.chunks[idx].to(model.device)
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, step, total)
            out = objective(batch)
            out.loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(out.loss.detach()))
            if not math.isfinite(losses[-1]):
                raise ValueError(f"tuning diverged: loss {losses[-1]} at step {step}; lower the learning rate ({cfg.lr})")
            if ckpt and step % cfg.checkpoint_every == 0 and step < total:
                _save_checkpoint(ckpt, step, peft_model, opt, meta())
            metrics = {"loss": losses[-1], "recon_mse": out.recon_mse}
            if not math.isnan(out.kl):  # `ce` steps run no teacher; report no KL rather than NaN
                metrics["kl"] = out.kl
            try:
                tracker.update(step, **metrics)
            except Cancelled:
                if ckpt:
                    _save_checkpoint(ckpt, step, peft_model, opt, meta())
                raise

        peft_model.eval()
        kl_end = _probe_kl(objective, probe)
        wall_s = prior_wall + time.perf_counter() - t0
        manifest = {
            "skill": skill.name,
            "target": {"model": model.name, "sha256": model.sha256},
            "layer": layer,
            "objective": cfg.objective,
            "splice_grad": cfg.splice_grad,
            "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout, "target_modules": list(cfg.lora.target_modules)},
            "train": {
                "lr": cfg.lr,
                "epochs": cfg.epochs,
                "batch_size": cfg.batch_size,
                "chunk_len": cfg.chunk_len,
                "grad_clip": cfg.grad_clip,
                "schedule": cfg.schedule,
                "weight_decay": cfg.weight_decay,
                "max_steps": cfg.max_steps,
                "steps": step,
                "resumed_from": start,
                "chunks": len(data),
                "tokens": step * cfg.batch_size * cfg.chunk_len,
            },
            "seed": cfg.seed,
            "dataset": {"sha256": data_sha, "rows": len(rows)},
            "skill_source": skill.manifest.get("source"),
            "sae_sha256": _sae_sha256(skill, layer),
            "kl_start": kl_start,
            "kl_end": kl_end,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "wall_s": round(wall_s, 3),
            "versions": _versions(),
        }
        _write_adapter(peft_model, Path(out_dir), manifest)
    finally:
        remove_lora(model, peft_model)
    if ckpt:
        shutil.rmtree(ckpt, ignore_errors=True)  # the adapter is complete; nothing left to resume
    return TuneResult(Path(out_dir), manifest, step, kl_start, kl_end, losses, resumed_from=start)


def _probe_kl(objective: SpliceObjective, probe: Tensor) -> float:
    return sum(objective.kl(probe[i : i + 1]) for i in range(len(probe))) / max(len(probe), 1)


def _write_adapter(peft_model, out_dir: Path, manifest: dict) -> None:
    """A plain PEFT folder (adapter_config.json + adapter_model.safetensors) plus manifest.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.iterdir():
        if stale.is_file():
            stale.unlink()
    # save_embedding_layers=False: otherwise PEFT probes the Hub for the base model's config.
    peft_model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's generated model card; the manifest is the record
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
