"""A PEFT LoRA folder, read and validated once for every use: serving (the slot bank), merging a
source adapter, cross-model attach checks, and checking what tuning wrote.

  <folder>/adapter_config.json + adapter_model.safetensors   (loads unchanged with PeftModel.from_pretrained)
  <folder>/manifest.json                                      (provenance, when it came from tuning or the store)

Shapes come from the safetensors header, so checking an adapter against a model reads no
weights. Modularity (paper §4.3): an adapter built on model A fits model B when every LoRA
module exists in B with the same shapes; it is then a cross-model attach, reported as such.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterError, AdapterMismatch

if TYPE_CHECKING:
    from torch import Tensor

    from ..models import LoadedModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
PEFT_PREFIX = "base_model.model."  # PEFT's prefix before the base model's own module path
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B|embedding_A|embedding_B|magnitude_vector)(?:\.[^.]+)?(?:\.weight|\.bias)?$")
# PEFT options that change the computation beyond y += B A x * scale: merged fine, never served by the bank.
UNSERVABLE = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on parameters",
    "lora_bias": "LoRA bias",
}


@dataclass(frozen=True)
class ModelShapes:
    """What an adapter check needs to know of a model: its module and parameter shapes (no weights)."""

    name: str
    sha256: str
    linears: dict[str, tuple[int, int]]
    """Module path -> (in_features, out_features) of every nn.Linear."""
    embeddings: dict[str, tuple[int, int]]
    """Module path -> (num_embeddings, embedding_dim) of every nn.Embedding."""
    params: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, model: "LoadedModel | ModelShapes") -> "ModelShapes":
        """The shapes of a loaded model (computed once, kept in its `extra`)."""
        if isinstance(model, ModelShapes):
            return model
        cached = model.extra.get("shapes")
        if cached is None:
            cached = model.extra["shapes"] = cls.from_module(model.name, model.sha256, model.base)
        return cached

    @classmethod
    def from_folder(cls, name: str, sha256: str, folder: Path) -> "ModelShapes":
        """The shapes of a model folder without its weights (a meta-device copy): for engines that load
        the weights themselves (vLLM)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            module = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        return cls.from_module(name, sha256, module)

    @classmethod
    def from_module(cls, name: str, sha256: str, module) -> "ModelShapes":
        from torch import nn

        linears, embeddings = {}, {}
        for path, m in module.named_modules():
            m = getattr(m, "base_layer", m)  # wrapped by PEFT: the frozen layer's shape
            if isinstance(m, nn.Linear):
                linears[path] = (m.in_features, m.out_features)
            elif isinstance(m, nn.Embedding):
                embeddings[path] = (m.num_embeddings, m.embedding_dim)
        params = {path: tuple(p.shape) for path, p in module.named_parameters()}
        return cls(name, sha256, linears, embeddings, params)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA pair of the adapter, as its safetensors header describes it."""

    name: str
    """Module path inside the base model, e.g. `model.layers.3.self_attn.q_proj`."""
    kind: str
    """`linear` (lora_A/lora_B) or `embedding` (lora_embedding_A/B)."""
    rank: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class PeftAdapter:
    """A validated PEFT LoRA folder: its config, its LoRA modules and any other tensors it holds."""

    folder: Path
    config: dict
    modules: list[LoraModule]
    extra_tensors: dict[str, tuple[int, ...]]
    """Tensors beside the LoRA pairs (DoRA magnitudes, LoRA biases, modules_to_save copies), by key."""

    @classmethod
    def read(cls, folder: Path | str) -> "PeftAdapter":
        """Read config and safetensors header; AdapterError for anything that is not a LoRA folder."""
        from safetensors import safe_open

        folder = Path(folder)
        if not folder.is_dir():
            raise AdapterError(f"adapter {folder} is not a folder")
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
        except FileNotFoundError:
            raise AdapterError(f"{folder} is not a PEFT adapter folder (no {CONFIG_FILE})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterError(f"{folder / CONFIG_FILE} is not valid JSON ({exc})") from None
        if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
            got = config.get("peft_type") if isinstance(config, dict) else config
            raise AdapterError(f"adapter {folder.name}: only LoRA adapters are supported (peft_type {got!r})")
        if not (folder / WEIGHTS_FILE).is_file():
            raise AdapterError(f"adapter {folder.name}: no {WEIGHTS_FILE} (pickled adapters are never loaded)")
        pairs: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}
        extra: dict[str, tuple[int, ...]] = {}
        try:
            with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as fh:
                for key in fh.keys():
                    shape = tuple(fh.get_slice(key).get_shape())
                    match = _LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
                    if match and match["part"] in ("A", "B") and key.endswith(".weight"):
                        pairs.setdefault((match["module"], "linear"), {})[match["part"]] = shape
                    elif match and match["part"].startswith("embedding_"):
                        pairs.setdefault((match["module"], "embedding"), {})[match["part"][-1]] = shape
                    else:
                        extra[key.removeprefix(PEFT_PREFIX)] = shape
        except (OSError, ValueError, RuntimeError) as exc:  # safetensors raises these for a damaged file
            raise AdapterError(f"adapter {folder.name}: {WEIGHTS_FILE} is unreadable ({exc})") from None
        modules = []
        for (name, kind), ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"adapter {folder.name}: module {name} has lora_{''.join(ab)} but not both A and B")
            a, b = ab["A"], ab["B"]
            if len(a) != 2 or len(b) != 2:
                raise AdapterError(f"adapter {folder.name}: module {name} has lora tensors of rank {len(a)}/{len(b)}, not matrices")
            # linear: A [r, in], B [out, r]; embedding: A [r, num_embeddings], B [dim, r]
            modules.append(LoraModule(name, kind, rank=a[0], in_features=a[1], out_features=b[0]))
        if not modules:
            raise AdapterError(f"adapter {folder.name}: {WEIGHTS_FILE} holds no LoRA weights")
        return cls(folder, config, modules, extra)

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules)

    @property
    def manifest(self) -> dict | None:
        """The provenance manifest next to the PEFT files, if there is one."""
        try:
            data = json.loads((self.folder / MANIFEST_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def problems(self, model: "LoadedModel | ModelShapes", *, serving: bool) -> list[str]:
        """Why the adapter cannot be served on (`serving`) or merged into the model; empty when it fits."""
        shapes = ModelShapes.of(model)
        found = []
        if serving:
            found += [f"{what} ({option}) is not supported by the serving engine" for option, what in UNSERVABLE.items() if self.config.get(option)]
            if self.config.get("bias", "none") != "none":
                found.append(f"bias={self.config['bias']!r} is not supported by the serving engine (only 'none')")
            found += [f"unexpected tensor {key!r} (only lora_A/lora_B of Linear layers are served)" for key in self.extra_tensors]
        for m in self.modules:
            table = shapes.linears if m.kind == "linear" else shapes.embeddings
            have = table.get(m.name)
            if serving and m.kind != "linear":
                found.append(f"adapter module {m.name} is an embedding LoRA (only Linear layers are served)")
            elif have is None:
                other = (shapes.embeddings if m.kind == "linear" else shapes.linears).get(m.name)
                what = f"is not a {m.kind} in {shapes.name}" if other else f"does not exist in {shapes.name}"
                found.append(f"adapter module {m.name} {what}")
            elif have != (m.in_features, m.out_features):
                found.append(
                    f"adapter module {m.name} is {m.kind} {m.in_features}->{m.out_features} "
                    f"but {shapes.name} has {m.kind} {have[0]}->{have[1]} (shapes differ)"
                )
        if not serving:
            for key, shape in self.extra_tensors.items():
                module, sep, _ = key.partition(".lora_")
                if sep:  # a DoRA magnitude or a LoRA bias: one value per output feature of the module
                    have = shapes.linears.get(module)
                    if have is None:
                        found.append(f"{key}: no Linear module {module} in {shapes.name}")
                    elif shape != (have[1],):
                        found.append(f"{key}: shape {list(shape)} vs [{have[1]}] (shapes differ)")
                    continue
                # modules_to_save / saved embedding layers: a full copy of one of the model's parameters
                name = key.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
                want = shapes.params.get(name)
                if want is None:
                    found.append(f"{key}: no parameter {name} in {shapes.name}")
                elif shape != tuple(want):
                    found.append(f"{key}: shape {list(shape)} vs {shapes.name}'s {list(want)} (shapes differ)")
        return found

    def check(self, model: "LoadedModel | ModelShapes", *, serving: bool = True) -> bool:
        """Raise AdapterMismatch naming the first problems; returns whether it is a cross-model attach."""
        found = self.problems(model, serving=serving)
        if found:
            shapes = ModelShapes.of(model)
            shown = "; ".join(found[:3]) + (f" (and {len(found) - 3} more)" if len(found) > 3 else "")
            raise AdapterMismatch(f"adapter {self.folder.name} does not fit model {shapes.name}: {shown}")
        return self.is_cross_model(model)

    def is_cross_model(self, model: "LoadedModel | ModelShapes", target_sha256: str | None = None) -> bool:
        """Built on other weights than the model's: by the manifest's target hash, else the config's base name."""
        shapes = ModelShapes.of(model)
        if target_sha256 is None:
            target = (self.manifest or {}).get("target")
            target_sha256 = target.get("sha256") if isinstance(target, dict) else None
        if target_sha256:
            return target_sha256 != shapes.sha256
        return self.config.get("base_model_name_or_path") not in (None, shapes.name)

    def load_weights(self, model: "LoadedModel") -> "LoraWeights":
        """The LoRA factors on the model's device and dtype, B pre-scaled, for the slot bank (serving only)."""
        import torch
        from safetensors.torch import load_file

        self.check(model, serving=True)
        tensors = load_file(str(self.folder / WEIGHTS_FILE), device="cpu")
        by_module: dict[str, dict[str, Any]] = {}
        for key, value in tensors.items():
            match = _LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
            by_module.setdefault(match["module"], {})[match["part"]] = value
        alpha, use_rslora = float(self.config.get("lora_alpha", 8)), bool(self.config.get("use_rslora", False))
        alpha_pattern = self.config.get("alpha_pattern") or {}
        modules = {}
        for name, ab in sorted(by_module.items()):
            r = ab["A"].shape[0]
            # PEFT's per-module alpha (alpha_pattern keys match a module-name suffix); rank comes from the tensors.
            module_alpha = next((float(v) for k, v in alpha_pattern.items() if re.match(rf"(.*\.)?({k})$", name)), alpha)
            scale = module_alpha / (math.sqrt(r) if use_rslora else r)
            a = ab["A"].to(device=model.device, dtype=model.dtype).contiguous()
            b_t = (ab["B"].to(torch.float32) * scale).t().to(device=model.device, dtype=model.dtype).contiguous()
            modules[name] = (a, b_t)
        return LoraWeights(modules=modules, rank=self.rank, config=self.config)


@dataclass
class LoraWeights:
    """One adapter's factors, ready to install in a bank slot."""

    modules: dict[str, tuple["Tensor", "Tensor"]]
    """Base-model module name -> (A [r, in], B^T * scale [r, out]) on the model's device and dtype."""
    rank: int
    """Largest rank over the modules."""
    config: dict
    """The adapter_config.json as written by PEFT."""

    @property
    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.modules.values())


@dataclass(frozen=True)
class AdapterCompat:
    ok: bool
    """Every LoRA module of the adapter exists in the model with matching shapes."""
    cross_model: bool
    """The adapter was built on other weights than the model's (content hash differs)."""
    reason: str = ""
    """Why it does not fit (the first mismatching modules), empty when ok."""


def check_compat(folder: Path | str, model: "LoadedModel | ModelShapes", *, target_sha256: str | None = None) -> AdapterCompat:
    """Whether a folder can be served on the model, without raising for a mismatch (choosing among candidates)."""
    adapter = PeftAdapter.read(folder)
    found = adapter.problems(model, serving=True)
    if found:
        return AdapterCompat(False, False, "; ".join(found[:3]))
    return AdapterCompat(True, adapter.is_cross_model(model, target_sha256))


def adapter_sha256(folder: Path | str) -> str:
    """One content hash for an adapter: its config and its weights, by file name."""
    folder = Path(folder)
    combined = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        combined.update(f"{name}:{digest}\n".encode())
    return combined.hexdigest()
