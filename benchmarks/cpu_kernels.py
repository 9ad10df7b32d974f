"""Benchmark the CPU bitmask kernels against torch dense and torch CSR, and against the memory floor.

One run prints, per (shape, sparsity, value type, batch): the kernel's time per layer, its
effective bandwidth (compressed bytes of the layer / time), that bandwidth as a fraction of the
machine's read bandwidth measured in the same run by a streaming kernel, and the speedup over
torch dense fp32 ``F.linear`` (rows for torch dense bf16 and torch CSR fp32 are printed too).

Every timing rotates over enough copies of the layer that the copies' bytes exceed twice the
last-level cache (read from /sys), so weights come from memory, as in a real model's decode.

    python benchmarks/cpu_kernels.py            # the full table (several minutes)
    python benchmarks/cpu_kernels.py --quick    # 4096x4096, 0/50/75%, bf16/int8, batch 1/16

Optional DeepSparse column: given a Python with DeepSparse installed (``--deepsparse-python`` or
``$SPARSEC_DEEPSPARSE_PYTHON``; set up as in ``benchmarks/deepsparse_worker.py``), the same masked
weight is timed by DeepSparse (fp32, its value type) in a subprocess for the sparsities of
``--deepsparse-sparsities``, printed as ``deepsparse<n>c`` rows (``<n>`` cores) and, with
``--clock cpu``, ``deepsparse1c/<n>`` rows (its 1-core time divided by ``n``: perfect scaling,
free of the spin-waiting that the CPU clock charges to its threads on a shared machine), and
every row of that shape, sparsity and batch gets ``x_ds``: the faster DeepSparse time over the
row's time. Without DeepSparse the column is ``-`` and the header says it was skipped.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# Idle torch (OpenMP) threads must sleep, not spin, or the CPU-time clock below charges their
# spinning to torch's baseline. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from numba import njit  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparsec.codegen.cpu import build_linear_kernel  # noqa: E402
from sparsec.codegen.cpu.host import host_features, last_level_cache_bytes  # noqa: E402
from sparsec.codegen.cpu.threads import cpu_threads, run_ranges  # noqa: E402
from sparsec.formats import pack  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
SPARSITIES = [0.0, 0.5, 0.7, 0.75, 0.8, 0.9]
VALUES = ["fp32", "bf16", "int8", "int4"]
BATCHES = [1, 4, 16, 64]




@njit(nogil=True, fastmath=True)
def _stream_sum(r0, r1, t, a, out):
    seg = a[r0:r1]  # indices from 0 up: no negative-index checks, so the loop vectorizes
    s = np.float32(0.0)
    for i in range(seg.shape[0]):
        s += seg[i]
    out[t] = s


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB/s of a multithreaded streaming read (sum) over ``nbytes``: the best of ``repeats``
    (wall clock), or with ``--clock cpu`` the median of CPU time / threads."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    n = cpu_threads()
    bounds = np.linspace(0, a.shape[0], n + 1).astype(np.int64)
    out = np.zeros(n, dtype=np.float32)
    run_ranges(_stream_sum, bounds, (a, out))
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        run_ranges(_stream_sum, bounds, (a, out))
        walls.append(time.perf_counter() - t0)
        cpus.append((_cpu_seconds() - c0) / n)
    best = statistics.median(cpus) if CLOCK == "cpu" else min(walls)
    return nbytes / best / 1e9


STAT = statistics.median
CLOCK = "wall"


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def time_rotating(calls: list, min_seconds: float = 0.3, min_rounds: int = 3) -> float:
    """Seconds per call over rounds through ``calls`` (zero-argument functions).

    ``--clock wall`` (default): wall time, the median round (or the best with ``--stat min``).
    ``--clock cpu``: this process's CPU time per call divided by the threads in use, the median
    round: on a machine shared with other jobs it counts only the cycles this process ran (stalls
    on memory included), which is what the wall clock of an idle machine would show when the
    threads are busy all the time.
    """
    for c in calls:
        c()
    per_call = []
    start = time.perf_counter()
    threads = cpu_threads()
    while len(per_call) < min_rounds or time.perf_counter() - start < min_seconds:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        for c in calls:
            c()
        if CLOCK == "cpu":
            per_call.append((_cpu_seconds() - c0) / threads / len(calls))
        else:
            per_call.append((time.perf_counter() - t0) / len(calls))
        if len(per_call) >= 200:
            break
    return STAT(per_call)


def release_memory() -> None:
    """Hand freed memory back to the OS between configurations: the machine is shared, and
    glibc keeps freed arenas of large tensors otherwise (several GB over a full run)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def copies_needed(layer_bytes: int, llc: int) -> int:
    return max(2, -(-2 * llc // max(layer_bytes, 1)) + 1)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small subset (about a minute)")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,11008x4096")
    ap.add_argument("--sparsities", default=None, help="e.g. 0,0.5,0.75")
    ap.add_argument("--values", default=None, help="e.g. bf16,int8")
    ap.add_argument("--batches", default=None, help="e.g. 1,16")
    ap.add_argument("--no-baselines", action="store_true", help="skip torch dense bf16 and torch CSR")
    ap.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="per-round statistic: median, or min on a machine shared with other jobs",
    )
    ap.add_argument(
        "--summarize", metavar="FILE", help="only print the targets from a saved output of this script"
    )
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or process CPU time / threads (for a machine shared with other jobs)",
    )
    ap.add_argument(
        "--deepsparse-python",
        default=os.environ.get("SPARSEC_DEEPSPARSE_PYTHON"),
        metavar="PATH",
        help="a Python with deepsparse installed (default $SPARSEC_DEEPSPARSE_PYTHON, else this "
        "Python if it can import deepsparse): adds DeepSparse rows and the x_ds column",
    )
    ap.add_argument(
        "--deepsparse-sparsities",
        default="0.75",
        help="sparsities (of those run) that DeepSparse is timed at (default 0.75)",
    )
    args = ap.parse_args()
    if args.summarize:
        with open(args.summarize) as f:
            summarize(f.read().splitlines())
        return
    global STAT, CLOCK
    STAT = min if args.stat == "min" else statistics.median
    CLOCK = args.clock
    shapes, sparsities, values, batches = SHAPES, SPARSITIES, VALUES, BATCHES
    if args.quick:
        shapes, sparsities, values, batches = [(4096, 4096)], [0.0, 0.5, 0.75], ["bf16", "int8"], [1, 16]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.sparsities:
        sparsities = [float(s) for s in args.sparsities.split(",")]
    if args.values:
        values = args.values.split(",")
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]

    torch.set_num_threads(cpu_threads())
    llc = last_level_cache_bytes()
    feats = host_features()
    ds_python, ds_note = find_deepsparse(args.deepsparse_python)
    ds_sparsities = {round(float(v), 6) for v in args.deepsparse_sparsities.split(",")}
    ds_cores = [cpu_threads()] + ([1] if args.clock == "cpu" and cpu_threads() > 1 else [])
    bw = measure_read_bandwidth()
    print(
        f"# CPU: {platform.processor() or feats.name} ({feats.name}), threads {cpu_threads()}, "
        f"LLC {llc >> 20} MiB, AVX-512 bitmask kernels: {feats.vector_bitmask}"
    )
    print(
        f"# torch {torch.__version__}; load average at start {os.getloadavg()[0]:.2f}; "
        f"clock: {args.clock}; statistic: {args.stat if args.clock == 'wall' else 'median'} of rounds "
        "over rotating layer copies"
    )
    print(f"# measured read bandwidth: {bw:.1f} GB/s (streaming sum, {cpu_threads()} threads)")
    if ds_python:
        print(
            f"# DeepSparse: {ds_note} ({ds_python}); fp32, cores {','.join(map(str, ds_cores))}, "
            f"sparsities {sorted(ds_sparsities)}; x_ds = DeepSparse time / row time"
        )
    else:
        print(f"# DeepSparse: skipped ({ds_note}); x_ds column '-'")
    header = (
        f"{'shape':>11} {'sp%':>4} {'values':>6} {'B':>3} {'kernel':>14} {'time_us':>9} "
        f"{'GB/s':>6} {'%bw':>5} {'x_dense32':>9} {'bits/w':>6} {'x_ds':>6}"
    )
    print(header)
    gen = torch.Generator().manual_seed(0)
    for rows, cols in shapes:
        dense_w = torch.randn(rows, cols, generator=gen)
        # torch dense fp32 / bf16 baselines per batch (independent of sparsity)
        n_dense = copies_needed(rows * cols * 4, llc)
        dense32 = [dense_w.clone() for _ in range(n_dense)]
        dense16 = [dense_w.to(torch.bfloat16) for _ in range(n_dense)]
        base32 = {}
        for B in batches:
            x = torch.randn(B, cols, generator=gen)
            xb = x.to(torch.bfloat16)
            t32 = time_rotating([lambda w=w, x=x: F.linear(x, w) for w in dense32])
            base32[B] = t32
            _row(rows, cols, 0.0, "fp32", B, "torch-dense", t32, rows * cols * 4, bw, t32)
            if not args.no_baselines:
                t16 = time_rotating([lambda w=w, xb=xb: F.linear(xb, w) for w in dense16])
                _row(rows, cols, 0.0, "bf16", B, "torch-dense", t16, rows * cols * 2, bw, t32)
        del dense32, dense16
        release_memory()
        for sp in sparsities:
            w = dense_w * (torch.rand(rows, cols, generator=gen) >= sp)
            if not args.no_baselines and sp > 0:
                csr = w.to_sparse_csr()
                csr_bytes = sum(
                    t.numel() * t.element_size()
                    for t in (csr.crow_indices(), csr.col_indices(), csr.values())
                )
                n = copies_needed(csr_bytes, llc)
                csrs = [w.to_sparse_csr() for _ in range(n)]
                for B in batches:
                    xt = torch.randn(cols, B, generator=gen)
                    t = time_rotating([lambda c=c, xt=xt: torch.mm(c, xt) for c in csrs])
                    _row(rows, cols, sp, "fp32", B, "torch-csr", t, csr_bytes, bw, base32[B])
                del csrs, csr
                release_memory()
            if ds_python and round(sp, 6) in ds_sparsities:
                run_deepsparse(ds_python, w, batches, ds_cores, llc, bw, base32, sp)
                release_memory()
            for vt in values:
                p = pack(w, "bitmask", vt)
                nb = p.nbytes()
                n = copies_needed(nb, llc)
                kernels = [build_linear_kernel(p)] + [
                    build_linear_kernel(p.clone()) for _ in range(n - 1)
                ]
                for B in batches:
                    x = torch.randn(B, cols, generator=gen)
                    t = time_rotating([lambda k=k, x=x: k(x) for k in kernels])
                    impl = kernels[0]._impl
                    family, tile = impl.plan(B)
                    name = "sparsec-dense" if impl.use_dense(B) else f"sparsec-{family}{tile or ''}"
                    _row(rows, cols, sp, vt, B, name, t, nb, bw, base32[B])
                del kernels, p
                release_memory()
            sys.stdout.flush()
    summarize(RESULTS)


def find_deepsparse(path: str | None) -> tuple[str | None, str]:
    """(Python to run ``deepsparse_worker.py`` with, version or why not): ``path`` if given,
    else this Python if it can import deepsparse."""
    if not path:
        try:
            import deepsparse

            return sys.executable, f"deepsparse {deepsparse.__version__}"
        except ImportError:
            return None, "not installed; give --deepsparse-python, see benchmarks/deepsparse_worker.py"
    try:
        r = subprocess.run(
            [path, "-c", "import deepsparse; print(deepsparse.__version__)"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "NM_DISABLE_ANALYTICS": "1"},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{path}: {e}"
    if r.returncode != 0:
        return None, f"{path} cannot import deepsparse: {r.stderr.strip().splitlines()[-1:]}"
    return path, f"deepsparse {r.stdout.strip().splitlines()[-1]}"


def run_deepsparse(python, w, batches, cores, llc, bw, base32, sp) -> None:
    """Time ``w`` (float32, masked) in DeepSparse at every batch in a subprocess; print its rows
    and record its best time per batch for the x_ds column. Its bytes are counted as 4 per kept
    weight (its compressed format's metadata is not known here)."""
    rows, cols = w.shape
    nnz = int(torch.count_nonzero(w))
    layers = max(4, copies_needed(nnz * 4, llc))
    with tempfile.TemporaryDirectory(prefix="sparsec-ds-") as tmp:
        path = os.path.join(tmp, "w.npy")
        np.save(path, w.numpy().astype(np.float32))
        cmd = [
            python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepsparse_worker.py"),
            "--weight", path, "--layers", str(layers), "--batches", ",".join(map(str, batches)),
            "--cores", ",".join(map(str, cores)),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NM_DISABLE_ANALYTICS": "1"})
    if r.returncode != 0:
        print(f"# DeepSparse failed at {rows}x{cols} {sp:.0%} (exit {r.returncode}): "
              + " | ".join(r.stderr.strip().splitlines()[-3:]), flush=True)
        return
    out = json.loads(r.stdout.strip().splitlines()[-1])
    n = cpu_threads()
    for res in out["results"]:
        B, c = res["batch"], res["cores"]
        if CLOCK == "cpu":
            t = res["cpu_s_per_layer"]
        else:
            t = res["wall_min_s_per_layer" if STAT is min else "wall_s_per_layer"]
        name = f"deepsparse{c}c"
        if c == 1 and n > 1:
            t, name = t / n, f"deepsparse1c/{n}"
        key = (rows, cols, round(sp * 100), B)
        DS_BEST[key] = min(DS_BEST.get(key, t), t)
        _row(rows, cols, sp, "fp32", B, name, t, nnz * 4, bw, base32[B])
    print(f"# DeepSparse {rows}x{cols} {sp:.0%}: {layers} layers, compile "
          + ", ".join(f"B{res['batch']}/{res['cores']}c {res['compile_s']}s" for res in out["results"]), flush=True)


def _row(rows, cols, sp, vt, B, kernel, t, nbytes, bw, t_dense32) -> None:
    gbs = nbytes / t / 1e9
    ds = DS_BEST.get((rows, cols, round(sp * 100), B))
    line = (
        f"{rows:>5}x{cols:<5} {round(sp * 100):>4} {vt:>6} {B:>3} {kernel:>14} {t * 1e6:>9.1f} "
        f"{gbs:>6.1f} {100 * gbs / bw:>5.0f} {t_dense32 / t:>9.2f} {8 * nbytes / (rows * cols):>6.2f} "
        + (f"{ds / t:>6.2f}" if ds else f"{'-':>6}")
    )
    RESULTS.append(line)
    print(line, flush=True)


RESULTS: list[str] = []
#: (rows, cols, sparsity %, batch) -> the fastest DeepSparse time per layer measured in this run
DS_BEST: dict[tuple[int, int, int, int], float] = {}

#: (description, sparsity %, value type, batch, column, threshold): the project's CPU targets.
TARGETS = [
    ("batch 1, 75%, bf16: >= 70% of measured bandwidth", 75, "bf16", 1, "%bw", 70.0),
    ("batch 1, 75%, int8: >= 60% of measured bandwidth", 75, "int8", 1, "%bw", 60.0),
    ("batch 16, 75%, bf16: >= 2.5x torch dense fp32", 75, "bf16", 16, "x_dense32", 2.5),
    ("batch 16, 75%, int8: >= 2.5x torch dense fp32", 75, "int8", 16, "x_dense32", 2.5),
    ("batch 16, 75%, int4: >= 2.5x torch dense fp32", 75, "int4", 16, "x_dense32", 2.5),
    ("batch 16, 75%, fp32: >= 2.5x torch dense fp32", 75, "fp32", 16, "x_dense32", 2.5),
    ("batch 1, 50%, int8: >= 4x torch dense fp32", 50, "int8", 1, "x_dense32", 4.0),
    ("batch 1, 75%, bf16: >= 1.5x faster than DeepSparse", 75, "bf16", 1, "x_ds", 1.5),
    ("batch 1, 75%, int8: >= 2x faster than DeepSparse", 75, "int8", 1, "x_ds", 2.0),
]


def summarize(lines: list[str]) -> None:
    """Print each target with the measured value per shape (from table lines of this script)."""
    cols = {"%bw": 7, "x_dense32": 8, "x_ds": 10}
    print("\n# targets (sparsec kernels; measured / target, per shape)")
    for desc, sp, vt, B, col, want in TARGETS:
        got = []
        for line in lines:
            f = line.split()
            if (
                len(f) in (10, 11)
                and f[4].startswith("sparsec")
                and (int(f[1]), f[2], int(f[3])) == (sp, vt, B)
                and len(f) > cols[col]
                and f[cols[col]] != "-"
            ):
                got.append(f"{f[0]}: {float(f[cols[col]]):g}")
        if got:
            worst = min(float(g.split(": ")[1]) for g in got)
            verdict = "met" if worst >= want else f"missed (worst {worst:g} = {worst / want:.0%} of target)"
            print(f"# {desc}: " + ", ".join(got) + f" -> {verdict}")


if __name__ == "__main__":
    main()
