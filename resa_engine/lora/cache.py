"""The adapters resident on one served model: load on first use, keep an LRU, never evict one in use.

`acquire(key)` returns at once with an `AdapterRef`; the adapter loads on a loader thread
(`loader(key) -> folder`, e.g. the store's checksum-verified fetch), is checked against the
model, and is written into a slot of the model's `LoraBank`. A ref is held by every queued
or running request, and a pinned adapter holds one forever, so neither is ever evicted.

When every slot holds an adapter in use, a new adapter waits (FIFO) until a slot frees up;
its requests stay queued and the rest of the batch keeps flowing. Only when the slots can
never free up (all of them pinned) does `acquire` fail at once with `AdapterCacheFull`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import AdapterCacheFull
from ..models import LoadedModel
from ..threads import helper_thread
from .bank import LoraBank
from .peft_io import PeftAdapter

log = logging.getLogger(__name__)


@dataclass
class AdapterInfo:
    """What the service may tell a client about a loaded adapter."""

    key: str
    folder: str
    rank: int
    modules: int
    """Number of Linear modules the adapter changes."""
    cross_model: bool
    """True when built on another model of the same shapes (paper §4.3 modularity)."""
    load_s: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class AdapterCacheStats:
    capacity: int
    resident: list[str]
    """Loaded adapters, least recently used first."""
    loading: list[str]
    waiting: list[str]
    """Adapters waiting for a free slot."""
    pinned: list[str]
    in_use: dict[str, int]
    """Key -> refs held by queued/running requests (pins included)."""
    loads: int
    evictions: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(eq=False)
class _Entry:
    key: str
    state: str = "waiting"  # waiting -> loading -> ready | failed
    slot: int = -1
    refs: int = 0
    pinned: bool = False
    last_used: int = 0
    info: AdapterInfo | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class AdapterRef:
    """One holder's claim on an adapter; `release()` exactly once when done (extra calls are ignored)."""

    def __init__(self, cache: "AdapterCache", entry: _Entry):
        self._cache, self._entry, self._released = cache, entry, False

    @property
    def key(self) -> str:
        return self._entry.key

    @property
    def ready(self) -> bool:
        """True once the adapter is loaded or its load failed (`slot` then returns or raises)."""
        return self._entry.state in ("ready", "failed")

    @property
    def slot(self) -> int:
        """The bank slot serving this adapter; raises the load error if loading failed."""
        entry = self._entry
        if entry.state == "failed":
            raise entry.error
        if entry.state != "ready":
            raise RuntimeError(f"adapter {entry.key!r} is not loaded yet")
        return entry.slot

    @property
    def info(self) -> AdapterInfo | None:
        return self._entry.info

    def wait(self, timeout: float | None = None) -> int:
        """Block until loaded; returns the slot (or raises the load error, or TimeoutError)."""
        if not self._entry.done.wait(timeout):
            raise TimeoutError(f"adapter {self.key!r} did not load within {timeout}s")
        return self.slot

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cache._release(self._entry)


class AdapterCache:
    """LRU of PEFT LoRA adapters loaded into one model's `LoraBank`, with pins and refcounts."""

    def __init__(
        self,
        model: LoadedModel,
        loader: Callable[[str], Path | str],
        *,
        capacity: int = 16,
        load_workers: int = 1,
    ):
        self.model = model
        self.loader = loader
        self.bank = LoraBank(model, capacity)
        self.capacity = capacity
        self._entries: dict[str, _Entry] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._waiting: deque[_Entry] = deque()
        self._tick = itertools.count(1)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []
        self._pool = ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix=f"adapter-load-{model.name}", initializer=helper_thread)
        self._loads = self._evictions = 0
        self._closed = False

    # ---------------------------------------------------------------- public

    def acquire(self, key: str) -> AdapterRef:
        """Claim `key` (loading it if absent); never blocks. Raises AdapterCacheFull if it can never load."""
        with self._lock:
            if self._closed:
                raise RuntimeError("adapter cache is closed")
            entry = self._entries.get(key)
            if entry is None:
                if sum(e.pinned for e in self._entries.values()) >= self.capacity:
                    raise AdapterCacheFull(
                        f"cannot load adapter {key!r}: all {self.capacity} adapter slots hold pinned adapters"
                    )
                entry = self._entries[key] = _Entry(key)
                self._waiting.append(entry)
            entry.refs += 1
            entry.last_used = next(self._tick)
            self._fill_slots()
            return AdapterRef(self, entry)

    def pin(self, key: str, *, wait: float | None = None) -> AdapterInfo | None:
        """Load `key` and keep it resident until `unpin`; with `wait`, block until loaded (raising its error)."""
        ref = self.acquire(key)
        with self._lock:
            entry = ref._entry
            ref._released = True  # the pin keeps this ref; `unpin` gives it back
            if entry.pinned:
                self._release_locked(entry)
            entry.pinned = True
        if wait is not None:
            ref.wait(wait)
        return entry.info

    def unpin(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.pinned:
                return
            entry.pinned = False
            self._release_locked(entry)

    def resident(self) -> list[str]:
        """Loaded adapter keys, least recently used first."""
        with self._lock:
            ready = [e for e in self._entries.values() if e.state == "ready"]
            return [e.key for e in sorted(ready, key=lambda e: e.last_used)]

    def stats(self) -> AdapterCacheStats:
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.last_used)
            return AdapterCacheStats(
                capacity=self.capacity,
                resident=[e.key for e in entries if e.state == "ready"],
                loading=[e.key for e in entries if e.state == "loading"],
                waiting=[e.key for e in self._waiting],
                pinned=[e.key for e in entries if e.pinned],
                in_use={e.key: e.refs for e in entries if e.refs},
                loads=self._loads,
                evictions=self._evictions,
            )

    def add_listener(self, callback: Callable[[str], None]) -> None:
        """`callback(key)` runs on the loader thread whenever a load finishes (ready or failed)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[str], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.bank.close()

    # ---------------------------------------------------------------- slots

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            self._release_locked(entry)

    def _release_locked(self, entry: _Entry) -> None:
        entry.refs -= 1
        if entry.refs == 0 and entry.state == "waiting":
            # Nobody wants it any more (its requests were cancelled): stop waiting for a slot.
            self._waiting.remove(entry)
            self._entries.pop(entry.key, None)
        self._fill_slots()

    def _fill_slots(self) -> None:
        """Give free (or evictable) slots to waiting adapters, oldest first, and start their loads."""
        while self._waiting and not self._closed:
            slot = self._free.pop() if self._free else self._evict_one()
            if slot is None:
                return
            entry = self._waiting.popleft()
            entry.state, entry.slot = "loading", slot
            self._pool.submit(self._load, entry)

    def _evict_one(self) -> int | None:
        # Least recently used among loaded, unpinned adapters that no request holds.
        idle = [e for e in self._entries.values() if e.state == "ready" and e.refs == 0 and not e.pinned]
        if not idle:
            return None
        victim = min(idle, key=lambda e: e.last_used)
        del self._entries[victim.key]
        self._evictions += 1
        log.info("adapter cache %s: evicted %s from slot %d", self.model.name, victim.key, victim.slot)
        return victim.slot

    def _load(self, entry: _Entry) -> None:
        start = time.perf_counter()
        try:
            folder = Path(self.loader(entry.key))
            adapter = PeftAdapter.read(folder)
            cross_model = adapter.check(self.model, serving=True)
            weights = adapter.load_weights(self.model)
            self.bank.install(entry.slot, weights)
            info = AdapterInfo(
                key=entry.key,
                folder=str(folder),
                rank=weights.rank,
                modules=len(weights.modules),
                cross_model=cross_model,
                load_s=round(time.perf_counter() - start, 3),
            )
        except BaseException as exc:  # any failure is the requests' answer, never the loader thread's death
            with self._lock:
                entry.state, entry.error = "failed", exc
                if self._entries.get(entry.key) is entry:
                    del self._entries[entry.key]
                self._free.append(entry.slot)
                self._fill_slots()
            log.warning("adapter cache %s: loading %s failed: %s", self.model.name, entry.key, exc)
        else:
            with self._lock:
                entry.state, entry.info = "ready", info
                self._loads += 1
                self._fill_slots()  # a ref may have been released while this loaded
        entry.done.set()
        for callback in list(self._listeners):
            callback(entry.key)
