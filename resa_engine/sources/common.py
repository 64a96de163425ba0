"""What every source maker shares: the result it hands back, the saved PEFT folder, the manifest's LoRA part.

Nothing here imports torch, so the configs that import it stay cheap to check a request with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..tune.config import DEFAULT_TARGET_MODULES

LORA_TARGETS = list(DEFAULT_TARGET_MODULES)
"""The seven projections of the paper's LoRAs: q, k, v, o, gate, up, down."""


@dataclass
class SourceLora:
    """The LoRA a source is trained as; the defaults are the paper's (r 32, alpha 128, dropout 0.05, seven projections)."""

    lora_r: int = 32
    """LoRA rank."""
    lora_alpha: float = 128
    """LoRA scale numerator, scale = alpha / r."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input while training."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Projections that get a LoRA (q, k, v, o, gate, up, down)."""
    seed: int = 0
    """Seeds the LoRA init, the data order and any sampling."""

    def peft_config(self):
        """This LoRA as PEFT's LoraConfig (imports peft, and so torch, only when called)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, target_modules=list(self.target_modules), task_type="CAUSAL_LM"
        )

    def manifest(self) -> dict:
        """The manifest's `lora` entry, the same for every source."""
        return {"r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout, "target_modules": list(self.target_modules)}


@dataclass
class SourceResult:
    """What a source maker (SFT or GRPO) hands back: the PEFT folder is in the caller's out_dir."""

    steps: int
    """Optimizer steps taken."""
    wall_s: float
    """Seconds of training (model wrapping to saved folder)."""
    manifest: dict
    """Provenance and metrics: the store manifest body."""
    loss_start: float | None = None
    """Mean training loss over the first tenth of the steps."""
    loss_end: float | None = None
    """Mean training loss over the last tenth of the steps."""
    reward_start: float | None = None
    """GRPO: mean reward of the completions sampled in the first tenth of the steps."""
    reward_end: float | None = None
    """GRPO: mean reward of the completions sampled in the last tenth of the steps."""
    history: dict[str, list[float]] = field(default_factory=dict)
    """Per-step curves (`loss`, `reward`)."""


def head_tail_mean(values: list[float]) -> tuple[float | None, float | None]:
    """Means over the first and last tenth (at least one value each) of a per-step curve."""
    if not values:
        return None, None
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n


def save_lora_folder(peft_model, out_dir: Path, model_name: str) -> Path:
    """Save a plain PEFT folder (adapter_config.json + adapter_model.safetensors, no model card)
    whose base is the registered model name, not a local path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's generated model card; the manifest is the record
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = model_name
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out_dir

