"""Latent edits: what a request does to single SAE latents at every token (steering, splice mode)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

EditMode = Literal["clamp", "add", "scale"]
EDIT_MODES = ("clamp", "add", "scale")
MAX_EDIT_VALUE = 1e4
"""Largest magnitude of an edit value: SAE activations are O(1)-O(100); far larger ones only overflow."""


@dataclass(frozen=True)
class LatentEdit:
    """One edit of one latent, applied to the SAE code at every spliced token."""

    latent: int
    """Latent index in the SAE."""
    mode: EditMode
    """`clamp`: set the activation to value; `add`: add value; `scale`: multiply by value."""
    value: float
    """The clamp target, the amount added, or the factor."""

    def __post_init__(self):
        if self.mode not in EDIT_MODES:
            raise ValueError(f"unknown edit mode {self.mode!r} (use one of {', '.join(EDIT_MODES)})")
        if isinstance(self.latent, bool) or not isinstance(self.latent, int) or self.latent < 0:
            raise ValueError(f"latent index must be a non-negative integer, got {self.latent!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(float(self.value)):
            raise ValueError(f"edit value must be a finite number, got {self.value!r}")
        if abs(self.value) > MAX_EDIT_VALUE:
            raise ValueError(f"edit value {self.value!r} is beyond +-{MAX_EDIT_VALUE:g}")

    def new_activation(self, old):
        """The latent's activation after the edit, from its activation before (0 where it is not in the top-k).
        `scale` keeps an absent latent absent; `clamp` and `add` make it fire (pre-activation taken as 0)."""
        if self.mode == "clamp":
            return old * 0 + self.value
        if self.mode == "scale":
            return old * self.value
        return old + self.value


def check_edits(edits: Sequence[LatentEdit], num_latents: int | None = None) -> list[LatentEdit]:
    """The edits as a list: LatentEdit values, each latent at most once, every index inside the SAE."""
    edits = list(edits)
    seen = set()
    for e in edits:
        if not isinstance(e, LatentEdit):
            raise ValueError(f"edits must be LatentEdit values, got {type(e).__name__}")
        if num_latents is not None and e.latent >= num_latents:
            raise ValueError(f"latent {e.latent} is out of range (SAE has {num_latents} latents: 0..{num_latents - 1})")
        if e.latent in seen:
            raise ValueError(f"latent {e.latent} is edited more than once")
        seen.add(e.latent)
    return edits
