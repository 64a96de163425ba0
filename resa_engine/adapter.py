"""Adapters: plain PEFT LoRA folders, checked against a model before they are attached per name.

  <folder>/adapter_config.json + adapter_model.safetensors   (loads unchanged with PeftModel.from_pretrained)
  <folder>/manifest.json                                      (provenance, when it came from tuning or the store)

Modularity (paper §4.3): an adapter built on target A may be attached to model B when every
LoRA module exists in B with the same shapes; that is a cross-model attach, reported as such.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from torch import nn

from .models import LoadedModel, ModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"
PEFT_PREFIX = "base_model.model."  # PEFT's prefix before the base model's own module path
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in per-row adapter_names


class AdapterError(ModelError):
    """An adapter folder that cannot be read or does not fit the model; the message says why."""


@dataclass(frozen=True)
class AdapterCompat:
    ok: bool
    """Every LoRA module of the adapter exists in the model with matching shapes."""
    cross_model: bool
    """The adapter was built on other weights than the model's (content hash differs)."""
    reason: str = ""
    """Why it does not fit (the first mismatching module and shapes), empty when ok."""


@dataclass(frozen=True)
class LoraTensorShape:
    module: str
    """Module path inside the base transformers model, e.g. `model.layers.3.self_attn.q_proj`."""
    kind: str
    """`linear` (lora_A/lora_B) or `embedding` (lora_embedding_A/B)."""
    in_features: int
    out_features: int


def read_adapter_config(adapter_dir: Path | str) -> dict:
    """adapter_config.json of a PEFT folder, validated to be a LoRA adapter."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{adapter_dir} is not a PEFT adapter folder (no {ADAPTER_CONFIG})") from None
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path} is not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{path}: only LoRA adapters are supported (peft_type {config.get('peft_type')!r})")
    return config


def read_adapter_manifest(adapter_dir: Path | str) -> dict | None:
    """The provenance manifest next to the PEFT files, if there is one."""
    path = Path(adapter_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def adapter_shapes(adapter_dir: Path | str) -> list[LoraTensorShape]:
    """The (module, in, out) of every LoRA pair, read from the safetensors header only."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} holds no {ADAPTER_WEIGHTS} (pickled adapters are not loaded)")
    pairs: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():
            shape = tuple(fh.get_slice(key).get_shape())
            for part, kind in ((".lora_A.", "linear"), (".lora_B.", "linear"), (".lora_embedding_A", "embedding"), (".lora_embedding_B", "embedding")):
                if part in key:
                    module = key.split(part)[0].removeprefix(PEFT_PREFIX)
                    pairs.setdefault((module, kind), {})["A" if "_A" in part else "B"] = shape
                    break
            else:
                raise AdapterError(f"{path}: tensor {key!r} is not a LoRA weight (only LoRA adapters are supported)")
    shapes = []
    for (module, kind), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: module {module} has an incomplete LoRA pair")
        # linear: A [r, in], B [out, r]; embedding: A [r, num_embeddings], B [dim, r]
        shapes.append(LoraTensorShape(module, kind, in_features=ab["A"][1], out_features=ab["B"][0]))
    if not shapes:
        raise AdapterError(f"{path} holds no LoRA weights")
    return shapes


def _module_shape(module: nn.Module) -> tuple[str, int, int] | None:
    module = getattr(module, "base_layer", module)  # already wrapped by PEFT: compare the frozen layer
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return "embedding", module.num_embeddings, module.embedding_dim
    return None


def check_adapter_compat(adapter_dir: Path | str, model: LoadedModel, *, target_sha256: str | None = None) -> AdapterCompat:
    """Whether the adapter's LoRA modules exist in `model` with the same shapes, and whether it is cross-model.

    The built-on hash comes from `target_sha256`, else the folder's manifest (`target.sha256`); without
    either, an adapter whose config names another base model counts as cross-model.
    """
    read_adapter_config(adapter_dir)
    base = model.base
    for shape in adapter_shapes(adapter_dir):
        try:
            module = base.get_submodule(shape.module)
        except AttributeError:
            return AdapterCompat(False, False, f"adapter module {shape.module} does not exist in {model.name}")
        found = _module_shape(module)
        want = (shape.kind, shape.in_features, shape.out_features)
        if found != want:
            have = f"{found[0]} {found[1]}->{found[2]}" if found else type(module).__name__
            return AdapterCompat(
                False, False, f"adapter module {shape.module} is {want[0]} {want[1]}->{want[2]} but {model.name} has {have}"
            )
    return AdapterCompat(True, _is_cross_model(adapter_dir, model, target_sha256))


def _is_cross_model(adapter_dir: Path | str, model: LoadedModel, target_sha256: str | None) -> bool:
    if target_sha256 is None:
        manifest = read_adapter_manifest(adapter_dir) or {}
        target_sha256 = (manifest.get("target") or {}).get("sha256")
    if target_sha256:
        return target_sha256 != model.sha256
    return read_adapter_config(adapter_dir).get("base_model_name_or_path") not in (None, model.name)


def attach_adapter(model: LoadedModel, adapter_dir: Path | str, name: str = "skill", *, target_sha256: str | None = None):
    """Load the adapter into `model` under `name` (replacing one of that name) and return the PeftModel.

    The model stays usable without it: generation picks adapters per call (`adapter_names`),
    so attaching one never changes what the base model answers.
    """
    from peft import PeftModel

    compat = check_adapter_compat(adapter_dir, model, target_sha256=target_sha256)
    if not compat.ok:
        raise AdapterError(f"adapter {adapter_dir} cannot be attached to {model.name}: {compat.reason}")
    if name == BASE_ADAPTER:
        raise AdapterError(f"adapter name {BASE_ADAPTER!r} is reserved")
    if isinstance(model.model, PeftModel):
        if name in model.model.peft_config:
            detach_adapter(model, name)
    if isinstance(model.model, PeftModel):
        model.model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
    else:
        model.model = PeftModel.from_pretrained(model.model, str(adapter_dir), adapter_name=name, is_trainable=False)
    model.model.eval()
    model.extra.setdefault("adapters", {})[name] = {"dir": str(adapter_dir), "cross_model": compat.cross_model}
    return model.model


def detach_adapter(model: LoadedModel, name: str) -> None:
    """Remove one attached adapter; with none left the plain base model is restored."""
    from peft import PeftModel

    peft_model = model.model
    if not isinstance(peft_model, PeftModel) or name not in peft_model.peft_config:
        raise AdapterError(f"no adapter {name!r} is attached to {model.name}")
    model.extra.get("adapters", {}).pop(name, None)
    if len(peft_model.peft_config) == 1:
        model.model = peft_model.unload()  # drops the LoRA layers, keeps the base weights untouched
        model.model.eval()
        return
    if name in peft_model.active_adapters:
        peft_model.set_adapter(next(n for n in peft_model.peft_config if n != name))
    peft_model.delete_adapter(name)


def attached_adapters(model: LoadedModel) -> list[str]:
    from peft import PeftModel

    return list(model.model.peft_config) if isinstance(model.model, PeftModel) else []
