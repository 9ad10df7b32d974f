"""What one meeting at the fused decode step's barrier costs (sparsec/codegen/cpu/sync.py).

Two or more threads run one compiled loop at once (:func:`sparsec.codegen.cpu.threads.run_concurrently`,
as the decode step does); each round every thread writes its slot, meets the others, reads every
slot, and meets them again. The result of every round is checked, so a barrier that let a thread
through early would fail here, not just look fast. Prints microseconds per meeting by the wall
clock and the process's CPU time over the same span: on a machine whose cores are busy elsewhere
the threads take turns on one core and the two come out equal.

    python benchmarks/barrier.py                  # 2 threads, 20,000 rounds
    python benchmarks/barrier.py --threads 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from numba import njit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparsec.codegen.cpu.sync import LINE, barrier  # noqa: E402
from sparsec.codegen.cpu.threads import run_concurrently  # noqa: E402


@njit(nogil=True)
def rounds_of_meetings(t, threads, arrive, slots, rounds, out):
    for r in range(rounds):
        slots[t] = r * 10 + t
        barrier(arrive, t, threads, 2 * r + 1)
        total = 0
        for j in range(threads):
            total += slots[j]
        out[t, r] = total
        barrier(arrive, t, threads, 2 * r + 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20000)
    args = p.parse_args()
    n, rounds = args.threads, args.rounds
    arrive = np.zeros(n * LINE, dtype=np.int64)
    slots = np.zeros(n, dtype=np.int64)
    out = np.zeros((n, rounds), dtype=np.int64)
    rounds_of_meetings(0, 1, arrive, slots, 1, out)  # compile
    arrive[:] = 0
    t0, c0 = time.perf_counter(), time.process_time()
    run_concurrently(rounds_of_meetings, n, (n, arrive, slots, rounds, out))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    expected = np.array([r * 10 * n + n * (n - 1) // 2 for r in range(rounds)])
    if not (out == expected).all():
        raise SystemExit("a thread read a slot before every thread had written it: the barrier is broken")
    meetings = 2 * rounds
    print(f"{n} threads, {meetings} meetings, load average {os.getloadavg()[0]:.1f}: "
          f"{1e6 * wall / meetings:.2f} us a meeting (wall), {1e6 * cpu / meetings:.2f} us of CPU (all threads)")


if __name__ == "__main__":
    main()
