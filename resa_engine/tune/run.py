"""Stage II, SAE-guided tuning (paper §3): build a LoRA adapter for a target model from a skill.

The loop is one screen: a seeded chunk order, the objective (objective.py), AdamW with
clipping, checkpoints, progress. The adapter is written as a plain PEFT folder with a manifest,
whose `transfer` holds the diagnostics measured on rows held out of tuning (resa_engine.transfer).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..artifacts import Skill, sae_subdir
from ..checkpoint import Checkpoint, optimizer_state, restore_optimizer, restore_rng, rng_state
from ..data import QARow, TriggerDataset, dataset_sha256, split_rows
from ..errors import Cancelled, ModelError
from ..lora.peft_io import ModelShapes, PeftAdapter
from ..models import LoadedModel
from ..progress import ProgressFn, ProgressTracker, StopFn
from ..provenance import sha256_file, versions
from ..transfer import TransferDiagnostics, content_mask, heldout_chunks, heldout_kl, residual_delta, sae_on_target
from .config import LoraSettings, TuneConfig
from .objective import SpliceObjective

PROBE_CHUNKS = 4  # chunks on which kl_start / kl_end are measured (eval mode, no dropout)


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
    transfer: dict | None = None
    """The manifest's `transfer` (TransferDiagnostics.to_dict()); None when no rows were held out."""


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


def _save_checkpoint(ckpt: Checkpoint, step: int, peft_model, opt, meta: dict) -> None:
    """The LoRA weights, AdamW state and RNG state (dropout), in the one checkpoint format."""
    tensors, opt_json = optimizer_state(opt)
    tensors.update({f"lora.{n}": p for n, p in peft_model.named_parameters() if p.requires_grad})
    tensors.update(rng_state())
    ckpt.save(step, tensors, {**meta, "optimizer": opt_json})


def _load_checkpoint(ckpt: Checkpoint, peft_model, opt) -> dict | None:
    loaded = ckpt.load()
    if loaded is None:
        return None
    meta, tensors = loaded
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_(tensors[f"lora.{n}"].to(p.device, p.dtype))
    restore_optimizer(opt, tensors, meta["optimizer"])
    restore_rng(tensors)
    return meta


def _lr_at(cfg: TuneConfig, step: int, total: int) -> float:
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
    return cfg.lr


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """A seeded chunk order per epoch: a resumed run sees the same chunks at the same step."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _sae_sha256(skill: Skill, layer: int) -> str:
    listed = (skill.manifest.get("files") or {}).get(f"{sae_subdir(layer)}/sae.safetensors")
    if isinstance(listed, dict) and listed.get("sha256"):
        return listed["sha256"]
    return sha256_file(skill.folder / sae_subdir(layer) / "sae.safetensors")


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
    cfg.check_model(model.name, model.context)
    t0 = time.perf_counter()
    layer = skill.check_fits(model.name, model.hidden_size, model.num_layers, cfg.layer)
    shapes = ModelShapes.of(model)  # before the LoRA wraps it: what the written adapter is checked against
    train_rows, heldout_rows = split_rows(rows, cfg.heldout_fraction, cfg.seed)
    data = TriggerDataset.from_rows(train_rows, model.tokenizer, cfg.chunk_len)
    held = heldout_chunks(heldout_rows, model.tokenizer, cfg.chunk_len, cfg.heldout_max_tokens) if heldout_rows else None
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

    sae = random_like(skill.sae(layer, device=model.device), cfg.seed) if cfg.random_sae else skill.sae(layer, device=model.device)
    on_target = sae_on_target(model, sae, layer, held) if held is not None else None  # the plain target, before the LoRA
    peft_model = add_lora(model, cfg.lora, cfg.seed)
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        objective = SpliceObjective(peft_model, sae, layer, objective=cfg.objective, splice_grad=cfg.splice_grad)
        probe = data.chunks[: min(PROBE_CHUNKS, len(data))].to(model.device)
        kl_heldout_before = heldout_kl(objective, held) if held is not None else None  # B = 0, even on a resume

        ckpt = Checkpoint(checkpoint_dir, fingerprint) if checkpoint_dir else None
        state = _load_checkpoint(ckpt, peft_model, opt) if ckpt else None
        if state:
            start, kl_start, losses, prior_wall = state["step"], state["kl_start"], state["losses"], state["wall_s"]
        else:
            peft_model.eval()
            start, kl_start, losses, prior_wall = 0, _probe_kl(objective, probe), [], 0.0

        def meta() -> dict:
            """What a checkpoint records besides tensors."""
            return {"kl_start": kl_start, "losses": losses, "wall_s": prior_wall + time.perf_counter() - t0}

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
            # `ce`/`sft` steps run no teacher and `sft` no SAE: report no figure rather than NaN
            metrics = {"loss": losses[-1], **{k: v for k, v in (("recon_mse", out.recon_mse), ("kl", out.kl)) if not math.isnan(v)}}
            try:
                tracker.update(step, **metrics)
            except Cancelled:
                if ckpt:
                    _save_checkpoint(ckpt, step, peft_model, opt, meta())
                raise

        peft_model.eval()
        kl_end = _probe_kl(objective, probe)
        transfer = None
        if held is not None:
            mask = content_mask(held, model.tokenizer)
            delta_l2, delta_rel = residual_delta(peft_model, objective.layers, held, mask)
            transfer = TransferDiagnostics(
                layer=layer, target_fvu=on_target["fvu"], target_loss_recovered=on_target["loss_recovered"], target_kl_spliced=on_target["kl"],
                kl_heldout_before=kl_heldout_before, kl_heldout_after=heldout_kl(objective, held),
                residual_delta_l2=delta_l2, residual_delta_rel=delta_rel, heldout_tokens=held.numel(), content_tokens=int(mask.sum()),
            ).to_dict()  # fmt: skip
        wall_s = prior_wall + time.perf_counter() - t0
        manifest = {
            "skill": skill.name,
            "target": {"model": model.name, "sha256": model.sha256},
            "layer": layer,
            "objective": cfg.objective,
            "random_sae": cfg.random_sae,
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
                "heldout_fraction": cfg.heldout_fraction,
                "heldout_max_tokens": cfg.heldout_max_tokens,
                "steps": step,
                "resumed_from": start,
                "chunks": len(data),
                "tokens": step * cfg.batch_size * cfg.chunk_len,
            },
            "seed": cfg.seed,
            "dataset": {"sha256": data_sha, "rows": len(rows), "train_rows": len(train_rows), "heldout_rows": len(heldout_rows)},
            "skill_source": skill.manifest.get("source"),
            "sae_sha256": None if cfg.random_sae else _sae_sha256(skill, layer),
            "kl_start": kl_start,
            "kl_end": kl_end,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "transfer": transfer,
            "wall_s": round(wall_s, 3),
            "versions": versions(),
        }
        _write_adapter(peft_model, Path(out_dir), manifest)
        PeftAdapter.read(out_dir).check(shapes)  # what was written loads as a servable adapter of this model
    finally:
        remove_lora(model, peft_model)
    if ckpt:
        shutil.rmtree(ckpt.folder, ignore_errors=True)  # the adapter is complete; nothing left to resume
    return TuneResult(Path(out_dir), manifest, step, kl_start, kl_end, losses, resumed_from=start, transfer=transfer)


def random_like(sae, seed: int):
    """An untrained SparseCoder of `sae`'s shape and config, seeded: the random-SAE control's SAE. The seed is
    salted: a fresh SAE built from the same seed (as extraction initialises one) is never the control's."""
    from ..sae.load import import_sparsify

    sparsify = import_sparsify()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + 0x5AE)
        fresh = sparsify.SparseCoder(sae.d_in, sae.cfg, device=sae.device, dtype=sae.dtype)
    fresh.requires_grad_(False)
    return fresh.eval()


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
