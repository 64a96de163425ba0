"""What the native engine keeps per request: the queued request and the running row (its cache length,
sampled tokens, streamed text)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...lora.cache import AdapterRef
from ...sampling import SamplingParams
from ..handle import RequestHandle
from ..text import TextAssembler


@dataclass(eq=False)
class Request:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    ref: AdapterRef | None
    ignore_eos: bool
    submitted: float
    sae: object | None = None
    """This row's SAE intervention (`sae.splice.SaeSplice`: `.layer`, `.apply(x)`), or None."""

    @property
    def budget(self) -> int:
        return len(self.prompt) + self.params.max_tokens


@dataclass(eq=False)
class Row:
    """A running sequence."""

    req: Request
    slot: int
    generator: torch.Generator | None
    text: TextAssembler
    cached: int = 0
    """Tokens of this row held in the KV cache."""
    next_token: int = -1
    """Sampled, not yet fed to the model."""
    generated: int = 0
    """Tokens sampled so far (EOS included)."""
    token_ids: list[int] = field(default_factory=list)
    """Completion tokens (EOS excluded)."""
    unsent: list[int] = field(default_factory=list)
    """Tokens whose text has not been streamed yet (held back: incomplete character or possible stop)."""
    logprobs: list = field(default_factory=list)
    """sampling.TokenLogprob per completion token, when the request asked for them."""
    prompt_logprobs: list | None = None
    """Per prompt token (None first), computed at prefill when the request asked for them."""
    finished: bool = False
