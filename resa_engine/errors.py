"""Every exception the engine raises on purpose, importable without torch.

The API maps these to HTTP in one place (app/api/errors.py); the CLI prints their message
on one line. Bad input is a ValueError subclass (4xx); the engine's own states are
ServingError subclasses.
"""

from __future__ import annotations


class ModelError(ValueError):
    """A model cannot be named, found or loaded, or a layer/width does not fit it; the message says why."""


class DatasetError(ValueError):
    """A dataset that cannot be used; `problems` holds (line, message) pairs, 1-based lines."""

    def __init__(self, message: str, problems: list[tuple[int, str]] | None = None):
        self.problems = problems or []
        super().__init__(message)


class AdapterError(ModelError):
    """An adapter folder that cannot be read (not PEFT, not LoRA, not safetensors); the message says why."""


class AdapterMismatch(AdapterError):
    """This adapter cannot be served on (or merged into) this model; the message names the module or option."""


class SkillError(ModelError):
    """A skill that does not fit the request: a layer it has no SAE at, a width the model does not have."""


class Cancelled(Exception):
    """Raised inside an engine loop when the caller asked it to stop."""


class ServingError(RuntimeError):
    """Base of the generation engines' own errors (bad requests raise ValueError instead)."""


class QueueFull(ServingError):
    """The request queue is at capacity; retry after `retry_after_s` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineStopped(ServingError):
    """The engine is not accepting requests (stopped or shutting down; HTTP 503)."""


class RequestCancelled(ServingError):
    """The request was cancelled before it finished (its client went away, or it was asked to stop)."""


class AdapterCacheFull(ServingError):
    """Every adapter slot is pinned: a new adapter can never be loaded."""


class ManifestError(ValueError):
    """An artifact's manifest is valid JSON of the wrong shape: the artifact cannot be used (HTTP 409)."""


class NumericalError(ValueError):
    """A request's own values failed inside the engine (an overflow from its SAE edit, an unusable seed):
    that request alone fails, with a 4xx."""
