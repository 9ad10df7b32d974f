"""Where a batch-1 layer call's time goes on two threads: the kernel's halves, and the hand-off.

For one bitmask layer (default 4096x4096, 75%) this times, by the wall clock, rotating over
enough copies of the layer to exceed the last-level cache:

* the batch-1 kernel over all rows on the calling thread;
* the same over the first of the two balanced row ranges (what each thread has to do);
* both ranges through sparsec's thread pool (``run_ranges``, what a layer call does);
* ``run_ranges`` with two empty ranges: the cost of handing work to the second thread and
  waiting for it, with no work;
* one empty range on the calling thread: Numba's dispatch of the kernel call;
* a bare round trip between two Python threads over a pair of locks: the floor of any hand-off
  that wakes a sleeping thread and waits for it.

    python benchmarks/cpu_thread_scaling.py --values int8,bf16

Run it on an idle machine: it measures wall time.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
from cpu_shape_constants import batch1_args, masked_weight, rotating_copies

from sparsec.codegen.cpu import bitmask as bmk
from sparsec.codegen.cpu.threads import run_ranges


def lock_round_trip() -> Callable[[object], None]:
    """A call that wakes a waiting thread and waits until it answers (two locks, no work)."""
    go, done = threading.Lock(), threading.Lock()
    go.acquire()
    done.acquire()

    def echo() -> None:
        while True:
            go.acquire()
            done.release()

    threading.Thread(target=echo, daemon=True).start()

    def call(_args: object) -> None:
        go.release()
        done.acquire()

    return call


def time_value_type(vt: str, w, x: np.ndarray, rows: int, rounds: int) -> None:
    """Print the six timings for value type ``vt``."""
    impls = rotating_copies(w, vt)
    parts = impls[0].parts
    if len(parts) != 3:
        raise SystemExit(f"this probe is for a two-thread split; the layer has {len(parts) - 1} ranges "
                         f"(set SPARSEC_NUM_THREADS=2)")
    sets = [batch1_args(i, vt, x)[0] for i in impls]
    fn = bmk.kernel_function(vt, "rows", 1)
    half = int(parts[1])
    cases = {
        "one thread, all rows": lambda a: fn(0, rows, 0, *a),
        f"one thread, rows 0:{half}": lambda a: fn(0, half, 0, *a),
        "two threads (run_ranges)": lambda a: run_ranges(fn, parts, a),
        "two threads, empty ranges": lambda a: run_ranges(fn, np.array([0, 0, 0]), a),
        "one thread, empty range": lambda a: fn(0, 0, 0, *a),
        "lock round trip, no kernel": lock_round_trip(),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    calls = 4 * len(sets)
    for _ in range(rounds):
        for name, call in cases.items():
            t0 = time.perf_counter()
            for i in range(calls):
                call(sets[i % len(sets)])
            times[name].append((time.perf_counter() - t0) / calls)
    for name, ts in times.items():
        print(f"{vt:5} {name:28} {statistics.median(ts) * 1e6:8.1f} us")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--values", default="int8,bf16")
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    rows, cols = (int(v) for v in args.shape.split("x"))
    w = masked_weight(rows, cols, args.sparsity)
    x = np.random.default_rng(0).standard_normal((1, cols)).astype(np.float32)
    print(f"# {args.shape}, {args.sparsity:.0%} sparse, batch 1, wall clock, median of {args.rounds} rounds")
    for vt in args.values.split(","):
        time_value_type(vt, w, x, rows, args.rounds)


if __name__ == "__main__":
    main()
