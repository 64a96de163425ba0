"""The one interface for everything that generates tokens: serving (/generate, /v1/*), evaluation,
the CLI and the demo all submit requests to an `Engine` and read `RequestHandle`s.

Two implementations: the native continuous-batching engine (engine/native/, CPU default, tests)
and vLLM (engine/vllm/, GPU). Both honour the same request fields and limits (`check_request`)
and give the same greedy tokens. An engine knows nothing of HTTP: bad requests raise ValueError,
a full queue QueueFull, a stopped engine EngineStopped (resa_engine.errors).

    engine = open_engine("native", model, adapter_loader=loader, config=EngineConfig(max_batch=32)).start()
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=64), adapter="arith")
    async for item in handle.stream():   # Delta(text, token_ids)..., then the Completion
        ...                              # leaving the loop early cancels the request
    engine.stop(drain=True)
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, Callable, NamedTuple, Protocol, runtime_checkable

from ..sampling import SamplingParams


@dataclass
class EngineConfig:
    """Limits of one served model's engine (the service fills them from its settings)."""

    max_batch: int = 32
    """Most sequences decoded together in one step."""
    max_tokens_in_flight: int = 65_536
    """Cap on prompt + max_tokens reserved by running sequences (a request is admitted only if its
    whole budget fits, so a running sequence never has to be preempted)."""
    max_queue: int = 256
    """Requests waiting beyond the running batch before `submit` raises QueueFull."""
    max_prompt_tokens: int = 4096
    """Longest prompt accepted, in tokens."""
    max_new_tokens: int = 2048
    """Largest `max_tokens` a request may ask for."""
    max_prefill_tokens: int = 16_384
    """Native: padded prompt tokens prefilled in one step when requests join (bounds the pause of running rows)."""
    kv_headroom: int = 64
    """Native: spare KV-cache columns allocated when the batch is rebuilt, so appends rarely reallocate."""
    threads: int | None = None
    """Native, CPU only: torch intra-op threads of the engine thread (None: torch's default; see resa_engine.threads)."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{f.name} must be at least 1, got {value}")


class Delta(NamedTuple):
    """A streamed piece of a completion."""

    text: str
    token_ids: list[int]
    logprobs: list | None = None
    """sampling.TokenLogprob per token of `token_ids`, when the request asked for logprobs."""


class TokenRate:
    """Tokens generated per second over a sliding window: EngineStats.tokens_per_s of every engine."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()

    def add(self, tokens: int) -> None:
        self._events.append((time.monotonic(), tokens))

    def per_s(self) -> float:
        now = time.monotonic()
        while self._events and now - self._events[0][0] > self.window_s:
            self._events.popleft()
        if not self._events:
            return 0.0
        return sum(n for _, n in self._events) / max(now - self._events[0][0], 1e-3)


@dataclass
class EngineStats:
    """Live figures of one engine, for /metrics."""

    queued: int
    running: int
    waiting_for_adapter: int
    tokens_in_flight: int
    """Prompt + generated tokens held by running rows."""
    tokens_per_s: float
    """Generated tokens per second over the last few seconds."""
    completed: int
    cancelled: int
    failed: int
    generated_tokens: int
    steps: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@runtime_checkable
class Engine(Protocol):
    """What every generation engine offers. `submit` never blocks on generation."""

    name: str
    """The served model's name."""
    tokenizer: Any
    config: EngineConfig
    context: int | None
    """The model's context length in tokens (None: unknown)."""
    num_layers: int
    hidden_size: int
    device: Any
    """Where SAEs for this engine's requests are loaded (the model's device; CPU for engines that load them themselves)."""
    shapes: Any
    """lora.peft_io.ModelShapes of the served model: what adapters are checked against."""

    def start(self) -> "Engine": ...

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None, *, sae: Any = None, ignore_eos: bool = False) -> Any:
        """Queue one completion and return its RequestHandle; raises ValueError, QueueFull or EngineStopped.

        `adapter`: a key the engine's adapter loader resolves to a PEFT folder (None: the base model);
        `sae`: an SAE at one block for this request alone (sae.splice.SaeSplice, steering or splice
        mode); `ignore_eos`: keep generating past EOS (benchmarks)."""

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run `fn(model)` on the served weights, never concurrently with a step (native: the LoadedModel)."""

    def stats(self) -> EngineStats: ...

    def stop(self, drain: bool = True, timeout: float | None = 60.0) -> None:
        """Refuse new requests; with `drain`, finish queued and running ones first (up to `timeout` s)."""


def check_request(
    prompt_ids: list[int], params: SamplingParams, sae: Any, config: EngineConfig, *, context: int | None, vocab_size: int, num_layers: int
) -> list[int]:
    """The limits every engine enforces at submission; returns the prompt as plain ints."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) > config.max_prompt_tokens:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the limit is {config.max_prompt_tokens}")
    if params.max_tokens > config.max_new_tokens:
        raise ValueError(f"max_tokens {params.max_tokens} exceeds the limit of {config.max_new_tokens}")
    if context and len(prompt) + params.max_tokens > context:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context of {context} tokens")
    if len(prompt) + params.max_tokens > config.max_tokens_in_flight:
        raise ValueError(
            f"prompt + max_tokens = {len(prompt) + params.max_tokens} tokens exceeds max_tokens_in_flight {config.max_tokens_in_flight}"
        )
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    if sae is not None and not 0 <= sae.layer < num_layers:
        raise ValueError(f"SAE layer {sae.layer} is out of range ({num_layers} layers)")
    return prompt
