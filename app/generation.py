"""Generation in the API process, behind one small class the /generate route calls.

`GenerationService.generate(req)` resolves the model (registered names only, loaded on
first use), the skill's adapter for that model from the store (or a compatible adapter
built on another model: a cross-model attach, paper §4.3), and runs the engine in a
worker thread so the event loop stays free. The continuous-batching scheduler replaces
the engine call inside this class; the route does not change.

`ModelCatalog` answers "which models exist and what shape are they" from their configs,
without loading weights (validation of job requests, GET /models).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from app.api.errors import Conflict, Invalid, NotFound, TooLarge, Unavailable
from app.settings import Settings

log = logging.getLogger("resa.generation")


class ModelCatalog:
    """Registered model names and their shapes (read from configs, cached; no weights loaded)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._registry = None
        self._info: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def registry(self):
        if self._registry is None:
            from resa_engine.models import ModelRegistry

            self._registry = ModelRegistry.load(self.settings.models_file)
        return self._registry

    def names(self) -> list[str]:
        return self.registry.names()

    def spec(self, name: str):
        """The registry entry of a registered name; paths are never resolved here."""
        if name not in self.registry.specs:
            raise NotFound(f"unknown model {name!r}; registered: {', '.join(self.names()) or 'none'}", type="unknown_model")
        return self.registry.specs[name]

    def describe(self, name: str):
        """resa_engine.models.ModelInfo of a registered model (architecture, layers, hidden size).

        Cached in memory and on disk (cache_dir/model-info.json, keyed by the weights' file
        stats): reading a GGUF's config takes seconds, and every validation needs it.
        """
        from resa_engine.models import ModelError, ModelInfo, describe

        spec = self.spec(name)
        with self._lock:
            if name in self._info:
                return self._info[name]
        try:
            key = self._disk_key(spec)
            cached = self._read_disk().get(key)
            info = ModelInfo(**cached) if cached else describe(spec)
        except (ModelError, OSError) as exc:
            raise Unavailable(f"model {name!r} is registered but unavailable: {exc}", type="model_unavailable") from None
        if not cached:
            self._write_disk(key, info.to_dict())
        with self._lock:
            self._info[name] = info
        return info

    @staticmethod
    def _disk_key(spec) -> str:
        folder, gguf_file = spec.resolve()
        marker = folder / (gguf_file or "config.json")
        stat = marker.stat()
        return f"{spec.name}|{spec.kind}|{marker.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"

    def _disk_path(self):
        return Path(self.settings.cache_dir) / "model-info.json"

    def _read_disk(self) -> dict:
        try:
            return json.loads(self._disk_path().read_text())
        except (OSError, ValueError):
            return {}

    def _write_disk(self, key: str, value: dict) -> None:
        path = self._disk_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = {**self._read_disk(), key: value}
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
        except OSError as exc:  # a read-only cache only costs speed
            log.debug("cannot cache model info: %s", exc)

    def check_layers(self, name: str, layers: list[int]) -> None:
        info = self.describe(name)
        bad = [i for i in layers if not 0 <= i < info.num_layers]
        if bad:
            raise Invalid(
                f"layer(s) {bad} out of range for {name} ({info.num_layers} layers: 0..{info.num_layers - 1})",
                type="invalid_layer",
            )


@dataclass
class GenerationResult:
    text: str
    finish_reason: str
    usage: dict
    model: str
    skill: str | None = None
    cross_model: bool = False
    adapter_target: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Attached:
    """An adapter loaded into a served model under a PEFT adapter name."""

    name: str
    target: str
    created_at: str
    cross_model: bool


@dataclass
class _Served:
    """A loaded model, its lock (the single-request engine runs one request at a time) and its adapters."""

    loaded: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: "OrderedDict[str, _Attached]" = field(default_factory=OrderedDict)  # skill -> attached, LRU order


@dataclass
class _Prepared:
    served: _Served
    model: str
    skill: str | None
    attached: _Attached | None
    input_ids: list[int]
    params: Any


class GenerationService:
    """Completions on registered models with a skill attached per request."""

    def __init__(self, settings: Settings, store, catalog: ModelCatalog | None = None):
        self.settings, self.store = settings, store
        self.catalog = catalog or ModelCatalog(settings)
        self._models: dict[str, _Served] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._load_errors: dict[str, str] = {}
        self._guard = threading.Lock()

    # ------------------------------------------------------------ models

    @property
    def model_names(self) -> list[str]:
        return self.catalog.names()

    @property
    def loaded_models(self) -> list[str]:
        return sorted(self._models)

    def is_loaded(self, name: str) -> bool:
        return name in self._models

    def load_error(self, name: str) -> str | None:
        return self._load_errors.get(name)

    def start_loading(self, name: str) -> threading.Thread:
        """Load a model in the background (the default model at startup)."""

        def load() -> None:
            try:
                self.catalog.describe(name)
                self._served(name)
                log.info("model %s loaded", name)
            except Exception as exc:  # noqa: BLE001 - reported by /readyz, retried on first use
                log.error("loading model %s failed: %s", name, getattr(exc, "message", exc))

        thread = threading.Thread(target=load, name=f"load-{name}", daemon=True)
        thread.start()
        return thread

    def _served(self, name: str) -> _Served:
        served = self._models.get(name)
        if served is not None:
            return served
        spec = self.catalog.spec(name)
        with self._guard:
            lock = self._loading.setdefault(name, threading.Lock())
        with lock:
            if name in self._models:
                return self._models[name]
            from resa_engine.models import load_model

            try:
                loaded = load_model(spec, device=self.settings.device, cache_dir=self.settings.cache_dir)
            except Exception as exc:  # noqa: BLE001 - ModelError, missing files, out of memory: all say "unavailable"
                self._load_errors[name] = str(exc)
                raise Unavailable(f"model {name!r} cannot be loaded: {exc}", type="model_unavailable") from None
            self._load_errors.pop(name, None)
            self._models[name] = _Served(loaded)
            return self._models[name]

    # ------------------------------------------------------------ adapters

    def _resolve_adapter(self, model: str, skill: str, served: _Served) -> _Attached:
        """The adapter for (model, skill), attached and marked most recently used."""
        from adapters_store import ArtifactNotFound
        from resa_engine.adapter import check_adapter_compat

        cached = served.adapters.get(skill)
        if cached is not None and self._still_current(cached, skill):
            if cached.target == model or not self.store.exists("adapter", (model, skill)):
                served.adapters.move_to_end(skill)
                return cached
        if cached is not None:
            self._detach(served, skill)

        try:
            manifest = self.store.manifest("adapter", (model, skill))
            return self._attach(served, model, skill, model, manifest)
        except ArtifactNotFound:
            pass
        candidates = [m for m in self.store.list("adapter") if m["key"][1] == skill]
        if not candidates:
            if self.store.exists("skill", (skill,)):
                raise Conflict(
                    f"skill {skill!r} has no adapter yet; build one with POST /skills/{skill}/adapters", type="no_adapter"
                )
            raise NotFound(f"unknown skill {skill!r}", type="unknown_skill")
        reasons = []
        for manifest in sorted(candidates, key=lambda m: m["key"][0]):
            target = manifest["key"][0]
            folder = self.store.fetch("adapter", (target, skill))
            compat = check_adapter_compat(folder, served.loaded)
            if compat.ok:
                return self._attach(served, model, skill, target, manifest, folder=folder)
            reasons.append(f"{target}: {compat.reason}")
        raise Conflict(
            f"skill {skill!r} has no adapter compatible with {model}: " + "; ".join(reasons),
            type="incompatible_adapter",
            reasons=reasons,
        )

    def _still_current(self, attached: _Attached, skill: str) -> bool:
        from adapters_store import StoreError

        try:
            return self.store.manifest("adapter", (attached.target, skill)).get("created_at") == attached.created_at
        except StoreError:
            return False

    def _attach(self, served: _Served, model: str, skill: str, target: str, manifest: dict, folder=None) -> _Attached:
        from resa_engine.adapter import attach_adapter

        folder = folder or self.store.fetch("adapter", (target, skill))
        created = str(manifest.get("created_at", ""))
        # PEFT adapter names become module keys: no dots; unique per (target, skill, version).
        name = "a" + hashlib.sha256(f"{target}/{skill}/{created}".encode()).hexdigest()[:16]
        while len(served.adapters) >= max(1, int(self.settings.adapter_cache_size)):
            oldest = next(iter(served.adapters))
            self._detach(served, oldest)
        attach_adapter(served.loaded, folder, name=name)
        # Cross-model means built on another registered model (the store key says which).
        attached = _Attached(name=name, target=target, created_at=created, cross_model=target != model)
        served.adapters[skill] = attached
        return attached

    def _detach(self, served: _Served, skill: str) -> None:
        from resa_engine.adapter import AdapterError, detach_adapter

        attached = served.adapters.pop(skill, None)
        if attached is None:
            return
        try:
            detach_adapter(served.loaded, attached.name)
        except AdapterError:
            pass

    def forget_skill(self, skill: str) -> None:
        """Drop a deleted skill's adapters from every served model."""
        for served in list(self._models.values()):
            with served.lock:
                self._detach(served, skill)

    # ------------------------------------------------------------ generation

    def _check_request(self, req) -> str:
        model = req.model or self.settings.default_model
        if not model:
            raise Invalid("no `model` given and the server has no default model", type="invalid_request")
        self.catalog.spec(model)
        if req.max_tokens > self.settings.max_new_tokens:
            raise Invalid(
                f"max_tokens {req.max_tokens} is over this server's limit of {self.settings.max_new_tokens}",
                type="max_tokens_too_large",
            )
        return model

    def _prepare(self, req, model: str) -> _Prepared:
        """Load, tokenize, check the prompt length and attach the skill (under the model's lock)."""
        from resa_engine.generate import format_prompt
        from resa_engine.sampling import SamplingParams

        served = self._served(model)
        try:
            params = SamplingParams(
                max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=list(req.stop or [])
            )
            messages = [m.model_dump() for m in req.messages] if req.messages is not None else None
            ids = format_prompt(served.loaded.tokenizer, req.prompt, messages)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if len(ids) > self.settings.max_prompt_tokens:
            raise TooLarge(
                f"prompt is {len(ids)} tokens, over this server's limit of {self.settings.max_prompt_tokens}",
                type="prompt_too_long",
            )
        attached = self._resolve_adapter(model, req.skill, served) if req.skill else None
        return _Prepared(served, model, req.skill, attached, ids, params)

    def _run(self, prep: _Prepared) -> GenerationResult:
        from resa_engine.generate import generate

        completion = generate(
            prep.served.loaded.model,
            prep.served.loaded.tokenizer,
            input_ids=prep.input_ids,
            params=prep.params,
            adapter=prep.attached.name if prep.attached else None,
        )
        return GenerationResult(
            text=completion.text,
            finish_reason=completion.finish_reason,
            usage=completion.usage.to_dict(),
            model=prep.model,
            skill=prep.skill,
            cross_model=bool(prep.attached and prep.attached.cross_model),
            adapter_target=prep.attached.target if prep.attached else None,
        )

    def _generate_sync(self, req, model: str) -> GenerationResult:
        served = self._served(model)
        with served.lock:
            return self._run(self._prepare(req, model))

    async def generate(self, req) -> GenerationResult:
        """One completion; raises ApiError (404 unknown model/skill, 409 incompatible adapter, 413/422 limits)."""
        model = self._check_request(req)
        return await asyncio.to_thread(self._generate_sync, req, model)

    async def stream(self, req) -> AsyncIterator[dict]:
        """Check and prepare first (errors raise before anything is sent), then yield text deltas and a final event.

        The single-request engine produces the completion in one piece, so it arrives as one
        delta; the serving scheduler streams token by token through the same events.
        """
        model = self._check_request(req)
        result = await asyncio.to_thread(self._generate_sync, req, model)

        async def events() -> AsyncIterator[dict]:
            if result.text:
                yield {"text": result.text}
            yield {"text": "", "done": True, **{k: v for k, v in result.to_dict().items() if k != "text"}}

        return events()

    def close(self) -> None:
        self._models.clear()

