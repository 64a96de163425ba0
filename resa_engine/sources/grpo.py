"""A GRPO source, made the way the paper's are: a LoRA lightly tuned with RL on an accuracy reward.

The paper's sources are Tina checkpoints: LoRA (r=32, alpha=128, dropout 0.05 on the seven
projections) fitted with GRPO on verified math, the reward coming from checking the final answer.
Here TRL's `GRPOTrainer` does the same on the training rows: each step samples `num_generations`
completions of the Resa evaluation prompt (`evaluate.eval_prompt`, no chat template) for
`batch_size` questions, scores each 1.0 when its final answer is the verified one (math-verify,
read the way evaluation reads it) and 0.0 otherwise, and moves the LoRA towards the completions
that beat their group's mean.

TRL runs in a private temp folder with reporting, checkpoints and downloads off, on whatever the
LoadedModel is (fp32 on CPU, bf16 autocast when the model is bf16 on a GPU); the caller's model
is left as it was. Nothing here imports torch or TRL until training starts, so the config checks
a request anywhere.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..answers import extract_answer, is_correct
from ..data import QARow
from ..errors import ModelError
from ..progress import ProgressFn, ProgressTracker, StopFn
from .common import SourceLora, SourceResult, head_tail_mean, save_lora_folder

# Where evaluation ends a completion (EvalConfig.stop): the answer is complete, or the model starts
# the next user turn. The reward reads a completion only up to there, as evaluation does.
EVAL_STOP = ("</answer>", "\nUser:")
REWARD_NAME = "accuracy"


@dataclass
class GRPOSourceConfig(SourceLora):
    """GRPO recipe for a source LoRA. LoRA shape, temperature, warm-up and schedule are the paper's
    (Tina recipes); steps, batch and lr are sized for a short job, not the paper's 1e-6 x 850+ steps."""

    steps: int = 100
    """Optimizer steps; each samples a fresh batch of prompts and their completions."""
    batch_size: int = 4
    """Prompts (questions) per step."""
    num_generations: int = 4
    """Completions sampled per prompt: the GRPO group whose mean reward is each completion's baseline (at least 2)."""
    max_completion_length: int = 256
    """Most tokens sampled per completion (the paper: 3584, for long reasoning)."""
    temperature: float = 0.7
    """Sampling temperature of the rollouts (the paper: 0.7)."""
    top_p: float = 1.0
    """Nucleus sampling mass of the rollouts (1.0: off)."""
    lr: float = 1e-5
    """AdamW peak learning rate (the paper: 1e-6 over hundreds of steps)."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent warming the lr up linearly; then cosine decay to 10% (the paper's schedule)."""
    beta: float = 0.0
    """KL coefficient against the model without the LoRA (0: no KL term and no reference forward pass)."""
    micro_batch_size: int | None = None
    """Completions per forward/backward pass (None: all batch_size x num_generations at once); lower saves memory."""

    def validate(self) -> "GRPOSourceConfig":
        """ValueError naming the first field that cannot work; returns self."""
        ints = {"steps": 1, "batch_size": 1, "num_generations": 2, "max_completion_length": 1, "lora_r": 1}
        for name, low in ints.items():
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"grpo `{name}` must be an integer >= {low}, got {value!r}")
        if not _is_int(self.seed):
            raise ValueError(f"grpo `seed` must be an integer, got {self.seed!r}")
        for name in ("temperature", "lr", "lora_alpha"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"grpo `{name}` must be a positive number, got {value!r}")
        for name, low, high in (("top_p", 0.0, 1.0), ("warmup_ratio", 0.0, 1.0), ("lora_dropout", 0.0, 1.0)):
            value = getattr(self, name)
            if not _is_number(value) or not low <= value <= high or (name != "top_p" and value == high) or (name == "top_p" and value == 0):
                raise ValueError(f"grpo `{name}` must be a number in {'(0, 1]' if name == 'top_p' else '[0, 1)'}, got {value!r}")
        if not _is_number(self.beta) or self.beta < 0 or not math.isfinite(self.beta):
            raise ValueError(f"grpo `beta` must be a number >= 0, got {self.beta!r}")
        if not isinstance(self.target_modules, (list, tuple)) or not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError("grpo `target_modules` must be a non-empty list of module names")
        if self.micro_batch_size is not None:
            group = self.batch_size * self.num_generations
            if not _is_int(self.micro_batch_size) or self.micro_batch_size < 1 or group % self.micro_batch_size:
                raise ValueError(
                    f"grpo `micro_batch_size` must divide batch_size x num_generations = {group}, got {self.micro_batch_size!r}"
                )
        return self


def completion_reward(completion: str, gold: str) -> float:
    """1.0 when the completion's final answer (read up to evaluation's stop strings) is the verified one."""
    text = completion
    for stop in EVAL_STOP:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    return 1.0 if is_correct(extract_answer(text), gold) else 0.0


def accuracy_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """TRL reward function: one accuracy reward per completion (`answer` is the dataset column)."""
    return [completion_reward(c, a) for c, a in zip(completions, answer, strict=True)]


def train_grpo_lora(
    model,
    rows: list[QARow],
    cfg: GRPOSourceConfig,
    out_dir: Path,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> SourceResult:
    """Fit a LoRA with GRPO (accuracy reward) on `rows` and save it as a plain PEFT folder in `out_dir`.

    `model` (a LoadedModel) is the plain base and is left unchanged. Progress reports stage `grpo`
    with the step's mean `reward` and `loss`; `should_stop` stops training at a step boundary
    (Cancelled, nothing saved).
    """
    cfg.validate()
    if len(rows) < cfg.batch_size:
        raise ValueError(f"GRPO needs at least batch_size = {cfg.batch_size} rows, got {len(rows)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every object is passed in: nothing may be fetched
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback

    with _quiet():
        import trl
        from trl import GRPOConfig, GRPOTrainer

    from ..evaluate import eval_prompt
    from ..tune.run import check_target_modules

    if isinstance(model.model, PeftModel):
        raise ModelError(f"{model.name} has adapters attached; a source LoRA is trained on the plain base model")
    check_target_modules(model, list(cfg.target_modules))

    base = model.model
    saved = _snapshot(base)
    rewards: list[float] = []
    losses: list[float] = []

    def accuracy(prompts, completions, answer, **kw):
        out = accuracy_reward(completions, answer)
        rewards.append(sum(out) / len(out))
        return out

    accuracy.__name__ = REWARD_NAME  # TRL logs it as rewards/accuracy/mean

    tracker = ProgressTracker("grpo", cfg.steps, progress, should_stop)

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:  # a step's log (the end-of-training summary has train_loss instead)
                losses.append(float(logs["loss"]))
                tracker.update(state.global_step, reward=rewards[-1] if rewards else float("nan"), loss=losses[-1])

    group = cfg.batch_size * cfg.num_generations
    micro = cfg.micro_batch_size or group
    on_cpu = model.device.type == "cpu"
    bf16 = model.dtype == torch.bfloat16 and not on_cpu
    dataset = Dataset.from_dict({"prompt": [eval_prompt(r.question) for r in rows], "answer": [r.answer for r in rows]})
    lora = cfg.peft_config()
    peft_model = None
    try:
        with tempfile.TemporaryDirectory(prefix="resa-grpo-") as tmp, _quiet():
            args = GRPOConfig(
                output_dir=tmp,
                report_to="none",
                save_strategy="no",
                logging_strategy="steps",
                logging_steps=1,
                disable_tqdm=True,
                use_cpu=on_cpu,
                bf16=bf16,
                fp16=False,
                gradient_checkpointing=False,  # it would hook the caller's embeddings; models here fit without it
                max_steps=cfg.steps,
                per_device_train_batch_size=micro,
                gradient_accumulation_steps=group // micro,  # one generation of batch_size x num_generations per step
                num_generations=cfg.num_generations,
                max_completion_length=cfg.max_completion_length,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                # transformers' Trainer sets model.config.use_cache = args.use_cache (False), and generate()
                # then samples without a KV cache: ~quadratic in length, gigabytes of logits on CPU
                generation_kwargs={"use_cache": True},
                learning_rate=cfg.lr,
                lr_scheduler_type="cosine_with_min_lr",
                lr_scheduler_kwargs={"min_lr_rate": 0.1},
                warmup_steps=int(round(cfg.steps * cfg.warmup_ratio)),
                beta=cfg.beta,
                seed=cfg.seed,
                data_seed=cfg.seed,
                dataloader_num_workers=0,
                dataloader_pin_memory=False,
                log_completions=False,
                push_to_hub=False,
            )
            trainer = GRPOTrainer(
                model=base,
                reward_funcs=accuracy,
                args=args,
                train_dataset=dataset,
                processing_class=model.tokenizer,
                peft_config=lora,
                callbacks=[_Progress()],
            )
            peft_model = trainer.model
            trainer.remove_callback(PrinterCallback)  # the caller's progress callback is the only output
            trainer.remove_callback(ProgressCallback)
            trainer.train()
            steps = int(trainer.state.global_step)
            loss_type = args.loss_type
            peft_model.eval()
            save_lora_folder(peft_model, out_dir, model.name)
    finally:
        # leave the caller's model as it was: unwrap the LoRA layers, undo TRL's patches
        if peft_model is not None and isinstance(peft_model, PeftModel):
            base = peft_model.unload()
        _restore(base, saved)
        model.model = base
    reward_start, reward_end = head_tail_mean(rewards)
    loss_start, loss_end = head_tail_mean(losses)
    manifest = {
        "origin": "grpo",
        "target": {"model": model.name, "sha256": model.sha256},
        "lora": cfg.manifest(),
        "train": {
            **asdict(cfg),
            "steps": steps,
            "rows": len(rows),
            "prompt": "resa_eval",
            "reward": "accuracy (math-verify on the final answer, 1/0)",
            "loss_type": loss_type,
            "trainer": f"trl {trl.__version__}",
        },
        "seed": cfg.seed,
        "reward_start": reward_start,
        "reward_end": reward_end,
        "loss_start": loss_start,
        "loss_end": loss_end,
        "wall_s": tracker.elapsed_s,
    }
    return SourceResult(
        steps=steps,
        wall_s=tracker.elapsed_s,
        manifest=manifest,
        loss_start=loss_start,
        loss_end=loss_end,
        reward_start=reward_start,
        reward_end=reward_end,
        history={"reward": list(rewards), "loss": list(losses)},
    )


@contextlib.contextmanager
def _quiet():
    """Silence what TRL warns about that does not concern this use of it."""
    with warnings.catch_warnings():
        # transformers 5 renamed gradient_checkpointing (TRL still sets it): it would say so every step
        warnings.filterwarnings("ignore", message=r".*(gradient|activation)_checkpointing", category=FutureWarning)
        # TRL imports an installed vLLM and warns when its version is outside its tested range; it is
        # never used here (rollouts come from transformers' generate)
        warnings.filterwarnings("ignore", message="TRL currently supports vLLM", category=UserWarning)
        yield


def _snapshot(base) -> dict:
    """What TRL's trainer changes on the model it is given: its forward (a fused LM-head patch),
    config fields (pad ids mirrored from the tokenizer, use_cache), model tags, train/eval mode, grad flags."""
    return {
        "model": dict(base.__dict__),
        "configs": [(c, dict(c.__dict__)) for c in _configs(base)],
        "training": base.training,
        "requires_grad": {n: p.requires_grad for n, p in base.named_parameters()},
    }


def _configs(base) -> list:
    out = [base.config]
    text = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if text is not base.config:
        out.append(text)
    if getattr(base, "generation_config", None) is not None:
        out.append(base.generation_config)
    return out


def _restore_attrs(obj, saved: dict, keys=None) -> None:
    """Put back the plain attributes in `keys` (all when None) as they were, dropping ones added since."""
    current = obj.__dict__
    for k in list(current) if keys is None else keys:
        if k not in saved:
            current.pop(k, None)
    for k, v in saved.items():
        if (keys is None or k in keys) and current.get(k, _MISSING) is not v:
            current[k] = v


_MISSING = object()


def _strip_tuner_layers(module) -> None:
    """Put every PEFT-wrapped layer under `module` back to its base layer (what unload() does)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in list(module.named_children()):
        if isinstance(child, BaseTunerLayer):
            setattr(module, name, child.get_base_layer())
        else:
            _strip_tuner_layers(child)


def _restore(base, saved: dict) -> None:
    # LoRA layers left behind when the trainer failed before handing back its PeftModel
    _strip_tuner_layers(base)
    # The model's own attributes (TRL's forward patch, model tags, PEFT's markers); modules and
    # parameters live in the _modules/_parameters dicts, the same objects as before.
    _restore_attrs(base, saved["model"])
    for config, attrs in saved["configs"]:
        _restore_attrs(config, attrs)
    for n, p in base.named_parameters():
        p.requires_grad_(saved["requires_grad"].get(n, False))
    base.train(saved["training"])


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
