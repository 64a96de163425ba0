"""The vLLM engine (engine.py) and resa's vLLM plugin (plugin.py): GPU serving behind the same interface."""

from .settings import LORA_RANKS, VllmSettings, vllm_available


def __getattr__(name: str):
    if name == "VllmEngine":  # imports torch; the settings above do not
        from .engine import VllmEngine

        return VllmEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["LORA_RANKS", "VllmEngine", "VllmSettings", "vllm_available"]
