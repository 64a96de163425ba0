"""Stage I configuration: hookpoints, SAE size and the training recipe, with the checks that
need no model (the ones that do, context length and layer range, are in `ExtractConfig.check_model`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import chunk_len_for
from ..errors import ModelError

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
    chunk_len: int | None = None
    """Tokens per training sequence; trigger texts are EOS-joined and cut to this length.
    None: the authors' 2048, capped at the model's context (`check_model` fills it in)."""
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
        for name in ("lr", "auxk_alpha", "heldout_fraction"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.chunk_len is not None:
            _positive(self, "chunk_len")
        _positive(self, "k", "batch_size", "epochs", "micro_batch_tokens", "dead_feature_threshold", "heldout_max_tokens")
        if self.num_latents < 0 or self.expansion_factor <= 0:
            raise ValueError("num_latents must be >= 0 and expansion_factor > 0")
        if self.chunk_len is not None and self.chunk_len < 2:
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

    def check_model(self, model_name: str, num_layers: int, context: int | None) -> "ExtractConfig":
        """The checks that need the model's shape (no weights): layers in range, chunk_len within the
        context; an unset chunk_len becomes the authors' 2048 capped at the context. Returns self."""
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ModelError(f"layer(s) {bad} out of range for {model_name} ({num_layers} layers: 0..{num_layers - 1})")
        self.chunk_len = chunk_len_for(context, self.chunk_len)
        if context and self.chunk_len > context:
            raise ModelError(f"chunk_len {self.chunk_len} exceeds {model_name}'s context of {context} tokens")
        return self

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
