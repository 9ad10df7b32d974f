"""Check select-format's CPU cost model against the CPU kernels: estimated vs measured time.

For each (shape, sparsity, value type, batch) it packs a random pruned layer in every candidate
format, times the CPU kernel (rotating over layer copies larger than twice the last-level cache,
as ``benchmarks/cpu_kernels.py`` does), and prints the model's estimate next to the measurement,
plus whether the format the model picks is the one that measured fastest. The model's bandwidth
is set to the streaming-read bandwidth measured in the same run; every other constant is the
default of ``sparsec.passes.select_format.default_models``.

    python benchmarks/select_format_check.py --quick              # 4096x4096, 50/75/90%, bf16/int8, batch 1
    python benchmarks/select_format_check.py --clock cpu --stat min  # on a machine shared with other jobs
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

# Idle OpenMP threads must sleep, not spin, or the CPU-time clock charges their spinning to torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparsec import tune  # noqa: E402
from sparsec.codegen.cpu import build_linear_kernel  # noqa: E402
from sparsec.codegen.cpu.host import last_level_cache_bytes  # noqa: E402
from sparsec.codegen.cpu.threads import cpu_threads  # noqa: E402
from sparsec.formats import pack  # noqa: E402
from sparsec.passes.select_format import (  # noqa: E402
    NM_PATTERNS,
    WeightStats,
    default_models,
    estimate_seconds,
    format_nbytes,
)

CLOCK, STAT = "wall", statistics.median


def seconds_per_call(calls: list, min_seconds: float = 0.3, min_rounds: int = 3) -> float:
    """Rounds over ``calls``; wall time per call, or (``--clock cpu``) CPU time / threads per call."""
    return tune.seconds_per_call(calls, CLOCK, cpu_threads(), min_seconds, min_rounds, max_rounds=200, stat=STAT)


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of a multithreaded torch sum over ``nbytes`` (memory, not cache)."""
    a = torch.ones(nbytes // 4)
    return nbytes / seconds_per_call([lambda: a.sum()], min_rounds=5)




def candidates(w: torch.Tensor) -> list[tuple[str, str, dict]]:
    out = [("dense", "dense", {}), ("bitmask", "bitmask", {}), ("csr", "csr", {})]
    stats = WeightStats.of(w, NM_PATTERNS, ())
    fits = [p for p, ok in stats.nm.items() if ok]
    if fits:
        n, m = min(fits, key=lambda p: (p[0] / p[1], p[1]))
        out.append((f"nm {n}:{m}", "nm", {"n": n, "m": m}))
    return out


def prune(w: torch.Tensor, sparsity: float, nm: bool) -> torch.Tensor:
    rows, cols = w.shape
    if nm:  # 2:4 at 50%, 1:4 at 75%: the N:M patterns those sparsities have
        n = {0.5: 2, 0.75: 1}[sparsity]
        idx = w.abs().view(rows, cols // 4, 4).topk(n, dim=2).indices
        keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(2, idx, True)
        return w * keep.view(rows, cols)
    keep = max(1, round(cols * (1 - sparsity)))
    idx = w.abs().topk(keep, dim=1).indices
    return w * torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--stat", choices=["median", "min"], default="median")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,11008x4096")
    ap.add_argument("--sparsities", default=None, help="e.g. 0.5,0.75")
    ap.add_argument("--values", default=None, help="e.g. bf16,int8")
    ap.add_argument("--batches", default=None, help="e.g. 1,16")
    args = ap.parse_args()
    global CLOCK, STAT
    CLOCK = args.clock
    STAT = min if args.stat == "min" else statistics.median
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]
    sparsities = [0.5, 0.75, 0.9]
    values = ["bf16", "int8"] if args.quick else ["fp32", "bf16", "int8", "int4"]
    batches = [1] if args.quick else [1, 16]
    if args.shapes:
        shapes = [tuple(int(v) for v in t.split("x")) for t in args.shapes.split(",")]
    if args.sparsities:
        sparsities = [float(v) for v in args.sparsities.split(",")]
    if args.values:
        values = args.values.split(",")
    if args.batches:
        batches = [int(v) for v in args.batches.split(",")]
    torch.set_num_threads(cpu_threads())
    llc = last_level_cache_bytes()
    bw = read_bandwidth()
    model = dataclasses.replace(default_models(cpu_threads())["cpu"], bandwidth=bw)
    print(f"# threads {cpu_threads()}, read bandwidth {bw / 1e9:.1f} GB/s, load average {os.getloadavg()[0]:.1f}")
    print(f"# clock {args.clock}, statistic {args.stat}")
    print(f"{'shape':>11} {'sp%':>4} {'values':>6} {'B':>3} {'format':>8} {'est_us':>8} {'meas_us':>8} {'meas/est':>8}")
    gen = torch.Generator().manual_seed(0)
    agree = total = 0
    for rows, cols in shapes:
        base = torch.randn(rows, cols, generator=gen)
        for s in sparsities:
            for structured in (False, True):
                if structured and s not in (0.5, 0.75):
                    continue
                w = prune(base, s, structured)
                stats = WeightStats.of(w, NM_PATTERNS, ())
                for vt in values:
                    opts = {"group_size": 128} if vt == "int4" else {}
                    for batch in batches:
                        x = torch.randn(batch, cols, generator=gen)
                        est, meas = {}, {}
                        for label, fmt, options in candidates(w):
                            if structured and fmt != "nm" and fmt != "dense":
                                continue
                            packed = pack(w, fmt, vt, **options, **opts)
                            copies = [packed] + [
                                packed.clone() for _ in range(max(2, -(-2 * llc // packed.nbytes()) + 1) - 1)
                            ]
                            kernels = [build_linear_kernel(p) for p in copies]
                            meas[label] = seconds_per_call([lambda k=k, x=x: k(x) for k in kernels])
                            nbytes = format_nbytes(fmt, vt, stats, 128, **options)
                            est[label] = estimate_seconds(fmt, vt, stats, batch, model, nbytes, **options)
                            print(
                                f"{rows:>5}x{cols:<5} {round(s * 100):>4} {vt:>6} {batch:>3} {label:>8} "
                                f"{est[label] * 1e6:8.1f} {meas[label] * 1e6:8.1f} {meas[label] / est[label]:8.2f}",
                                flush=True,
                            )
                        pick, best = min(est, key=est.get), min(meas, key=meas.get)
                        agree += pick == best
                        total += 1
                        print(f"{'':>34} model picks {pick}, fastest measured {best}")
    print(f"# the model picked the fastest format in {agree} of {total} cases")


if __name__ == "__main__":
    main()
