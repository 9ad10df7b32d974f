"""sparsec's own threading for CPU kernels: row ranges on a small persistent thread pool.

Kernels are ``nogil`` Numba functions of one row range, ``fn(r0, r1, t, *args)``; this module
calls them for every range of a split, the first range on the calling thread
(:func:`run_ranges`), or runs one function on several threads at once (:func:`run_concurrently`,
for the fused decode step, whose threads meet at barriers). Owning the
threading (rather than Numba's ``parallel=True``) keeps each kernel a plain function with no
runtime of its own (what ahead-of-time artifacts need), saves the parallel compiler's seconds per
kernel, and lets a small layer run on one thread without paying for a wake-up.
"""

from __future__ import annotations

import atexit
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def cpu_threads() -> int:
    """Threads the kernels use: ``SPARSEC_NUM_THREADS`` if set, else the cores this process may use."""
    env = os.environ.get("SPARSEC_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"SPARSEC_NUM_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"SPARSEC_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _pool(workers: int) -> ThreadPoolExecutor:
    """The persistent pool of ``workers`` threads (one pool per size, made on first use)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sparsec-cpu")
            atexit.register(pool.shutdown, wait=False)
        return pool


def run_concurrently(fn, n: int, args: tuple) -> None:
    """Call ``fn(t, *args)`` for ``t = 0 .. n-1``, each on a thread of its own and all at once
    (``t = 0`` on the calling thread), and wait; an exception in any is re-raised here. "All at
    once" is what callers that wait for each other inside ``fn`` (at a barrier) rely on: every
    ``t`` gets a pool thread, never a queue slot behind another ``t``."""
    if n == 1:
        fn(0, *args)
        return
    pool = _pool(n - 1)
    futures = [pool.submit(fn, t, *args) for t in range(1, n)]
    try:
        fn(0, *args)
    finally:
        for f in futures:
            f.result()


def run_ranges(fn, bounds: np.ndarray, args: tuple) -> None:
    """Call ``fn(bounds[t], bounds[t+1], t, *args)`` for every ``t``, in parallel, and wait.

    Range 0 runs on the calling thread; an exception in any range is re-raised here.
    """
    n = len(bounds) - 1
    if n == 1:
        fn(int(bounds[0]), int(bounds[1]), 0, *args)
        return
    run_concurrently(lambda t, *a: fn(int(bounds[t]), int(bounds[t + 1]), t, *a), n, args)
