"""Progress reporting and cooperative cancellation for long engine work.

Engine loops call `tracker.update(step, **metrics)`; the caller's callback turns that
into a progress bar (CLI) or job meta (worker). `should_stop` is polled at the same
time, so a cancelled job stops at the next step boundary after saving its checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import Cancelled

__all__ = ["Cancelled", "Progress", "ProgressFn", "ProgressTracker", "StopFn"]


@dataclass
class Progress:
    stage: str
    """What is running: `extract`, `heldout`, `tune`, `eval`, ..."""
    step: int
    """Units done so far (tokens for extraction, optimizer steps for tuning, samples for evaluation)."""
    total: int
    """Units in the whole stage."""
    eta_s: float | None = None
    """Estimated seconds left, from the rate since the stage (or resume) started."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Live metrics (loss, fvu, kl, tokens_per_s, ...)."""

    def to_dict(self) -> dict:
        return {"stage": self.stage, "step": self.step, "total": self.total, "eta_s": self.eta_s, "metrics": self.metrics}


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]


class ProgressTracker:
    """Rate-limited progress callbacks with an ETA, plus the cancellation check."""

    def __init__(
        self,
        stage: str,
        total: int,
        callback: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        *,
        start_step: int = 0,
        min_interval_s: float = 0.5,
    ):
        self.stage, self.total = stage, total
        self.callback, self.should_stop = callback, should_stop
        self.start_step, self.min_interval_s = start_step, min_interval_s
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, step: int, *, force: bool = False, **metrics: float) -> None:
        now = time.perf_counter()
        if self.callback and (force or step >= self.total or now - self._last >= self.min_interval_s):
            self._last = now
            done = step - self.start_step
            eta = (now - self.t0) / done * (self.total - step) if done > 0 else None
            self.callback(Progress(self.stage, step, self.total, eta, {k: float(v) for k, v in metrics.items()}))
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"{self.stage} cancelled at step {step}/{self.total}")

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0
