"""What every artifact manifest records about how it was made: library versions and JSON-safe figures."""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
from pathlib import Path
from typing import Any

from . import __version__

_DISTRIBUTIONS = {"torch": "torch", "transformers": "transformers", "peft": "peft", "sparsify": "eai-sparsify"}


def versions() -> dict[str, str]:
    """resa and the libraries that shape a skill or an adapter, as installed."""
    out = {}
    for key, dist in _DISTRIBUTIONS.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = "unknown"
    out["resa"] = __version__
    return out


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such floats (a diverged metric) become null, in nested dicts and lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
