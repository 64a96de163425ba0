"""Plain LoRA SFT on verified QA: the demo's cheap stand-in for an RL-tuned source model.

The paper's sources are base models lightly tuned with RL (GRPO) as LoRA checkpoints.
Here a LoRA is fitted with next-token cross-entropy on the answer part of the Resa
format (prompt tokens are masked out of the loss), which gives a source whose skill
on the task is measurably above the base model's, in minutes on a CPU.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data import QARow, resa_completion, resa_prompt
from .models import LoadedModel
from .progress import ProgressFn, ProgressTracker, StopFn

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class SFTConfig:
    epochs: int = 1
    """Passes over the rows."""
    batch_size: int = 8
    """Rows per optimizer step."""
    lr: float = 2e-4
    """AdamW learning rate (constant after a 5% warm-up)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Projections that get a LoRA."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: all epochs)."""
    seed: int = 0
    """Seeds the LoRA init and the row order."""


@dataclass
class SFTResult:
    steps: int
    loss_start: float
    loss_end: float
    wall_s: float
    manifest: dict


def _encode(tokenizer, rows: list[QARow]) -> list[tuple[list[int], int]]:
    """(ids, prompt_len) per row: the loss covers only the completion and its EOS."""
    out = []
    for row in rows:
        prompt = tokenizer(resa_prompt(row.question), add_special_tokens=False)["input_ids"]
        completion = tokenizer(resa_completion(row.answer), add_special_tokens=False)["input_ids"]
        out.append((prompt + completion + [tokenizer.eos_token_id], len(prompt)))
    return out


def _batch(encoded: list[tuple[list[int], int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        mask[i, : len(ids)] = 1
    return input_ids.to(device), labels.to(device), mask.to(device)


def train_sft_lora(
    model: LoadedModel,
    rows: list[QARow],
    cfg: SFTConfig,
    out_dir: Path,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> SFTResult:
    """Fit a LoRA with SFT and save it as a plain PEFT folder in `out_dir`."""
    from peft import LoraConfig, get_peft_model

    if not rows:
        raise ValueError("SFT needs at least one row")
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model.model, lora)
    try:
        encoded = _encode(model.tokenizer, rows)
        order = list(range(len(encoded)))
        steps_per_epoch = (len(order) + cfg.batch_size - 1) // cfg.batch_size
        total = min(cfg.max_steps or steps_per_epoch * cfg.epochs, steps_per_epoch * cfg.epochs)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        warmup = max(1, total // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        tracker = ProgressTracker("sft", total, progress, should_stop)
        rng = random.Random(cfg.seed)
        peft_model.train()
        step, losses = 0, []
        while step < total:
            rng.shuffle(order)
            for start in range(0, len(order), cfg.batch_size):
                if step >= total:
                    break
                ids, labels, mask = _batch([encoded[i] for i in order[start : start + cfg.batch_size]], model.tokenizer.pad_token_id, model.device)
                loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                losses.append(loss.detach().item())
                tracker.update(step, loss=losses[-1])
        peft_model.eval()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(out_dir)
        _set_base_name(out_dir, model.name)
    finally:
        # leave the caller's model as it was: unwrap the LoRA layers
        model.model = peft_model.unload()
    head = sum(losses[: max(1, len(losses) // 10)]) / max(1, len(losses[: max(1, len(losses) // 10)]))
    tail = sum(losses[-max(1, len(losses) // 10) :]) / max(1, len(losses[-max(1, len(losses) // 10) :]))
    manifest = {
        "origin": "sft",
        "target": {"model": model.name, "sha256": model.sha256},
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "target_modules": list(cfg.target_modules)},
        "train": {**asdict(cfg), "steps": step, "rows": len(rows)},
        "seed": cfg.seed,
        "loss_start": head,
        "loss_end": tail,
        "wall_s": tracker.elapsed_s,
    }
    return SFTResult(steps=step, loss_start=head, loss_end=tail, wall_s=tracker.elapsed_s, manifest=manifest)


def _set_base_name(folder: Path, name: str) -> None:
    """Record the registered model name, not a local path, as the adapter's base."""
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = name
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
