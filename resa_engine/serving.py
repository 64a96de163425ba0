"""The serving engine: continuous batching of generation requests, each with its own skill adapter.

One `Scheduler` per loaded target model runs a decode loop in its own thread. Requests wait
in a bounded queue; between decode steps new ones are prefilled and merged into the running
batch and finished or cancelled ones leave it (iteration-level batching, as in Orca / vLLM).
Rows of one batch may use different LoRA adapters or none: the `AdapterCache`'s `LoraBank`
adds each row's adapter term to the frozen base projections (see lora_batch.py).

The KV cache of the batch is right-aligned: row i holds its `cached` tokens in the last
columns of a [rows, heads, capacity, head_dim] buffer per layer, the columns to their left
are masked padding, and positions are counted per row, so every row computes exactly what
it would compute alone.

Web code calls `submit` and consumes the `RequestHandle`; it never touches torch:

    cache = AdapterCache(model, lambda skill: store.fetch("adapter", (model.name, skill)), capacity=16)
    sched = Scheduler(model, cache, max_batch=32, max_queue=256).start()
    handle = sched.submit(prompt_ids, SamplingParams(max_tokens=256), adapter="arith")
        # ValueError: bad request (400/422); QueueFull: 429 + retry_after_s; EngineStopped: 503
    async for item in handle.stream():   # Delta(text, token_ids)..., then the Completion
        ...                              # leaving the loop early cancels the request
    sched.stop(drain=True)               # on shutdown: finish in-flight requests, refuse new ones

An adapter that fails to load (not in the store, incompatible) fails its requests with the
loader's error or lora_batch.AdapterMismatch, raised from `stream()` / `result()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields, replace
from typing import AsyncIterator, Iterator, NamedTuple

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from .adapter_cache import AdapterCache, AdapterRef
from .hookpoint import _hidden, _with_hidden
from .models import LoadedModel, last_logits_only
from .sampling import Completion, SamplingParams, Usage, find_stop, make_generator, sample_next
from .threads import engine_thread

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- errors


class ServingError(RuntimeError):
    """Base of the engine's own errors (bad requests raise ValueError instead)."""


class QueueFull(ServingError):
    """The request queue is at capacity; retry after `retry_after_s` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineStopped(ServingError):
    """The scheduler is not accepting requests (stopped or shutting down; HTTP 503)."""


class RequestCancelled(ServingError):
    """The request was cancelled before it finished."""


# ---------------------------------------------------------------- configuration


@dataclass
class SchedulerConfig:
    """Limits of one model's scheduler (the service fills them from its settings)."""

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
    """Padded prompt tokens prefilled in one step when requests join (bounds the pause of running rows)."""
    kv_headroom: int = 64
    """Spare KV-cache columns allocated when the batch is rebuilt, so appends rarely reallocate."""
    threads: int | None = None
    """CPU only: torch intra-op threads of the engine thread (None: torch's default; see resa_engine.threads)."""

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) is not None and getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be at least 1, got {getattr(self, f.name)}")


# ---------------------------------------------------------------- incremental text


class IncrementalDetokenizer:
    """Token ids in, text pieces out; a piece is only emitted once its characters are complete.

    Decodes a short window (the last emitted piece's tokens plus the new ones) and emits the
    difference, as vLLM does: multi-byte characters split over tokens wait for their last
    byte, and tokenizers that render a token differently at the start of a text keep their
    spacing because the window starts one piece back.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still pending (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]


class TextAssembler:
    """The completion text of one request: detokenize, cut at the first stop string, hold back
    any tail that may still become a stop string (stops can span token boundaries)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = list(stops)
        self.text = ""
        self.emitted = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """(new text safe to show, stopped)."""
        self.text += self.detok.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text when generation ends for another reason (EOS, length)."""
        self.text += self.detok.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        pending = self.text[self.emitted :]
        # Text already shown never holds part of a stop string (it was held back), so search only the rest.
        hit = find_stop(pending, self.stops) if self.stops else None
        if hit is not None:
            self.text = self.text[: self.emitted + hit]
            return self._emit(len(self.text)), True
        hold = 0 if final else _stop_prefix_len(pending, self.stops)
        return self._emit(len(self.text) - hold), False

    def _emit(self, end: int) -> str:
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


# ---------------------------------------------------------------- request handles


class Delta(NamedTuple):
    """A streamed piece of a completion."""

    text: str
    token_ids: list[int]


class RequestHandle:
    """A submitted request: stream its deltas, wait for its Completion, or cancel it.

    Thread-safe: the engine thread publishes, any thread or asyncio loop consumes. Both
    `stream()` (async) and iteration (blocking) yield `Delta`s and then the final `Completion`,
    or raise the request's error (`RequestCancelled`, an adapter load error, ...).
    """

    def __init__(self, request_id: str, prompt_tokens: int, adapter: str | None, scheduler: "Scheduler"):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.adapter = adapter
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.adapter_info = None
        """The AdapterInfo (rank, cross_model, ...) once the request's adapter is loaded."""
        self._scheduler = scheduler
        self._cond = threading.Condition()
        self._events: list[Delta] = []
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._cancel_requested = False
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []

    # ---- consumer side

    @property
    def done(self) -> bool:
        return self._completion is not None or self._error is not None

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    def cancel(self) -> None:
        """Stop generating (e.g. the HTTP client went away); the slot frees at the next step."""
        if not self.done:
            self._cancel_requested = True
            self._scheduler._on_cancel(self)

    def result(self, timeout: float | None = None) -> Completion:
        """Block until finished; returns the Completion or raises the request's error."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout}s")
        if self._error is not None:
            raise self._error
        return self._completion

    def __iter__(self) -> Iterator[Delta | Completion]:
        seen = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._events) > seen or self.done)
                new, finished = self._events[seen:], self.done
            seen += len(new)
            yield from new
            if finished and seen == len(self._events):
                yield self.result()
                return

    async def stream(self) -> AsyncIterator[Delta | Completion]:
        """`async for item in handle.stream()`: Deltas, then the Completion. Leaving the loop early
        (client disconnect, task cancelled) cancels the request."""
        loop = asyncio.get_running_loop()
        wake: asyncio.Queue = asyncio.Queue()
        with self._cond:
            self._wakers.append((loop, wake))
        seen, finished = 0, False
        try:
            while True:
                with self._cond:
                    new, finished = self._events[seen:], self.done
                seen += len(new)
                for delta in new:
                    yield delta
                if finished and seen >= len(self._events):
                    yield self.result()
                    return
                await wake.get()
        finally:
            with self._cond:
                self._wakers.remove((loop, wake))
            if not finished:
                self.cancel()

    # ---- engine side

    def _publish(self, delta: Delta | None = None, completion: Completion | None = None, error: BaseException | None = None) -> None:
        with self._cond:
            if self.done:
                return
            if delta is not None:
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                self._events.append(delta)
            if completion is not None:
                self._completion = completion
            if error is not None:
                self._error = error
            if self.done:
                self.finished_at = time.monotonic()
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, wake in wakers:
            try:
                loop.call_soon_threadsafe(wake.put_nowait, None)
            except RuntimeError:  # that consumer's loop is closed; nobody is listening there
                pass


# ---------------------------------------------------------------- KV cache


class _BufferLayer(DynamicLayer):
    """One layer's K/V in a preallocated [rows, heads, capacity, head_dim] buffer; appends write in place."""

    def __init__(self, headroom: int = 0):
        super().__init__()
        self.headroom = headroom
        self.buf_k: Tensor | None = None
        self.buf_v: Tensor | None = None
        self.length = 0

    def adopt(self, buf_k: Tensor, buf_v: Tensor, length: int) -> None:
        self.buf_k, self.buf_v, self.length = buf_k, buf_v, length
        self.device, self.is_initialized = buf_k.device, True
        self.keys, self.values = buf_k[:, :, :length], buf_v[:, :, :length]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        n = key_states.shape[-2]
        if self.buf_k is None or self.length + n > self.buf_k.shape[2]:
            capacity = self.length + n + max(self.headroom, self.length // 4)
            buf_k = key_states.new_empty(*key_states.shape[:2], capacity, key_states.shape[-1])
            buf_v = value_states.new_empty(*value_states.shape[:2], capacity, value_states.shape[-1])
            if self.length:
                buf_k[:, :, : self.length] = self.buf_k[:, :, : self.length]
                buf_v[:, :, : self.length] = self.buf_v[:, :, : self.length]
            self.buf_k, self.buf_v = buf_k, buf_v
        self.buf_k[:, :, self.length : self.length + n] = key_states
        self.buf_v[:, :, self.length : self.length + n] = value_states
        self.adopt(self.buf_k, self.buf_v, self.length + n)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


class BatchKV(Cache):
    """The batch's KV cache: every layer right-aligned in a growable buffer (sliding-window layers
    keep all columns too; their window is applied by the attention mask)."""

    def __init__(self, num_layers: int, headroom: int = 0):
        super().__init__(layers=[_BufferLayer(headroom) for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length


class KVPart(NamedTuple):
    """Rows taken from one cache when the batch is rebuilt."""

    kv: BatchKV
    rows: list[int]
    cached: list[int]
    """Tokens each of those rows holds (right-aligned in `kv`)."""


def merge_kv(parts: list[KVPart], headroom: int, order: list[int] | None = None) -> BatchKV:
    """One right-aligned cache holding the given rows of each part (concatenated, then permuted by
    `order`: new row j is old row order[j]), with `headroom` spare columns. Padding is zeroed:
    masked columns must still be finite, as 0 * NaN would poison attention."""
    parts = [p for p in parts if p.rows]
    concat = [c for p in parts for c in p.cached]
    order = order if order is not None else list(range(len(concat)))
    cached = [concat[i] for i in order]
    position = [0] * len(order)
    for new, old in enumerate(order):
        position[old] = new
    width = max(cached)
    device = parts[0].kv.layers[0].buf_k.device
    start = torch.tensor([width - c for c in cached], device=device)
    pad = (torch.arange(width, device=device)[None, :] < start[:, None])[:, None, :, None]
    plans, offset = [], 0
    for part in parts:
        n = len(part.rows)
        dest = position[offset : offset + n]
        offset += n
        whole = part.rows == list(range(n)) and n == part.kv.layers[0].buf_k.shape[0]
        source = None if whole else torch.tensor(part.rows, device=device)
        target = dest[0] if dest == list(range(dest[0], dest[0] + n)) else torch.tensor(dest, device=device)
        plans.append((part, max(part.cached), source, target))
    merged = BatchKV(len(parts[0].kv.layers), headroom)
    for li, layer in enumerate(merged.layers):
        bufs = []
        for which in ("buf_k", "buf_v"):
            ref = getattr(parts[0].kv.layers[li], which)
            buf = ref.new_empty(len(cached), ref.shape[1], width + headroom, ref.shape[3])
            for part, used, source, target in plans:
                src_layer = part.kv.layers[li]
                block = getattr(src_layer, which)[:, :, src_layer.length - used : src_layer.length]
                if source is not None:
                    block = block.index_select(0, source)
                window = buf[:, :, width - used : width]
                if isinstance(target, int):
                    window[target : target + block.shape[0]] = block
                else:
                    window.index_copy_(0, target, block)
            buf[:, :, :width].masked_fill_(pad, 0)
            bufs.append(buf)
        layer.adopt(bufs[0], bufs[1], width)
    return merged


# ---------------------------------------------------------------- scheduler


@dataclass(eq=False)
class _Request:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    ref: AdapterRef | None
    ignore_eos: bool
    submitted: float
    steer: object | None = None
    """SAE edits for this row (`transparency.Steering`: `.layer`, `.apply(x)`), or None."""

    @property
    def budget(self) -> int:
        return len(self.prompt) + self.params.max_tokens


@dataclass(eq=False)
class _Row:
    """A running sequence."""

    req: _Request
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
    finished: bool = False


@dataclass
class SchedulerStats:
    """Live figures for /metrics."""

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


class Scheduler:
    """Continuous batching over one loaded model; `start()`, `submit()`, `stop()`."""

    RATE_WINDOW_S = 10.0

    def __init__(self, model: LoadedModel, adapters: AdapterCache | None = None, config: SchedulerConfig | None = None, **overrides):
        if adapters is not None and adapters.model is not model:
            raise ValueError(f"the adapter cache belongs to model {adapters.model.name}, not {model.name}")
        self.model = model
        self.adapters = adapters
        self.config = replace(config or SchedulerConfig(), **overrides)
        tok, gen_cfg = model.tokenizer, getattr(model.base, "generation_config", None)
        eos = {tok.eos_token_id} | set(_as_list(getattr(gen_cfg, "eos_token_id", None)))
        self.eos_ids = {int(t) for t in eos if t is not None}
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.vocab_size = int(model.base.get_input_embeddings().weight.shape[0])
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self._queue: deque[_Request] = deque()
        self._rows: list[_Row] = []
        self._joining: list[_Row] = []
        self._kv: BatchKV | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = True  # requests may queue before start(); the loop serves them once started
        self._ids = itertools.count(1)
        self._rate: deque[tuple[float, int]] = deque()
        self._counts = dict(completed=0, cancelled=0, failed=0, generated_tokens=0, steps=0)
        self._recent_request_s = 1.0
        self._abort_error: BaseException | None = None
        self._calls: deque[tuple[object, concurrent.futures.Future]] = deque()
        if adapters is not None:
            adapters.add_listener(self._on_adapter_loaded)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "Scheduler":
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("scheduler already started")
            if not self._accepting:
                raise RuntimeError("a stopped scheduler cannot be restarted")
            self._thread = threading.Thread(target=self._loop, name=f"resa-serve-{self.model.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = 60.0) -> None:
        """Stop accepting; with `drain`, finish queued and running requests first (up to `timeout`
        seconds), then cancel whatever is left and end the loop thread."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            self._abort_all(EngineStopped("the scheduler was stopped"))
            return
        if drain:
            thread.join(timeout)
        if thread.is_alive():
            self._abort_all(EngineStopped("the server is shutting down"))
            thread.join()
        if self.adapters is not None:
            self.adapters.remove_listener(self._on_adapter_loaded)

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- submit

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        *,
        steer=None,
        ignore_eos: bool = False,
    ) -> RequestHandle:
        """Queue a request; raises ValueError (bad request), QueueFull (429) or EngineStopped (503).

        `adapter` is an AdapterCache key (None: the base model); `steer` edits this row's residual
        stream at one block (`transparency.Steering`; other rows of the batch are untouched);
        `ignore_eos` keeps generating past EOS (benchmarks)."""
        cfg = self.config
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) > cfg.max_prompt_tokens:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the limit is {cfg.max_prompt_tokens}")
        if params.max_tokens > cfg.max_new_tokens:
            raise ValueError(f"max_tokens {params.max_tokens} exceeds the limit of {cfg.max_new_tokens}")
        if self.context and len(prompt) + params.max_tokens > self.context:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context of {self.context} tokens"
            )
        if len(prompt) + params.max_tokens > cfg.max_tokens_in_flight:
            raise ValueError(
                f"prompt + max_tokens = {len(prompt) + params.max_tokens} tokens exceeds max_tokens_in_flight {cfg.max_tokens_in_flight}"
            )
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        if adapter is not None and self.adapters is None:
            raise ValueError(f"adapter {adapter!r} requested but this model serves no adapters")
        if steer is not None and not 0 <= steer.layer < self.model.num_layers:
            raise ValueError(f"steering layer {steer.layer} is out of range ({self.model.num_layers} layers)")
        with self._cond:
            if not self._accepting:
                raise EngineStopped(f"model {self.model.name} is not accepting requests")
            if len(self._queue) >= cfg.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are queued for {self.model.name}", self._retry_after())
            handle = RequestHandle(f"req-{next(self._ids)}", len(prompt), adapter, self)
            ref = self.adapters.acquire(adapter) if adapter is not None else None
            self._queue.append(_Request(handle, prompt, params, ref, ignore_eos, time.monotonic(), steer))
            self._cond.notify_all()
        return handle

    def call(self, fn) -> concurrent.futures.Future:
        """Run `fn(model)` on the engine thread between decode steps and return its future.

        The model is then on its base weights (adapter routing is per step) with no hooks of the
        running batch, and no step runs concurrently: the way to use the served weights for
        something else (e.g. reading SAE latents) without a second copy. Raises EngineStopped."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if not self._accepting or self._thread is None:
                raise EngineStopped(f"model {self.model.name} is not accepting requests")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future

    def stats(self) -> SchedulerStats:
        with self._cond:
            waiting = sum(1 for r in self._queue if r.ref is not None and not r.ref.ready)
            rows = [r for r in self._rows + self._joining if not r.finished]
            return SchedulerStats(
                queued=len(self._queue),
                running=len(rows),
                waiting_for_adapter=waiting,
                tokens_in_flight=sum(len(r.req.prompt) + r.generated for r in rows),
                tokens_per_s=round(self._tokens_per_s(), 2),
                **self._counts,
            )

    # ---------------------------------------------------------------- callbacks

    def _on_cancel(self, handle: RequestHandle) -> None:
        with self._cond:
            for req in self._queue:
                if req.handle is handle:
                    self._queue.remove(req)
                    self._finish_request(req, error=RequestCancelled(f"request {handle.id} was cancelled"))
                    break
            self._cond.notify_all()

    def _on_adapter_loaded(self, key: str) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---------------------------------------------------------------- loop

    def _loop(self) -> None:
        if self.model.device.type == "cpu":
            engine_thread(self.config.threads)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._rows and not self._admissible() and not self._calls:
                        if not self._accepting and not self._queue:
                            return  # no call can be pending: `call` refuses once not accepting
                        self._cond.wait(0.5)
                    calls, self._calls = list(self._calls), deque()
                for fn, future in calls:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn(self.model))
                        except BaseException as exc:  # noqa: BLE001 - the caller's error, handed back
                            future.set_exception(exc)
                if not self._rows and not self._admissible():
                    continue
                try:
                    self._step()
                except Exception as exc:  # a failed step fails its requests, never the loop
                    log.exception("decode step failed on %s", self.model.name)
                    self._fail_running(exc)

    def _admissible(self) -> bool:
        return any(req.ref is None or req.ref.ready for req in self._queue)

    def _step(self) -> None:
        for row in self._rows:
            if (row.req.handle.cancel_requested or self._abort_error is not None) and not row.finished:
                self._finish_row(row, error=self._abort_error or RequestCancelled(f"request {row.req.handle.id} was cancelled"))
        joiners, joiner_kv = self._admit(), None
        if joiners:
            try:
                joiner_kv = self._prefill(joiners)
            except Exception as exc:  # the joiners fail; the running batch goes on
                log.exception("prefill failed on %s", self.model.name)
                for row in joiners:
                    if not row.finished:
                        self._finish_row(row, error=ServingError(f"generation failed: {exc}"))
                joiners = []
        if joiners or any(row.finished for row in self._rows):
            # The batch changed: rebuild the cache from the rows that go on (finished ones leave here).
            parts = []
            if self._kv is not None:
                keep = [i for i, row in enumerate(self._rows) if not row.finished]
                parts.append(KVPart(self._kv, keep, [self._rows[i].cached for i in keep]))
            if joiner_kv is not None:
                keep = [i for i, row in enumerate(joiners) if not row.finished]
                parts.append(KVPart(joiner_kv, keep, [joiners[i].cached for i in keep]))
            rows = [row for row in self._rows + joiners if not row.finished]
            # Rows sorted by adapter slot let the LoRA term use slices instead of gathers (lora_batch.Routing).
            order = sorted(range(len(rows)), key=lambda i: rows[i].slot)
            self._rows = [rows[i] for i in order]
            self._kv = merge_kv(parts, self.config.kv_headroom, order) if rows else None
        self._joining = []
        if self._rows:
            self._decode()

    def _admit(self) -> list[_Row]:
        """Move ready requests from the queue into the batch, FIFO, within the batch, token and prefill caps."""
        cfg = self.config
        joiners: list[_Row] = []
        with self._cond:
            running = [r for r in self._rows if not r.finished]
            reserved = sum(r.req.budget for r in running)
            longest = 0
            for req in list(self._queue):
                if req.ref is not None and not req.ref.ready:
                    continue  # its adapter is loading; later requests may go first
                if req.ref is not None:
                    try:
                        slot = req.ref.slot
                    except Exception as exc:
                        self._queue.remove(req)
                        self._finish_request(req, error=exc)
                        continue
                    req.handle.adapter_info = req.ref.info
                else:
                    slot = -1
                longest_if = max(longest, len(req.prompt))
                if (
                    len(running) + len(joiners) >= cfg.max_batch
                    or reserved + req.budget > cfg.max_tokens_in_flight
                    or (joiners and longest_if * (len(joiners) + 1) > cfg.max_prefill_tokens)
                ):
                    break
                self._queue.remove(req)
                reserved += req.budget
                longest = longest_if
                device = self.model.device
                text = TextAssembler(self.model.tokenizer, req.params.stop)
                joiners.append(_Row(req, slot, make_generator(req.params.seed, device), text))
            self._joining = sorted(joiners, key=lambda row: row.slot)  # stats() counts them as running until merged
        return self._joining

    def _prefill(self, rows: list[_Row]) -> BatchKV:
        """Run the joiners' prompts (left-padded) into a fresh cache and sample their first tokens."""
        device = self.model.device
        width = max(len(r.req.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        lengths = torch.tensor([len(r.req.prompt) for r in rows])
        for i, row in enumerate(rows):
            ids[i, width - len(row.req.prompt) :] = torch.tensor(row.req.prompt)
        cols = torch.arange(width)[None, :]
        start = (width - lengths)[:, None]
        mask = cols >= start
        positions = (cols - start).clamp(min=0)
        kv = BatchKV(self.model.num_layers)
        logits = self._forward(ids.to(device), mask.to(device), positions.to(device), kv, rows, width)
        for row in rows:
            row.cached = len(row.req.prompt)
        self._sample(rows, logits)
        return kv

    def _decode(self) -> None:
        rows, kv = self._rows, self._kv
        device = self.model.device
        width = kv.length
        cached = torch.tensor([r.cached for r in rows])
        ids = torch.tensor([[r.next_token] for r in rows])
        mask = torch.arange(width + 1)[None, :] >= (width - cached)[:, None]
        logits = self._forward(ids.to(device), mask.to(device), cached[:, None].to(device), kv, rows, 1)
        for row in rows:
            row.cached += 1
        self._sample(rows, logits)

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, kv: BatchKV, rows: list[_Row], seq_len: int) -> Tensor:
        model = self.model.model
        with contextlib.ExitStack() as stack:
            if self.adapters is not None:
                stack.enter_context(self.adapters.bank.route([r.slot for r in rows], seq_len))
            steered = [(i, r.req.steer) for i, r in enumerate(rows) if r.req.steer is not None and r.req.steer.edits]
            if steered:
                stack.enter_context(_steering_hooks(self.model.layers, steered))
            keep = last_logits_only(seq_len, ids.device)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=kv, use_cache=True, logits_to_keep=keep)
        self._counts["steps"] += 1
        return out.logits[:, -1, :]

    def _sample(self, rows: list[_Row], logits: Tensor) -> None:
        greedy = logits.argmax(dim=-1).tolist()
        now = time.monotonic()
        for i, row in enumerate(rows):
            params = row.req.params
            token = greedy[i] if params.temperature == 0 else sample_next(logits[i], params, row.generator)
            row.next_token = token
            row.generated += 1
            self._accept(row, token)
        with self._cond:
            self._rate.append((now, len(rows)))
            self._counts["generated_tokens"] += len(rows)

    def _accept(self, row: _Row, token: int) -> None:
        """Append a sampled token: stream its text, finish on EOS, a stop string or max_tokens."""
        req = row.req
        if token in self.eos_ids and not req.ignore_eos:
            self._finish_row(row, row.text.finish(), "stop")
            return
        row.token_ids.append(token)
        row.unsent.append(token)
        piece, stopped = row.text.push(token)
        if stopped:
            self._finish_row(row, piece, "stop")
        elif row.generated >= req.params.max_tokens:
            self._finish_row(row, piece + row.text.finish(), "length")
        elif piece:
            req.handle._publish(Delta(piece, row.unsent))
            row.unsent = []

    def _finish_row(self, row: _Row, piece: str = "", reason: str = "stop", error: BaseException | None = None) -> None:
        row.finished = True
        if error is not None:
            with self._cond:
                self._finish_request(row.req, error=error)
            return
        if piece or row.unsent:
            row.req.handle._publish(Delta(piece, row.unsent))
            row.unsent = []
        completion = Completion(
            text=row.text.text,
            finish_reason=reason,
            usage=Usage(prompt_tokens=len(row.req.prompt), completion_tokens=row.generated),
            token_ids=list(row.token_ids),
        )
        with self._cond:
            self._finish_request(row.req, completion=completion)

    def _finish_request(self, req: _Request, completion: Completion | None = None, error: BaseException | None = None) -> None:
        """Publish the outcome and give back the adapter ref (call with the lock held)."""
        if req.ref is not None:
            req.ref.release()
        if error is not None:
            self._counts["cancelled" if isinstance(error, RequestCancelled | EngineStopped) else "failed"] += 1
        else:
            self._counts["completed"] += 1
            elapsed = time.monotonic() - req.submitted
            self._recent_request_s = 0.8 * self._recent_request_s + 0.2 * elapsed
        req.handle._publish(completion=completion, error=error)

    def _fail_running(self, exc: Exception) -> None:
        error = ServingError(f"generation failed: {exc}")
        for row in self._rows:
            if not row.finished:
                self._finish_row(row, error=error)
        self._rows, self._kv = [], None

    def _abort_all(self, error: BaseException) -> None:
        """Fail the queue now; running rows (and rows joining this step) fail at the next step."""
        with self._cond:
            self._abort_error = error
            while self._queue:
                self._finish_request(self._queue.popleft(), error=error)
            self._cond.notify_all()

    # ---------------------------------------------------------------- figures

    def _tokens_per_s(self) -> float:
        now = time.monotonic()
        while self._rate and now - self._rate[0][0] > self.RATE_WINDOW_S:
            self._rate.popleft()
        if not self._rate:
            return 0.0
        span = max(now - self._rate[0][0], 1e-3)
        return sum(n for _, n in self._rate) / span

    def _retry_after(self) -> float:
        # Time for the batch to work through the queue at the recent per-request latency.
        waves = math.ceil((len(self._queue) + 1) / self.config.max_batch)
        return round(min(60.0, max(1.0, waves * self._recent_request_s)), 1)


@contextlib.contextmanager
def _steering_hooks(layers, steered: list[tuple[int, object]]):
    """Forward hooks that apply each steered row's SAE edits to its own slice of the block output."""
    by_layer: dict[int, list[tuple[int, object]]] = {}
    for row, steer in steered:
        by_layer.setdefault(steer.layer, []).append((row, steer))

    def make_hook(items):
        def hook(_module, _inputs, output):
            hidden = _hidden(output).clone()
            for row, steer in items:
                hidden[row] = steer.apply(hidden[row])
            return _with_hidden(output, hidden)

        return hook

    handles = [layers[i].register_forward_hook(make_hook(items)) for i, items in by_layer.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]
