"""The source model of a skill: a base model, optionally with a PEFT LoRA adapter merged in.

The paper's sources are RL-tuned LoRA checkpoints (paper §4.1): the skill is extracted from
the base model with that adapter applied. The adapter is checked against the model first
(every tensor must name a module of this model and fit its shape), then merged into the
weights, so extraction runs the plain transformers forward with no adapter overhead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from torch import nn

from .models import LoadedModel, ModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class AdapterMismatch(ModelError):
    """The adapter was made for another model (missing modules or other tensor shapes)."""


def adapter_sha256(adapter_dir: Path | str) -> str:
    """One content hash for an adapter: its config and its weights, by file name."""
    adapter_dir = Path(adapter_dir)
    combined = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        digest = hashlib.sha256((adapter_dir / name).read_bytes()).hexdigest()
        combined.update(f"{name}:{digest}\n".encode())
    return combined.hexdigest()


def read_adapter_config(adapter_dir: Path | str) -> dict:
    """The adapter's PEFT config, refusing anything that is not a LoRA saved as safetensors."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ModelError(f"source adapter {adapter_dir} is not a folder")
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ModelError(f"source adapter {adapter_dir} has no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ModelError(f"source adapter {adapter_dir} has no {ADAPTER_WEIGHTS} (pickle checkpoints are not loaded)")
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"source adapter {adapter_dir}: {ADAPTER_CONFIG} is not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ModelError(f"source adapter {adapter_dir}: peft_type must be LORA, got {config.get('peft_type')!r}")
    return config


def check_adapter(model: LoadedModel, adapter_dir: Path | str) -> dict:
    """Every tensor of the adapter must name a module of `model` and fit its shape; returns the config."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    modules = dict(model.base.named_modules())
    params = {name: p.shape for name, p in model.base.named_parameters()}
    problems: list[str] = []
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt", device="cpu") as fh:
        keys = list(fh.keys())
        for key in keys:
            shape = tuple(fh.get_slice(key).get_shape())
            problem = _check_tensor(key.removeprefix(_PEFT_PREFIX), shape, modules, params)
            if problem:
                problems.append(problem)
    if not keys:
        problems.append("it holds no tensors")
    if problems:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        base = config.get("base_model_name_or_path") or "an unnamed base model"
        raise AdapterMismatch(f"source adapter {adapter_dir} (made for {base}) does not fit {model.name}: {shown}")
    return config


def _check_tensor(key: str, shape: tuple[int, ...], modules: dict[str, nn.Module], params: dict) -> str | None:
    if ".lora_" not in key:
        # modules_to_save / saved embedding layers: a full copy of one of the model's parameters
        name = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        if name not in params:
            return f"{key}: no parameter {name}"
        return None if tuple(params[name]) == shape else f"{key}: shape {list(shape)} vs model {list(params[name])}"
    module_name, _, part = key.partition(".lora_")
    module = modules.get(module_name)
    if module is None:
        return f"no module {module_name}"
    if isinstance(module, nn.Linear):
        expect = {
            "A.weight": (None, module.in_features),
            "B.weight": (module.out_features, None),
            "B.bias": (module.out_features,),
            "magnitude_vector": (module.out_features,),
        }
    elif isinstance(module, nn.Embedding):
        expect = {"embedding_A": (None, module.num_embeddings), "embedding_B": (module.embedding_dim, None)}
    else:
        return f"{module_name}: LoRA on {type(module).__name__} is not supported"
    want = expect.get(part)
    if want is None:
        return f"{key}: unsupported LoRA tensor lora_{part}"
    if len(want) != len(shape) or any(w is not None and w != s for w, s in zip(want, shape)):
        dims = ["r" if w is None else w for w in want]
        return f"{key}: shape {list(shape)} vs expected {dims}"
    return None


def apply_source_adapter(model: LoadedModel, adapter_dir: Path | str, *, name: str | None = None) -> LoadedModel:
    """Merge a LoRA adapter into `model`'s weights (PEFT merge_and_unload).

    The weights of `model` are changed in place: do not use the passed object as the plain
    base model afterwards. The returned LoadedModel keeps the base's name and sha256 and
    records the adapter in `extra` (`adapter`, `adapter_sha256`).
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    config = check_adapter(model, adapter_dir)
    sha = adapter_sha256(adapter_dir)
    try:
        peft_model = PeftModel.from_pretrained(model.base, str(adapter_dir), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise AdapterMismatch(f"source adapter {adapter_dir} cannot be applied to {model.name}: {exc}") from None
    merged = peft_model.merge_and_unload()
    merged.eval()
    merged.requires_grad_(False)
    extra = {
        **model.extra,
        "adapter": name or str(adapter_dir),
        "adapter_sha256": sha,
        "adapter_base_model": config.get("base_model_name_or_path"),
    }
    return dataclasses.replace(model, model=merged, extra=extra)
