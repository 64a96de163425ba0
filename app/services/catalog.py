"""What the service can serve: registered models and their shapes (read from configs, no weights), and
which stored adapter of a skill serves a given model.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from adapters_store import ArtifactNotFound
from app.api.errors import Conflict, Invalid, NotFound, Unavailable
from app.settings import Settings

log = logging.getLogger("resa.catalog")


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


def resolve_adapter_target(store, model: str, skill: str, shapes) -> tuple[str, dict, object]:
    """The store target whose adapter of `skill` serves `model` (its own, else a compatible one built
    on another model), its manifest, and the fetched folder when a compatibility check needed it."""
    from resa_engine.lora.peft_io import check_compat

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
        compat = check_compat(folder, shapes)
        if compat.ok:
            return target, manifest, folder
        reasons.append(f"{target}: {compat.reason}")
    raise Conflict(
        f"skill {skill!r} has no adapter compatible with {model}: " + "; ".join(reasons),
        type="incompatible_adapter",
        reasons=reasons,
    )
