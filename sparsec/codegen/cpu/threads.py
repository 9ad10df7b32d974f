"""sparsec's own threading for CPU kernels: row ranges on a small persistent thread pool.

Kernels are ``nogil`` Numba functions of one row range, ``fn(r0, r1, t, *args)``; this module
calls them for every range of a split, the first range on the calling thread. Owning the
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

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


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


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                max_workers=max(1, cpu_threads() - 1), thread_name_prefix="sparsec-cpu"
            )
            atexit.register(_POOL.shutdown, wait=False)
        return _POOL


def run_ranges(fn, bounds: np.ndarray, args: tuple) -> None:
    """Call ``fn(bounds[t], bounds[t+1], t, *args)`` for every ``t``, in parallel, and wait.

    Range 0 runs on the calling thread; an exception in any range is re-raised here.
    """
    n = len(bounds) - 1
    if n == 1:
        fn(int(bounds[0]), int(bounds[1]), 0, *args)
        return
    pool = _pool()
    futures = [pool.submit(fn, int(bounds[t]), int(bounds[t + 1]), t, *args) for t in range(1, n)]
    try:
        fn(int(bounds[0]), int(bounds[1]), 0, *args)
    finally:
        for f in futures:
            f.result()
