"""CPU thread policy of a serving process: the decode engines own torch's intra-op threads.

With GNU OpenMP (torch's CPU builds) every thread that runs a parallel region keeps its own team
of worker threads. Once the process holds more of them than there are cores, every team stops
spin-waiting between regions, and a decode step, made of many small regions, pays a worker
wake-up for each: on 2 cores that cost ~10% of decode throughput, ~15% with adapters routed.
So each engine thread sets its own count, and threads that run torch work beside the engines
(adapter, model and SAE loads) use one.
"""

from __future__ import annotations

import torch

DEFAULT_CPU_THREADS = torch.get_num_threads()
"""Torch's intra-op thread count when resa_engine.threads was imported (its default, or OMP_NUM_THREADS)."""


def helper_thread() -> None:
    """Initializer of a thread that runs torch work beside the engines: one intra-op thread."""
    _set_for_this_thread(1)


def engine_thread(threads: int | None) -> None:
    """Called by an engine thread before its first forward: `threads` intra-op threads (None: the default)."""
    _set_for_this_thread(threads or DEFAULT_CPU_THREADS)


def _set_for_this_thread(threads: int) -> None:
    # torch.set_num_threads sets the calling thread's OpenMP count (and a process-wide default that
    # threads read on their first parallel op). Trigger that first read now, so it can never
    # overwrite the count set here with whatever another thread set meanwhile.
    torch.get_num_threads()
    torch.set_num_threads(threads)
