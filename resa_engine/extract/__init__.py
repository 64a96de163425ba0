"""Stage I, skill extraction (paper §3): config (config.py), the training loop (train.py), held-out
metrics (metrics.py), the whole stage (run.py). The config imports no torch, so the API checks a
request with it; the rest loads on first use."""

from .config import ExtractConfig

__all__ = ["ExtractConfig", "ExtractResult", "extract_skill"]


def __getattr__(name: str):
    if name in ("ExtractResult", "extract_skill"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
