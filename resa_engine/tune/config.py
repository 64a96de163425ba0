"""Stage II configuration: the LoRA put on the target and the tuning recipe (defaults: the authors')."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..data import chunk_len_for
from ..errors import ModelError

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OBJECTIVES = ("kl", "ce", "sft")
SCHEDULES = ("constant", "cosine")


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
    """`kl` (authors' code: match the base model's next-token distribution), `ce` (paper text: CE on the trigger
    text with the SAE spliced in) or `sft` (the SFT baseline control: CE on the trigger text, no SAE)."""
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
    chunk_len: int | None = None
    """Tokens per chunk (examples joined with EOS, cut to this length); None: the authors' 2048,
    capped at the model's context (`check_model` fills it in)."""
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
    random_sae: bool = False
    """The random-SAE control: tune against an untrained SAE of the skill SAE's shape (seeded by `seed`),
    which tells whether the skill's features matter at all."""
    heldout_fraction: float = 0.1
    """Share of rows held out of tuning (data.split_rows, seeded by `seed`) for the transfer diagnostics
    (resa_engine.transfer, the manifest's `transfer`); 0: tune on every row and record none."""
    heldout_max_tokens: int = 4096
    """Cap on held-out tokens the diagnostics score; each runs through the model about 9 times in all
    (SAE metrics 3, KL before and after 2 x ~2, residual deltas 2 up to the last block)."""
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
        for name in ("lr", "grad_clip", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, float)) or not 0 < self.epochs < math.inf:
            raise ValueError(f"epochs must be a positive number, got {self.epochs!r}")
        for name in ("batch_size", "chunk_len", "checkpoint_every", "heldout_max_tokens"):
            value = getattr(self, name)
            if name == "chunk_len" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.chunk_len is not None and self.chunk_len < 2:
            raise ValueError(f"chunk_len must be at least 2, got {self.chunk_len}")
        if self.heldout_max_tokens < 2:
            raise ValueError(f"heldout_max_tokens must be at least 2, got {self.heldout_max_tokens}")
        value = self.heldout_fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"heldout_fraction must be a number in [0, 1), got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")
        self.lora.validate()

    def check_model(self, model_name: str, context: int | None) -> "TuneConfig":
        """An unset chunk_len becomes the authors' 2048 capped at the model's context; a longer one is refused."""
        self.chunk_len = chunk_len_for(context, self.chunk_len)
        if context and self.chunk_len > context:
            raise ModelError(f"chunk_len {self.chunk_len} exceeds {model_name}'s context of {context} tokens")
        return self

    def to_dict(self) -> dict:
        return asdict(self)
