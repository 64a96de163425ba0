"""Stage II, SAE-guided tuning (paper §3): config (config.py), the objective (objective.py), the loop
(run.py). The config imports no torch, so the API checks a request with it; the rest loads on first use."""

from .config import DEFAULT_TARGET_MODULES, LoraSettings, TuneConfig

__all__ = ["DEFAULT_TARGET_MODULES", "LoraSettings", "SpliceObjective", "TuneConfig", "TuneResult", "add_lora", "remove_lora", "tune_adapter"]


def __getattr__(name: str):
    if name == "SpliceObjective":
        from .objective import SpliceObjective

        return SpliceObjective
    if name in ("TuneResult", "add_lora", "remove_lora", "tune_adapter"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
