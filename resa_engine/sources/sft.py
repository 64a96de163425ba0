"""Plain LoRA SFT on verified QA: the demo's cheap stand-in for an RL-tuned source model.

The paper's sources are base models lightly tuned with RL (GRPO) as LoRA checkpoints.
Here a LoRA is fitted with next-token cross-entropy on the answer part of the Resa
format (prompt tokens are masked out of the loss), which gives a source whose skill
on the task is measurably above the base model's, in minutes on a CPU.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..data import QARow, resa_completion, resa_prompt
from ..progress import ProgressFn, ProgressTracker, StopFn
from .common import SourceLora, SourceResult, head_tail_mean, save_lora_folder

if TYPE_CHECKING:  # torch loads when training starts: the config checks a request without it
    import torch

    from ..models import LoadedModel

SFTResult = SourceResult  # the name callers used before GRPO sources shared it


@dataclass
class SFTConfig(SourceLora):
    lora_r: int = 16
    """LoRA rank (smaller than the paper's: SFT fits it in minutes on a CPU)."""
    lora_alpha: float = 32
    """LoRA scale numerator, scale = alpha / r."""
    epochs: int = 1
    """Passes over the rows."""
    batch_size: int = 8
    """Rows per optimizer step."""
    lr: float = 2e-4
    """AdamW learning rate (constant after a 5% warm-up)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: all epochs)."""


def _encode(tokenizer, rows: list[QARow]) -> list[tuple[list[int], int]]:
    """(ids, prompt_len) per row: the loss covers only the completion and its EOS."""
    out = []
    for row in rows:
        prompt = tokenizer(resa_prompt(row.question), add_special_tokens=False)["input_ids"]
        completion = tokenizer(resa_completion(row.answer), add_special_tokens=False)["input_ids"]
        out.append((prompt + completion + [tokenizer.eos_token_id], len(prompt)))
    return out


def _batch(encoded: list[tuple[list[int], int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

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
) -> SourceResult:
    """Fit a LoRA with SFT and save it as a plain PEFT folder in `out_dir`."""
    import torch
    from peft import get_peft_model

    if not rows:
        raise ValueError("SFT needs at least one row")
    torch.manual_seed(cfg.seed)
    lora = cfg.peft_config()
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
        save_lora_folder(peft_model, Path(out_dir), model.name)
    finally:
        # leave the caller's model as it was: unwrap the LoRA layers
        model.model = peft_model.unload()
    head, tail = head_tail_mean(losses)
    manifest = {
        "origin": "sft",
        "target": {"model": model.name, "sha256": model.sha256},
        "lora": cfg.manifest(),
        "train": {**asdict(cfg), "steps": step, "rows": len(rows)},
        "seed": cfg.seed,
        "loss_start": head,
        "loss_end": tail,
        "wall_s": tracker.elapsed_s,
    }
    return SourceResult(steps=step, wall_s=tracker.elapsed_s, manifest=manifest, loss_start=head, loss_end=tail, history={"loss": losses})
