"""Generation in the API process, behind one small class the /generate route calls.

`GenerationService.generate(req)` resolves the model (registered names only, loaded on
first use), the skill's adapter for that model from the store (or a compatible adapter
built on another model: a cross-model attach, paper §4.3), and queues the request on
the model's continuous-batching scheduler (`BatchedGeneration`, also behind the
OpenAI-compatible /v1 routes), which streams tokens as they are decoded. A request may
also carry SAE edits (`sae`, steering at one layer) and ask for the unsteered completion
beside the steered one (`compare`). Each model is loaded once, by its scheduler.

`ModelCatalog` answers "which models exist and what shape are they" from their configs,
without loading weights (validation of job requests, GET /models).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
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


class GenerationService:
    """Completions on registered models with a skill attached per request.

    Every model is loaded once, into its continuous-batching scheduler (`BatchedGeneration`);
    other uses of the weights (`run_on_base`, e.g. inspect) run on the scheduler's own thread
    between decode steps."""

    def __init__(self, settings: Settings, store, catalog: ModelCatalog | None = None):
        self.settings, self.store = settings, store
        self.catalog = catalog or ModelCatalog(settings)
        self.batched = BatchedGeneration(settings, store, self.catalog)

    # ------------------------------------------------------------ models

    @property
    def model_names(self) -> list[str]:
        return self.catalog.names()

    @property
    def loaded_models(self) -> list[str]:
        return self.batched.loaded_models

    def is_loaded(self, name: str) -> bool:
        return name in self.batched.loaded_models

    def load_error(self, name: str) -> str | None:
        return self.batched.load_errors.get(name)

    def start_loading(self, name: str) -> threading.Thread:
        """Load a model in the background (the default model at startup)."""

        def load() -> None:
            try:
                self.catalog.describe(name)
                self.batched.served(name)
                log.info("model %s loaded", name)
            except Exception as exc:  # noqa: BLE001 - reported by /readyz, retried on first use
                log.error("loading model %s failed: %s", name, getattr(exc, "message", exc))

        thread = threading.Thread(target=load, name=f"load-{name}", daemon=True)
        thread.start()
        return thread

    async def run_on_base(self, name: str, fn):
        """`fn(LoadedModel)` on the base weights of the served model (loaded on first use), run by its
        scheduler between decode steps, so it never races a batch's adapters or hooks."""
        from resa_engine.serving import EngineStopped

        self.catalog.spec(name)
        batched = await asyncio.to_thread(self.batched.served, name)
        try:
            return await asyncio.wrap_future(batched.scheduler.call(fn))
        except EngineStopped as exc:
            raise Unavailable(str(exc), type="engine_stopped") from None

    def forget_skill(self, skill: str) -> None:
        """A deleted skill: drop its steering SAEs. Its adapters become unreachable (the store no longer
        resolves them) and leave the adapter caches by LRU."""
        self.batched.forget_skill(skill)

    # ------------------------------------------------------------ generation

    def _check_request(self, req) -> str:
        model = req.model or self.settings.default_model
        if not model:
            raise Invalid("no `model` given and the server has no default model", type="invalid_request")
        self.catalog.spec(model)
        return model

    async def generate(self, req) -> dict:
        """One completion through the model's continuous-batching scheduler; raises ApiError (404 unknown
        model/skill, 409 incompatible or corrupt adapter, 413/422 limits, 429 queue full)."""
        queued = await self._submit_batched(req, self._check_request(req))
        try:
            completions = await queued.results()
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - the request's own failure (adapter load, stop)
            raise _as_api(exc) from None
        return self._batched_result(queued, *completions)

    async def stream(self, req) -> AsyncIterator[dict]:
        """Check, queue and wait for the first token (errors raise before anything is sent), then
        yield the scheduler's text deltas as they are decoded and a final event per completion
        (with `compare`, events carry `index`: 0 steered, 1 unsteered)."""
        queued = await self._submit_batched(req, self._check_request(req))
        try:
            items = await queued.open()
        except (ApiError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - see generate
            raise _as_api(exc) from None
        indexed = len(queued.handles) > 1

        async def events() -> AsyncIterator[dict]:
            try:
                async for index, item in items:
                    tag = {"index": index} if indexed else {}
                    if hasattr(item, "finish_reason"):
                        result = self._batched_result(queued, item) if index == 0 else _plain_result(item)
                        yield {"text": "", **tag, "done": True, **{k: v for k, v in result.items() if k != "text"}}
                    elif item.text:
                        yield {"text": item.text, **tag}
            finally:
                await items.aclose()  # a client that went away cancels the request

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
        return await self.batched.submit(
            model, req.skill, prompt=req.prompt, messages=messages, params=params, sae=req.sae, compare=req.compare
        )

    @staticmethod
    def _batched_result(queued: "BatchedRequest", completion, unsteered=None) -> dict:
        result = GenerationResult(
            text=completion.text,
            finish_reason=completion.finish_reason,
            usage=completion.usage.to_dict(),
            model=queued.model,
            skill=queued.skill,
            cross_model=queued.cross_model,
            adapter_target=queued.adapter_target,
        ).to_dict()
        if queued.steering is not None:
            result["sae"] = queued.steering
        if unsteered is not None:
            result["unsteered"] = _plain_result(unsteered)
        return result

    def close(self) -> None:
        self.batched.close()


# ------------------------------------------------------------ continuous batching


@dataclass
class BatchedRequest:
    """A request queued on a model's scheduler, with what the response must say about it.

    `handles[0]` is the request; with `compare`, `handles[1]` is the same request without the
    SAE edits, decoded in the same batch."""

    handles: list
    model: str
    skill: str | None
    cross_model: bool
    adapter_target: str | None
    prompt_tokens: int
    steering: dict | None = None
    """{"skill", "layer", "edits"} when the request is steered."""

    @property
    def handle(self):
        return self.handles[0]

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def open(self) -> AsyncIterator[tuple[int, Any]]:
        """(index, Delta | Completion) items of every handle, interleaved as they are decoded. Each
        handle's first item is awaited here, so a failure before the first token (adapter load,
        corrupt artifact) raises from `open()` rather than mid-stream. Closing the iterator early
        cancels whatever is still running."""
        primed = []
        try:
            for handle in self.handles:
                primed.append(await _primed(handle.stream()))
        except BaseException:
            for stream in primed:
                await stream.aclose()
            self.cancel()
            raise
        return _merge(primed)

    async def results(self) -> list:
        """Every handle's Completion, in order (cancels the rest if one fails)."""
        out: dict[int, Any] = {}
        items = await self.open()
        try:
            async for index, item in items:
                if hasattr(item, "finish_reason"):
                    out[index] = item
        finally:
            await items.aclose()
        return [out[i] for i in range(len(self.handles))]


async def _primed(stream: AsyncIterator) -> AsyncIterator:
    """`stream` with its first item already produced (a failure raises here)."""
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise

    async def rest():
        try:
            yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()  # leaving early (client gone) cancels the request

    return rest()


async def _merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave async iterators as (index, item); the first failure propagates and stops the others."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, done))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _Batched:
    """A model served by the continuous-batching scheduler: its own weights, adapter cache and loop."""

    loaded: Any
    adapters: Any
    scheduler: Any
    saes: "OrderedDict[tuple, Any]" = field(default_factory=OrderedDict)
    """Steering SAEs on the model's device, LRU by (skill, version, layer)."""


class BatchedGeneration:
    """Per-model `Scheduler` + `AdapterCache` (resa_engine.serving) behind the OpenAI-compatible routes.

    Each served model gets its own copy of the weights: the scheduler's LoRA bank hooks the
    model's Linear modules, and PEFT adapters attached by the single-request path must never
    apply to batched rows. Adapters load through the store's checksum-verified `fetch`, keyed
    "<target>/<skill>"; a skill without an adapter for this model is served by a compatible
    adapter built on another model (cross-model, paper §4.3).
    """

    SAE_CACHE = 8
    """Steering SAEs kept loaded per model."""

    def __init__(self, settings: Settings, store, catalog: ModelCatalog):
        self.settings, self.store, self.catalog = settings, store, catalog
        self._models: dict[str, _Batched] = {}
        self._guard = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._closed = False
        self.load_errors: dict[str, str] = {}

    @property
    def loaded_models(self) -> list[str]:
        return sorted(self._models)

    def forget_skill(self, skill: str) -> None:
        with self._guard:
            for batched in self._models.values():
                for key in [k for k in batched.saes if k[0] == skill]:
                    del batched.saes[key]

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
                self.load_errors[name] = str(exc)
                raise Unavailable(f"model {name!r} cannot be loaded: {exc}", type="model_unavailable") from None
            self.load_errors.pop(name, None)
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
                threads=int(s.engine_threads) or None,
            ).start()
            self._models[name] = _Batched(loaded, cache, scheduler)
            log.info("model %s serving with continuous batching", name)
            return self._models[name]

    def _fetch(self, key: str):
        target, skill = key.split("@", 1)[0].split("/", 1)
        return self.store.fetch("adapter", (target, skill))

    def _steering(self, batched: "_Batched", spec) -> tuple[Any, dict]:
        """The scheduler's Steering for a request's `sae` block: 404 unknown skill, 422 a layer the skill
        has no SAE at or a bad edit, 409 an SAE that does not read this model's residual stream."""
        from adapters_store import ArtifactNotFound
        from resa_engine.models import ModelError
        from resa_engine.skill import Skill
        from resa_engine.transparency import LatentEdit, Steering

        try:
            skill = Skill(spec.skill, Path(), self.store.manifest("skill", (spec.skill,)))  # its folder is fetched on a cache miss
        except ArtifactNotFound:
            raise NotFound(f"unknown skill {spec.skill!r}", type="unknown_skill") from None
        try:
            layer = skill.layer_or_default(spec.layer)
        except ModelError as exc:
            raise Invalid(str(exc), type="invalid_layer") from None
        try:
            skill.check_target(batched.loaded, layer)
        except ModelError as exc:
            raise Conflict(str(exc), type="incompatible_skill") from None
        key = (spec.skill, str(skill.manifest.get("created_at", "")), layer)
        with self._guard:
            sae = batched.saes.get(key)
            if sae is not None:
                batched.saes.move_to_end(key)
        if sae is None:
            sae = replace(skill, folder=self.store.fetch("skill", (spec.skill,))).sae(layer, device=batched.loaded.device)
            with self._guard:
                batched.saes[key] = sae
                while len(batched.saes) > self.SAE_CACHE:
                    batched.saes.popitem(last=False)
        try:
            steer = Steering(sae, layer, [LatentEdit(e.latent, e.mode, e.value) for e in spec.edits])
        except ValueError as exc:
            raise Invalid(str(exc), type="invalid_edit") from None
        return steer, {"skill": spec.skill, "layer": layer, "edits": len(spec.edits)}

    def _submit_sync(self, model: str, skill: str | None, prompt, messages, params, sae=None, compare=False) -> BatchedRequest:
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
        steer, steering = self._steering(batched, sae) if sae is not None else (None, None)
        handles = []
        try:
            handles.append(batched.scheduler.submit(ids, params, adapter=key, steer=steer))
            if compare:
                handles.append(batched.scheduler.submit(ids, params, adapter=key))
        except (QueueFull, EngineStopped, ValueError) as exc:
            for handle in handles:  # `compare`: the first of the pair must not run alone
                handle.cancel()
            if isinstance(exc, QueueFull):
                retry = max(1, math.ceil(exc.retry_after_s))
                raise ApiError(str(exc), type="rate_limit_exceeded", status=429, headers={"Retry-After": str(retry)}) from None
            if isinstance(exc, EngineStopped):
                raise Unavailable(str(exc), type="engine_stopped") from None
            raise Invalid(str(exc)) from None
        return BatchedRequest(handles, model, skill, bool(target and target != model), target, len(ids), steering)

    async def submit(
        self,
        model: str,
        skill: str | None,
        *,
        prompt: str | None = None,
        messages: list[dict] | None = None,
        params,
        sae=None,
        compare: bool = False,
    ) -> BatchedRequest:
        """Queue one request (errors raise here, before any response starts): 404 unknown model/skill,
        409 incompatible adapter or SAE, 413/422 limits, 429 queue full (Retry-After), 503 stopping.

        `sae` (schemas.SteerSpec) steers the request with a skill's SAE edits; `compare` also queues
        it unsteered, in the same batch (`handles[1]`)."""
        self.catalog.spec(model)
        if params.max_tokens > self.settings.max_new_tokens:
            raise Invalid(
                f"max_tokens {params.max_tokens} is over this server's limit of {self.settings.max_new_tokens}",
                type="max_tokens_too_large",
            )
        return await asyncio.to_thread(self._submit_sync, model, skill, prompt, messages, params, sae, compare)

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


def _plain_result(completion) -> dict:
    return {"text": completion.text, "finish_reason": completion.finish_reason, "usage": completion.usage.to_dict()}


def _as_api(exc: BaseException) -> ApiError:
    return serving_error(exc) or ApiError(f"generation failed: {exc}")
