"""Sampling parameters, completions (with log-probabilities when asked), and the per-row sampling step
shared by every generation path."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parameters and results are plain data: the API builds them without torch
    import torch
    from torch import Tensor


SEED_RANGE = (-(2**63), 2**63 - 1)
"""Seeds a torch.Generator accepts from any caller: signed 64-bit."""
GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (as vLLM does): dividing logits by less overflows."""
MAX_LOGPROBS = 20
"""Most alternatives a request may ask for per token (OpenAI's limit for chat `top_logprobs`)."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    """Most new tokens to generate."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    seed: int | None = None
    """Same seed, same prompt, same model -> same output."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the completion (not included in the text)."""
    logprobs: int | None = None
    """Log-probability of each generated token and of its `logprobs` likeliest alternatives (0: the token's
    own only; None: none). Raw model distribution: log_softmax of the logits, before temperature and top_p."""
    prompt_logprobs: int | None = None
    """The same for every prompt token after the first (`echo` with logprobs: scoring a text)."""

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0 (or too small to divide by)."""
        return self.temperature < GREEDY_BELOW

    def __post_init__(self):
        # max_tokens 0 only scores the prompt (its logprobs), as OpenAI's `echo` with `max_tokens: 0` does
        least = 0 if self.prompt_logprobs is not None else 1
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < least:
            raise ValueError(f"max_tokens must be an integer >= {least}, got {self.max_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ValueError(f"seed must be an integer in [-2**63, 2**63 - 1], got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens}


@dataclass
class TokenLogprob:
    """One token's log-probability and its likeliest alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprob(logprobs_row: Tensor, token_id: int, top: int) -> TokenLogprob:
    """From one position's [vocab] log-probabilities: the token's own and the `top` likeliest."""
    import torch

    alternatives = []
    if top:
        values, indices = torch.topk(logprobs_row, top)
        alternatives = list(zip(indices.tolist(), values.tolist()))
    return TokenLogprob(int(token_id), float(logprobs_row[token_id]), alternatives)


@dataclass
class Completion:
    text: str
    finish_reason: str
    """`stop` (EOS or a stop string) or `length` (max_tokens reached)."""
    usage: Usage
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    """Per generated token, when the request asked for `logprobs`."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """Per prompt token (None for the first, which has no context), when the request asked for them."""
    prompt_token_ids: list[int] = field(default_factory=list)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    import torch

    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def sample_next(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token from a [vocab] logit row: argmax at temperature 0, else temperature + top-p."""
    import torch

    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, sorted_idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(sorted_idx[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
