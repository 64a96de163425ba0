"""The native engine: continuous batching over a loaded HF model (CPU default, tests, embedded mode)."""

from .scheduler import Scheduler

__all__ = ["Scheduler"]
