"""The source model of a skill: a base model with a PEFT LoRA adapter merged into its weights.

The paper's sources are RL-tuned LoRA checkpoints (paper §4.1): the skill is extracted from the
base model with that adapter applied. The adapter is checked against the model first (every
tensor must name a module of this model and fit its shape), then merged with PEFT, so
extraction runs the plain transformers forward with no adapter overhead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import AdapterMismatch
from ..models import LoadedModel
from .peft_io import PeftAdapter, adapter_sha256


def apply_source_adapter(model: LoadedModel, adapter_dir: Path | str, *, name: str | None = None) -> LoadedModel:
    """Merge a LoRA adapter into `model`'s weights (PEFT merge_and_unload).

    The weights of `model` are changed in place: do not use the passed object as the plain
    base model afterwards. The returned LoadedModel keeps the base's name and sha256 and
    records the adapter in `extra` (`adapter`, `adapter_sha256`).
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    adapter = PeftAdapter.read(adapter_dir)
    problems = adapter.problems(model, serving=False)
    if problems:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        base = adapter.config.get("base_model_name_or_path") or "an unnamed base model"
        raise AdapterMismatch(f"source adapter {adapter_dir} (made for {base}) does not fit {model.name}: {shown}")
    sha = adapter_sha256(adapter_dir)
    try:
        peft_model = PeftModel.from_pretrained(model.base, str(adapter_dir), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise AdapterMismatch(f"source adapter {adapter_dir} cannot be applied to {model.name}: {exc}") from None
    merged = peft_model.merge_and_unload()
    merged.eval()
    merged.requires_grad_(False)
    extra = {
        **{k: v for k, v in model.extra.items() if k != "shapes"},
        "adapter": name or str(adapter_dir),
        "adapter_sha256": sha,
        "adapter_base_model": adapter.config.get("base_model_name_or_path"),
    }
    return dataclasses.replace(model, model=merged, extra=extra)
