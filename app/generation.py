"""Generation in the API process, behind one small class the /generate route calls.

`GenerationService.generate(req)` resolves the model (registered names only, loaded on
first use), the skill's adapter for that model from the store (or a compatible adapter
built on another model: a cross-model attach, paper §4.3), and queues the request on
the model's continuous-batching scheduler (`BatchedGeneration`, also behind the
OpenAI-compatible /v1 routes), which streams tokens as they are decoded. The
single-request engine path (`_generate_sync`) stays for callers that hold the model's lock.

`ModelCatalog` answers "which models exist and what shape are they" from their configs,
without loading weights (validation of job requests, GET /models).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from app.api.errors import ApiError, Conflict, Invalid, NotFound, TooLarge, Unavailable
from app.settings import Settings

log = logging.getLogger("resa.generation")


def resolve_adapter_target(store, model: str, skill: str, loaded) -> tuple[str, dict, object]:
    """The store target whose adapter of `skill` serves `model` (its own, else a compatible one built
    on another model), its manifest, and the fetched folder when a compatibility check needed it."""
    from adapters_store import ArtifactNotFound
    from resa_engine.adapter import check_adapter_compat

    try:
        return model, store.manifest("adapter", (model, skill)), None
    except ArtifactNotFound:
        pass
    candidates = [m for m in store.list("adapter") if m["key"][1] == skill]
    if not candidates:
        if store.exists("skill", (skill,)):
            raise Conflict(f"skill {skill!r} has no adapter yet; build one with POST /skills/{skill}/adapters", type="no_adapter")
        raise NotFound(f"unknown skill {skill!r}", type="unknown_skill")
    reasons = []
    for manifest in sorted(candidates, key=lambda m: m["key"][0]):
        target = manifest["key"][0]
        folder = store.fetch("adapter", (target, skill))
        compat = check_adapter_compat(folder, loaded)
        if compat.ok:
            return target, manifest, folder
        reasons.append(f"{target}: {compat.reason}")
    raise Conflict(
        f"skill {skill!r} has no adapter compatible with {model}: " + "; ".join(reasons),
        type="incompatible_adapter",
        reasons=reasons,
    )


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
        self.batched = BatchedGeneration(settings, store, self.catalog)

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
                self.batched.served(name)  # the scheduler's copy, so the first request does not wait for it
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

    async def run_on_base(self, name: str, fn):
        """`fn(LoadedModel)` in a worker thread under the model's lock, on the base weights (adapters
        attached for generation are disabled for the call); the model loads on first use."""
        self.catalog.spec(name)

        def call():
            from peft import PeftModel

            served = self._served(name)
            with served.lock:
                peft_model = served.loaded.model
                if not isinstance(peft_model, PeftModel):
                    return fn(served.loaded)
                with peft_model.disable_adapter():
                    return fn(served.loaded)

        return await asyncio.to_thread(call)

    # ------------------------------------------------------------ adapters

    def _resolve_adapter(self, model: str, skill: str, served: _Served) -> _Attached:
        """The adapter for (model, skill), attached and marked most recently used."""
        cached = served.adapters.get(skill)
        if cached is not None and self._still_current(cached, skill):
            if cached.target == model or not self.store.exists("adapter", (model, skill)):
                served.adapters.move_to_end(skill)
                return cached
        if cached is not None:
            self._detach(served, skill)

        target, manifest, folder = resolve_adapter_target(self.store, model, skill, served.loaded)
        return self._attach(served, model, skill, target, manifest, folder=folder)

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
        """One completion through the model's continuous-batching scheduler; raises ApiError (404 unknown
        model/skill, 409 incompatible or corrupt adapter, 413/422 limits, 429 queue full)."""
        queued = await self._submit_batched(req, self._check_request(req))
        stream = queued.handle.stream()
        try:
            async for item in stream:
                if hasattr(item, "finish_reason"):  # the Completion, after the Deltas
                    return self._batched_result(queued, item)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - the request's own failure (adapter load, stop)
            raise _as_api(exc) from None
        finally:
            await stream.aclose()  # leaving early (the caller was cancelled) cancels the request
        raise ApiError("generation ended without a result")

    async def stream(self, req) -> AsyncIterator[dict]:
        """Check, queue and wait for the first token (errors raise before anything is sent), then
        yield the scheduler's text deltas as they are decoded and a final event."""
        queued = await self._submit_batched(req, self._check_request(req))
        stream = queued.handle.stream()
        try:
            first = await anext(stream)
        except BaseException as exc:
            await stream.aclose()
            if isinstance(exc, (ApiError, asyncio.CancelledError)) or not isinstance(exc, Exception):
                raise
            raise _as_api(exc) from None

        async def events() -> AsyncIterator[dict]:
            try:
                item = first
                while True:
                    if hasattr(item, "finish_reason"):
                        result = self._batched_result(queued, item)
                        yield {"text": "", "done": True, **{k: v for k, v in result.to_dict().items() if k != "text"}}
                        return
                    if item.text:
                        yield {"text": item.text}
                    item = await anext(stream)
            finally:
                await stream.aclose()  # a client that went away cancels the request

        return events()

    async def _submit_batched(self, req, model: str) -> "BatchedRequest":
        from resa_engine.sampling import SamplingParams

        try:
            params = SamplingParams(
                max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=list(req.stop or [])
            )
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        messages = [m.model_dump() for m in req.messages] if req.messages is not None else None
        return await self.batched.submit(model, req.skill, prompt=req.prompt, messages=messages, params=params)

    @staticmethod
    def _batched_result(queued: "BatchedRequest", completion) -> GenerationResult:
        return GenerationResult(
            text=completion.text,
            finish_reason=completion.finish_reason,
            usage=completion.usage.to_dict(),
            model=queued.model,
            skill=queued.skill,
            cross_model=queued.cross_model,
            adapter_target=queued.adapter_target,
        )

    def close(self) -> None:
        self.batched.close()
        self._models.clear()


# ------------------------------------------------------------ continuous batching


@dataclass
class BatchedRequest:
    """A request queued on a model's scheduler, with what the response must say about it."""

    handle: Any
    model: str
    skill: str | None
    cross_model: bool
    adapter_target: str | None
    prompt_tokens: int


@dataclass
class _Batched:
    """A model served by the continuous-batching scheduler: its own weights, adapter cache and loop."""

    loaded: Any
    adapters: Any
    scheduler: Any


class BatchedGeneration:
    """Per-model `Scheduler` + `AdapterCache` (resa_engine.serving) behind the OpenAI-compatible routes.

    Each served model gets its own copy of the weights: the scheduler's LoRA bank hooks the
    model's Linear modules, and PEFT adapters attached by the single-request path must never
    apply to batched rows. Adapters load through the store's checksum-verified `fetch`, keyed
    "<target>/<skill>"; a skill without an adapter for this model is served by a compatible
    adapter built on another model (cross-model, paper §4.3).
    """

    def __init__(self, settings: Settings, store, catalog: ModelCatalog):
        self.settings, self.store, self.catalog = settings, store, catalog
        self._models: dict[str, _Batched] = {}
        self._guard = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._closed = False

    def served(self, name: str) -> _Batched:
        """The model's scheduler, loading the model and starting the loop on first use."""
        batched = self._models.get(name)
        if batched is not None:
            return batched
        spec = self.catalog.spec(name)
        with self._guard:
            if self._closed:
                raise Unavailable("the server is shutting down", type="engine_stopped")
            lock = self._loading.setdefault(name, threading.Lock())
        with lock:
            if name in self._models:
                return self._models[name]
            from resa_engine.adapter_cache import AdapterCache
            from resa_engine.models import load_model
            from resa_engine.serving import Scheduler

            try:
                loaded = load_model(spec, device=self.settings.device, cache_dir=self.settings.cache_dir)
            except Exception as exc:  # noqa: BLE001 - ModelError, missing files, out of memory: all say "unavailable"
                raise Unavailable(f"model {name!r} cannot be loaded: {exc}", type="model_unavailable") from None
            cache = AdapterCache(loaded, self._fetch, capacity=max(1, int(self.settings.adapter_cache_size)))
            s = self.settings
            scheduler = Scheduler(
                loaded,
                cache,
                max_batch=int(s.max_batch),
                max_queue=int(s.max_queue),
                max_prompt_tokens=int(s.max_prompt_tokens),
                max_new_tokens=int(s.max_new_tokens),
                max_tokens_in_flight=int(s.max_tokens_in_flight),
            ).start()
            self._models[name] = _Batched(loaded, cache, scheduler)
            log.info("model %s serving with continuous batching", name)
            return self._models[name]

    def _fetch(self, key: str):
        target, skill = key.split("@", 1)[0].split("/", 1)
        return self.store.fetch("adapter", (target, skill))

    def _submit_sync(self, model: str, skill: str | None, prompt, messages, params) -> BatchedRequest:
        from resa_engine.generate import format_prompt
        from resa_engine.serving import EngineStopped, QueueFull

        batched = self.served(model)
        try:
            ids = format_prompt(batched.loaded.tokenizer, prompt, messages)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if len(ids) > self.settings.max_prompt_tokens:
            raise TooLarge(
                f"prompt is {len(ids)} tokens, over this server's limit of {self.settings.max_prompt_tokens}",
                type="prompt_too_long",
            )
        target, key = None, None
        if skill:
            target, manifest, _ = resolve_adapter_target(self.store, model, skill, batched.loaded)
            # The version is part of the cache key: a replaced adapter loads afresh instead of the old weights.
            key = f"{target}/{skill}@{manifest.get('created_at', '')}"
        try:
            handle = batched.scheduler.submit(ids, params, adapter=key)
        except QueueFull as exc:
            retry = max(1, math.ceil(exc.retry_after_s))
            raise ApiError(str(exc), type="rate_limit_exceeded", status=429, headers={"Retry-After": str(retry)}) from None
        except EngineStopped as exc:
            raise Unavailable(str(exc), type="engine_stopped") from None
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        return BatchedRequest(handle, model, skill, bool(target and target != model), target, len(ids))

    async def submit(
        self, model: str, skill: str | None, *, prompt: str | None = None, messages: list[dict] | None = None, params
    ) -> BatchedRequest:
        """Queue one request (errors raise here, before any response starts): 404 unknown model/skill,
        409 incompatible adapter, 413/422 limits, 429 queue full (Retry-After), 503 stopping."""
        self.catalog.spec(model)
        if params.max_tokens > self.settings.max_new_tokens:
            raise Invalid(
                f"max_tokens {params.max_tokens} is over this server's limit of {self.settings.max_new_tokens}",
                type="max_tokens_too_large",
            )
        return await asyncio.to_thread(self._submit_sync, model, skill, prompt, messages, params)

    def close(self) -> None:
        """Finish in-flight requests, refuse new ones, end the loops."""
        with self._guard:
            self._closed = True
            models, self._models = list(self._models.values()), {}
        for batched in models:
            batched.scheduler.stop(drain=True)
            batched.adapters.close()


def serving_error(exc: BaseException) -> ApiError | None:
    """A request's failure raised from the scheduler's stream (adapter load, mismatch, stop), as HTTP."""
    from app.api.errors import as_api_error

    api = as_api_error(exc)
    if api is not None:
        return api
    serving, lora = sys.modules.get("resa_engine.serving"), sys.modules.get("resa_engine.lora_batch")
    if lora is not None and isinstance(exc, lora.AdapterMismatch):
        return Conflict(str(exc), type="incompatible_adapter")
    if serving is not None and isinstance(exc, serving.EngineStopped):
        return Unavailable(str(exc), type="engine_stopped")
    if serving is not None and isinstance(exc, serving.RequestCancelled):
        return ApiError(str(exc), type="cancelled", status=499)
    adapter = sys.modules.get("resa_engine.adapter")
    if adapter is not None and isinstance(exc, adapter.AdapterError):
        return Conflict(str(exc), type="incompatible_adapter")
    return None


def _as_api(exc: BaseException) -> ApiError:
    return serving_error(exc) or ApiError(f"generation failed: {exc}")
