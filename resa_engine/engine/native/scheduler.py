"""The native engine: continuous batching over one loaded HF model, each request with its own adapter
and SAE (iteration-level batching, as in Orca / vLLM).

One `Scheduler` per served model runs a decode loop in its own thread. Requests wait in a bounded
queue; between decode steps new ones are prefilled and merged into the running batch and finished
or cancelled ones leave it. Rows of one batch may use different LoRA adapters or none (the
adapter cache's `LoraBank`, lora/gathered.py) and different SAE interventions or none (one forward
hook per layer, applied to the rows that ask for it). The KV cache is right-aligned (kv.py).

A request whose own values fail (an overflow in its SAE edit, a sampling error) fails alone; the
rest of the step goes on.

This file is over 400 lines on purpose: it is the batching loop (admit, prefill, decode, sample, finish)
and its lifecycle, one piece of state read top to bottom; the KV cache (kv.py), the per-request state
(rows.py) and the text (../text.py) live beside it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import replace

import torch
from torch import Tensor

from ...errors import EngineStopped, NumericalError, QueueFull, RequestCancelled, ServingError
from ...lora.cache import AdapterCache
from ...models import LoadedModel, last_logits_only
from ...sae.hooks import per_row_block_hooks
from ...sampling import Completion, SamplingParams, Usage, make_generator, sample_next, token_logprob
from ...threads import engine_thread
from ..handle import RequestHandle
from ..protocol import Delta, EngineConfig, EngineStats, TokenRate, check_request
from ..text import TextAssembler
from .kv import BatchKV, KVPart, merge_kv
from .rows import Request, Row

log = logging.getLogger(__name__)


class Scheduler:
    """Continuous batching over one loaded model: the native `Engine` (engine/protocol.py)."""

    RATE_WINDOW_S = 10.0

    def __init__(
        self, model: LoadedModel, adapters: AdapterCache | None = None, config: EngineConfig | None = None, *, own_adapters: bool = False, **overrides
    ):
        if adapters is not None and adapters.model is not model:
            raise ValueError(f"the adapter cache belongs to model {adapters.model.name}, not {model.name}")
        self.model = model
        self.adapters = adapters
        self._own_adapters = own_adapters
        """Close the adapter cache when the engine stops (it was made for this engine)."""
        self.config = replace(config or EngineConfig(), **overrides)
        self.name, self.tokenizer, self.context = model.name, model.tokenizer, model.context
        self.num_layers, self.hidden_size, self.device = model.num_layers, model.hidden_size, model.device
        self._cache_kwarg = model.cache_kwarg
        tok, gen_cfg = model.tokenizer, getattr(model.base, "generation_config", None)
        eos = {tok.eos_token_id} | set(_as_list(getattr(gen_cfg, "eos_token_id", None)))
        self.eos_ids = {int(t) for t in eos if t is not None}
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.vocab_size = int(model.base.get_input_embeddings().weight.shape[0])
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self._queue: deque[Request] = deque()
        self._rows: list[Row] = []
        self._joining: list[Row] = []
        self._kv: BatchKV | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = True  # requests may queue before start(); the loop serves them once started
        self._ids = itertools.count(1)
        self._rate = TokenRate(self.RATE_WINDOW_S)
        self._counts = dict(completed=0, cancelled=0, failed=0, generated_tokens=0, steps=0)
        self._recent_request_s = 1.0
        self._abort_error: BaseException | None = None
        self._calls: deque[tuple[object, concurrent.futures.Future]] = deque()
        if adapters is not None:
            adapters.add_listener(self._on_adapter_loaded)

    # ---------------------------------------------------------------- lifecycle

    @property
    def shapes(self):
        """The served model's module shapes (adapter checks)."""
        from ...lora.peft_io import ModelShapes

        return ModelShapes.of(self.model)

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
            if self._own_adapters:
                self.adapters.close()

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
        sae=None,
        ignore_eos: bool = False,
    ) -> RequestHandle:
        """Queue a request; raises ValueError (bad request), QueueFull (429) or EngineStopped (503).

        `adapter` is an AdapterCache key (None: the base model); `sae` changes this row's residual
        stream at one block (`sae.splice.SaeSplice`; other rows of the batch are untouched);
        `ignore_eos` keeps generating past EOS (benchmarks)."""
        cfg = self.config
        prompt = check_request(prompt_ids, params, sae, cfg, context=self.context, vocab_size=self.vocab_size, num_layers=self.model.num_layers)
        if adapter is not None and self.adapters is None:
            raise ValueError(f"adapter {adapter!r} requested but this model serves no adapters")
        with self._cond:
            if not self._accepting:
                raise EngineStopped(f"model {self.model.name} is not accepting requests")
            if len(self._queue) >= cfg.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are queued for {self.model.name}", self._retry_after())
            handle = RequestHandle(f"req-{next(self._ids)}", len(prompt), adapter, self._on_cancel)
            ref = self.adapters.acquire(adapter) if adapter is not None else None
            self._queue.append(Request(handle, prompt, params, ref, ignore_eos, time.monotonic(), sae))
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

    def stats(self) -> EngineStats:
        with self._cond:
            waiting = sum(1 for r in self._queue if r.ref is not None and not r.ref.ready)
            rows = [r for r in self._rows + self._joining if not r.finished]
            return EngineStats(
                queued=len(self._queue),
                running=len(rows),
                waiting_for_adapter=waiting,
                tokens_in_flight=sum(len(r.req.prompt) + r.generated for r in rows),
                tokens_per_s=round(self._rate.per_s(), 2),
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
        joined = self._prefill_joiners(self._admit())
        if joined or any(row.finished for row in self._rows):
            # The batch changed: rebuild the cache from the rows that go on (finished ones leave here).
            parts, rows = [], []
            if self._kv is not None:
                keep = [i for i, row in enumerate(self._rows) if not row.finished]
                parts.append(KVPart(self._kv, keep, [self._rows[i].cached for i in keep]))
                rows += [self._rows[i] for i in keep]
            for kv, group in joined:
                keep = [i for i, row in enumerate(group) if not row.finished]
                parts.append(KVPart(kv, keep, [group[i].cached for i in keep]))
                rows += [group[i] for i in keep]
            # Rows sorted by adapter slot let the LoRA term use slices instead of gathers (lora/gathered.Routing).
            order = sorted(range(len(rows)), key=lambda i: rows[i].slot)
            self._rows = [rows[i] for i in order]
            self._kv = merge_kv(parts, self.config.kv_headroom, order) if rows else None
        self._joining = []
        if self._rows:
            self._decode()

    def _admit(self) -> list[Row]:
        """Move ready requests from the queue into the batch, FIFO, within the batch, token and prefill caps."""
        cfg = self.config
        joiners: list[Row] = []
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
                try:
                    generator = make_generator(req.params.seed, self.model.device)
                except (RuntimeError, ValueError, OverflowError) as exc:  # the request's own seed: it alone fails
                    self._finish_request(req, error=NumericalError(f"seed {req.params.seed!r} cannot seed a generator ({exc})"))
                    continue
                reserved += req.budget
                longest = longest_if
                text = TextAssembler(self.model.tokenizer, req.params.stop)
                joiners.append(Row(req, slot, generator, text))
            self._joining = sorted(joiners, key=lambda row: row.slot)  # stats() counts them as running until merged
        return self._joining

    def _prefill_joiners(self, rows: list[Row]) -> list[tuple[BatchKV, list[Row]]]:
        """Prefill the joiners together; if that fails, each alone, so that a row whose own values fail
        (e.g. its SAE edit) fails alone and the others join. Rows that score their prompt (prompt logprobs:
        logits at every position) are prefilled alone. Returns (cache, rows) groups."""
        scoring = [r for r in rows if r.req.params.prompt_logprobs is not None]
        if scoring and len(rows) > 1:
            rest = [r for r in rows if r.req.params.prompt_logprobs is None]
            return [g for group in ([r] for r in scoring) for g in self._prefill_joiners(group)] + self._prefill_joiners(rest)
        if not rows:
            return []
        try:
            return [(self._prefill(rows), rows)]
        except Exception as exc:  # noqa: BLE001 - retried row by row below
            if len(rows) == 1:
                log.warning("prefill failed on %s: %s", self.model.name, exc)
                self._finish_row(rows[0], error=ServingError(f"generation failed: {exc}"))
                return []
            log.warning("prefill of %d rows failed on %s (%s); retrying them one by one", len(rows), self.model.name, exc)
        return [group for row in rows for group in self._prefill_joiners([row])]

    def _prefill(self, rows: list[Row]) -> BatchKV:
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
        scoring = rows[0].req.params.prompt_logprobs if len(rows) == 1 else None  # such rows come alone
        logits = self._forward(ids.to(device), mask.to(device), positions.to(device), kv, rows, width, every_position=scoring is not None)
        for row in rows:
            row.cached = len(row.req.prompt)
        if scoring is not None:
            prompt = rows[0].req.prompt
            logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # position j predicts token j + 1
            rows[0].prompt_logprobs = [None] + [token_logprob(logprobs[j], prompt[j + 1], scoring) for j in range(len(prompt) - 1)]
            logits = logits[:, -1, :]
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

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, kv: BatchKV, rows: list[Row], seq_len: int, every_position: bool = False) -> Tensor:
        """The last position's logits per row ([rows, vocab]); with `every_position`, all of them ([rows, seq, vocab])."""
        model = self.model.model
        with contextlib.ExitStack() as stack:
            if self.adapters is not None:
                stack.enter_context(self.adapters.bank.route([r.slot for r in rows], seq_len))
            spliced = [(i, r.req.sae) for i, r in enumerate(rows) if r.req.sae is not None and not r.req.sae.is_identity]
            if spliced:
                stack.enter_context(per_row_block_hooks(self.model.layers, [(row, sae.layer, sae.apply) for row, sae in spliced]))
            keep = 0 if every_position else last_logits_only(seq_len, ids.device)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=keep, **{self._cache_kwarg: kv})
        self._counts["steps"] += 1
        return out.logits if every_position else out.logits[:, -1, :]

    def _sample(self, rows: list[Row], logits: Tensor) -> None:
        greedy = logits.argmax(dim=-1).tolist()
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        for i, row in enumerate(rows):
            params = row.req.params
            if params.max_tokens == 0:  # it only scores its prompt
                self._finish_row(row, "", "length")
                continue
            if not finite[i]:  # this row's own values (an SAE edit, say) overflowed: it fails, the others go on
                self._finish_row(row, error=NumericalError(
                    f"request {row.req.handle.id}: the forward pass overflowed (non-finite logits); use smaller SAE edit values"))
                continue
            try:
                token = greedy[i] if params.greedy else sample_next(logits[i], params, row.generator)
            except (RuntimeError, ValueError) as exc:
                self._finish_row(row, error=NumericalError(f"request {row.req.handle.id}: sampling failed ({exc})"))
                continue
            row.next_token = token
            row.generated += 1
            if params.logprobs is not None:
                row.logprobs.append(token_logprob(torch.log_softmax(logits[i].float(), dim=-1), token, params.logprobs))
            self._accept(row, token)
        with self._cond:
            self._rate.add(len(rows))
            self._counts["generated_tokens"] += len(rows)

    def _accept(self, row: Row, token: int) -> None:
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
            self._send(row, piece)

    def _send(self, row: Row, piece: str) -> None:
        """Stream the tokens not yet sent (with their logprobs) and the text they complete."""
        sent = len(row.token_ids) - len(row.unsent)
        logprobs = row.logprobs[sent : len(row.token_ids)] if row.req.params.logprobs is not None else None
        row.req.handle._publish(Delta(piece, row.unsent, logprobs))
        row.unsent = []

    def _finish_row(self, row: Row, piece: str = "", reason: str = "stop", error: BaseException | None = None) -> None:
        row.finished = True
        if error is not None:
            with self._cond:
                self._finish_request(row.req, error=error)
            return
        if piece or row.unsent:
            self._send(row, piece)
        params = row.req.params
        completion = Completion(
            text=row.text.text,
            finish_reason=reason,
            usage=Usage(prompt_tokens=len(row.req.prompt), completion_tokens=row.generated),
            token_ids=list(row.token_ids),
            logprobs=list(row.logprobs[: len(row.token_ids)]) if params.logprobs is not None else None,
            prompt_logprobs=row.prompt_logprobs,
            prompt_token_ids=list(row.req.prompt),
        )
        with self._cond:
            self._finish_request(row.req, completion=completion)

    def _finish_request(self, req: Request, completion: Completion | None = None, error: BaseException | None = None) -> None:
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

    def _retry_after(self) -> float:
        # Time for the batch to work through the queue at the recent per-request latency.
        waves = math.ceil((len(self._queue) + 1) / self.config.max_batch)
        return round(min(60.0, max(1.0, waves * self._recent_request_s)), 1)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]
