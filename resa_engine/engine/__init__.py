"""Generation engines behind one interface (protocol.py): the native continuous-batching engine and vLLM.

`open_engine` builds the one a setting names; everything that generates tokens goes through it.
"""

from __future__ import annotations

from typing import Callable

from .protocol import Delta, Engine, EngineConfig, EngineStats, check_request

ENGINES = ("native", "vllm", "auto")

__all__ = ["Delta", "ENGINES", "Engine", "EngineConfig", "EngineStats", "check_request", "open_native"]


def open_native(model, adapter_loader: Callable[[str], object] | None = None, config: EngineConfig | None = None, *, adapter_slots: int = 16):
    """The native engine over a LoadedModel; with `adapter_loader` (key -> PEFT folder) it serves adapters
    through an AdapterCache of `adapter_slots` slots. Not started: call `.start()`."""
    from ..lora.cache import AdapterCache
    from .native import Scheduler

    cache = AdapterCache(model, adapter_loader, capacity=adapter_slots) if adapter_loader is not None else None
    return Scheduler(model, cache, config, own_adapters=cache is not None)
