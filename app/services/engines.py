"""The generation engines of one process: which engine a setting names, how it is built over a
registered model, how adapter keys resolve to verified folders, and (in the API) one engine per
served model, loaded on first use, with the SAEs that requests attach to it.

The same `build_engine` serves the API, the workers' evaluations and the CLI, so every token the
service produces comes from one engine interface (resa_engine/engine/protocol.py).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from adapters_store import ArtifactNotFound
from app.api.errors import Conflict, Invalid, NotFound, Unavailable
from app.services.catalog import ModelCatalog
from app.settings import Settings

log = logging.getLogger("resa.engines")

LOCAL_PREFIX = "path:"
"""Adapter keys naming a local PEFT folder (CLI only) instead of a stored adapter."""


def adapter_key(target: str, skill: str, version: str = "") -> str:
    """The engine's key of a stored adapter; the version makes a replaced adapter load afresh."""
    return f"{target}/{skill}@{version}"


def store_adapter_loader(store, *, allow_paths: bool = False) -> Callable[[str], Path]:
    """key -> the checksum-verified local folder of a stored adapter (or, CLI only, a local folder)."""

    def load(key: str) -> Path:
        if key.startswith(LOCAL_PREFIX):
            if not allow_paths:
                raise ValueError("local adapter folders are accepted on the command line only")
            return Path(key[len(LOCAL_PREFIX) :])
        target, skill = key.split("@", 1)[0].split("/", 1)
        return store.fetch("adapter", (target, skill))

    return load


def engine_config(settings: Settings, **overrides):
    """The engine limits the settings name (one set of limits for every route and job)."""
    from resa_engine.engine import EngineConfig

    s = settings
    values = dict(
        max_batch=int(s.max_batch),
        max_queue=int(s.max_queue),
        max_prompt_tokens=int(s.max_prompt_tokens),
        max_new_tokens=int(s.max_new_tokens),
        max_tokens_in_flight=int(s.max_tokens_in_flight),
        threads=int(s.engine_threads) or None,
    )
    return EngineConfig(**{**values, **overrides})


def build_engine(settings: Settings, spec, *, adapter_loader: Callable[[str], Path] | None, config=None, model=None):
    """The engine RESA_ENGINE names over a registry entry, not started (`.start()` it). The native engine runs
    on a LoadedModel (`model`, else loaded here); vLLM loads the weights in its own processes."""
    from resa_engine.models import load_model

    config = config or engine_config(settings)
    if settings.engine_kind() == "vllm":
        from resa_engine.engine.vllm import VllmEngine
        from resa_engine.models import model_folder

        folder, sha = model_folder(spec, settings.cache_dir)
        return VllmEngine(
            folder, name=spec.name, sha256=sha, adapter_loader=adapter_loader, config=config, settings=settings.vllm_settings(),
            device=settings.device, base_loader=lambda: load_model(spec, device=settings.device, cache_dir=settings.cache_dir),
        )  # fmt: skip
    from resa_engine.engine import open_native

    model = model or load_model(spec, device=settings.device, cache_dir=settings.cache_dir)
    return open_native(model, adapter_loader, config, adapter_slots=max(1, int(settings.adapter_cache_size)))


@dataclass
class ServedModel:
    """A model this process serves: its engine and the SAEs requests attached to it."""

    name: str
    engine: Any
    saes: "OrderedDict[tuple, Any]" = field(default_factory=OrderedDict)
    """(SAE on the engine's device, its skill folder), LRU by (skill, version, layer)."""

    @property
    def tokenizer(self):
        return self.engine.tokenizer


class ServedModels:
    """One engine per served model in the API process, loaded on first use (the default one at start)."""

    SAE_CACHE = 8
    """SAEs kept loaded per model."""

    def __init__(self, settings: Settings, store, catalog: ModelCatalog):
        self.settings, self.store, self.catalog = settings, store, catalog
        self._models: dict[str, ServedModel] = {}
        self._guard = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._closed = False
        self.load_errors: dict[str, str] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self._models)

    def get(self, name: str) -> ServedModel:
        """The model's engine, loading the model and starting the engine on first use (blocking)."""
        served = self._models.get(name)
        if served is not None:
            return served
        spec = self.catalog.spec(name)
        with self._guard:
            if self._closed:
                raise Unavailable("the server is shutting down", type="engine_stopped")
            lock = self._loading.setdefault(name, threading.Lock())
        with lock:
            if name in self._models:
                return self._models[name]
            try:
                engine = build_engine(self.settings, spec, adapter_loader=store_adapter_loader(self.store)).start()
            except Exception as exc:  # noqa: BLE001 - ModelError, missing files, out of memory: all say "unavailable"
                self.load_errors[name] = str(exc)
                raise Unavailable(f"model {name!r} cannot be loaded: {exc}", type="model_unavailable") from None
            self.load_errors.pop(name, None)
            self._models[name] = ServedModel(name, engine)
            log.info("model %s serving", name)
            return self._models[name]

    def start_loading(self, name: str) -> threading.Thread:
        """Load a model in the background (the default model at startup)."""

        def load() -> None:
            try:
                self.catalog.describe(name)
                self.get(name)
            except Exception as exc:  # noqa: BLE001 - reported by /readyz, retried on first use
                log.error("loading model %s failed: %s", name, getattr(exc, "message", exc))

        thread = threading.Thread(target=load, name=f"load-{name}", daemon=True)
        thread.start()
        return thread

    def sae(self, served: ServedModel, spec) -> tuple[Any, dict]:
        """The request's SAE at one block (sae.splice.SaeSplice) for a `sae` block: 404 unknown skill, 422 a
        layer the skill has no SAE at or a bad edit, 409 an SAE that does not read this model's residual stream."""
        from resa_engine.artifacts import Skill
        from resa_engine.errors import SkillError
        from resa_engine.sae.edits import LatentEdit
        from resa_engine.sae.splice import SaeSplice

        try:
            skill = Skill(spec.skill, self.store.manifest("skill", (spec.skill,)))
        except ArtifactNotFound:
            raise NotFound(f"unknown skill {spec.skill!r}", type="unknown_skill") from None
        try:
            layer = skill.layer(spec.layer)
        except SkillError as exc:
            raise Invalid(str(exc), type="invalid_layer") from None
        engine = served.engine
        try:
            skill.check_fits(served.name, engine.hidden_size, engine.num_layers, layer)
        except SkillError as exc:
            raise Conflict(str(exc), type="incompatible_skill") from None
        key = (spec.skill, skill.version, layer)
        with self._guard:
            cached = served.saes.get(key)
            if cached is not None:
                served.saes.move_to_end(key)
        if cached is None:
            folder = self.store.fetch("skill", (spec.skill,))  # checksum-verified; engines that load SAEs themselves read it too
            cached = (Skill(spec.skill, skill.manifest, folder).sae(layer, device=engine.device), folder)
            with self._guard:
                served.saes[key] = cached
                while len(served.saes) > self.SAE_CACHE:
                    served.saes.popitem(last=False)
        sae, folder = cached
        mode = getattr(spec, "mode", "steer")
        edits = [LatentEdit(e.latent, e.mode, e.value) for e in spec.edits]
        try:
            splice = SaeSplice(sae, layer, edits, keep_error=mode == "steer", folder=str(folder))
        except ValueError as exc:
            raise Invalid(str(exc), type="invalid_edit") from None
        return splice, {"skill": spec.skill, "layer": layer, "mode": mode, "edits": len(spec.edits)}

    def forget_skill(self, skill: str) -> None:
        """A deleted or replaced skill: drop its SAEs (their cache keys carry the version anyway)."""
        with self._guard:
            for served in self._models.values():
                for key in [k for k in served.saes if k[0] == skill]:
                    del served.saes[key]

    def close(self) -> None:
        """Finish in-flight requests, refuse new ones, end the engines."""
        with self._guard:
            self._closed = True
            models, self._models = list(self._models.values()), {}
        for served in models:
            served.engine.stop(drain=True, timeout=float(self.settings.drain_timeout_s))
