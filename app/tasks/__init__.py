"""Long-running work (sources, extraction, tuning, evaluation) as plain functions of JSON-shaped params.

The CLI calls them in-process; RQ jobs (app/jobs/runner.py) call the very same functions on a
worker. Params are the HTTP request bodies (dicts), so one validation serves all three.
Heavy imports (torch, transformers) happen inside the functions, never at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from adapters_store import ArtifactStore, Staging
from app.settings import Settings, get_settings


def check_object(value, allowed, *, unknown: str, not_object: str) -> dict:
    """`value` is a dict whose keys are all in `allowed`: else ValueError(`not_object`), or one naming the unknown keys."""
    if not isinstance(value, dict):
        raise ValueError(not_object)
    bad = sorted(set(value) - set(allowed))
    if bad:
        raise ValueError(f"unknown {unknown}(s) {', '.join(bad)}; allowed: {', '.join(allowed)}")
    return value


def staging_for(settings: Settings) -> Staging:
    """The checkpoint folders of jobs on this settings' store, under its cache dir."""
    return Staging(Path(settings.cache_dir), settings.store_url)


@dataclass
class TaskContext:
    settings: Settings
    store: ArtifactStore
    progress: Callable[[Any], None] | None = None
    """Engine progress callback (resa_engine.progress.Progress)."""
    should_stop: Callable[[], bool] | None = None
    """Polled by engine loops; True makes them raise Cancelled at the next step."""
    job_id: str | None = None
    allow_paths: bool = False
    """CLI only: model names may be local paths, source adapters local folders."""
    _models: dict = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kw) -> "TaskContext":
        settings = settings or get_settings()
        return cls(settings=settings, store=settings.open_store(), **kw)

    @property
    def registry(self):
        from resa_engine.models import ModelRegistry

        return ModelRegistry.load(self.settings.models_file)

    @property
    def staging(self) -> Staging:
        """Deterministic local folders for checkpoints: a retried job resumes instead of redoing."""
        return staging_for(self.settings)

    def load_model(self, name: str):
        """Load (once per task) a registered model, or a local path when the CLI allows it."""
        if name not in self._models:
            from resa_engine.models import load_model

            spec = self.registry.resolve(name, allow_path=self.allow_paths)
            self._models[name] = load_model(spec, device=self.settings.device, cache_dir=self.settings.cache_dir)
        return self._models[name]
