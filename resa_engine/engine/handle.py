"""A submitted request as its caller sees it, whichever engine runs it: stream its deltas, wait for its
Completion, or cancel it. Thread-safe: the engine thread publishes, any thread or asyncio loop consumes."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import AsyncIterator, Callable, Iterator

from ..sampling import Completion
from .protocol import Delta


class RequestHandle:
    """A submitted request: stream its deltas, wait for its Completion, or cancel it.

    Thread-safe: the engine thread publishes, any thread or asyncio loop consumes. Both
    `stream()` (async) and iteration (blocking) yield `Delta`s and then the final `Completion`,
    or raise the request's error (`RequestCancelled`, an adapter load error, ...).
    """

    def __init__(self, request_id: str, prompt_tokens: int, adapter: str | None, on_cancel: Callable[["RequestHandle"], None]):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.adapter = adapter
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.adapter_info = None
        """The AdapterInfo (rank, cross_model, ...) once the request's adapter is loaded."""
        self._on_cancel = on_cancel
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
            self._on_cancel(self)

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
