"""GPU sparse-kernel benchmark: sparsec's CUDA kernels against dense fp16 cuBLAS.

For each layer shape, sparsity, value type and batch, this script

1. measures the device-to-device copy bandwidth once (the floor every kernel is judged by);
2. packs a random weight, builds the kernel, and checks its output against a float64
   reference *before* timing (a wrong kernel is reported, never timed);
3. times the kernel and ``torch.nn.functional.linear`` on the dense fp16 weight with CUDA
   events: the median over repetitions of a block of back-to-back launches, each launch on
   the next of several copies of the layer (together more than 4x the L2 cache, so weights
   come from HBM as in a real decoding step);
4. prints time, speedup over cuBLAS, achieved bandwidth as a fraction of the copy bandwidth,
   and the host-side cost of one call;
5. times cuBLAS once more on a dense fp16 weight of the same columns and as many bytes as the
   sparse layer holds (``ceiling`` = cuBLAS time / that time): the speedup a kernel would get
   if it streamed its bytes as well as cuBLAS streams a dense weight, fixed costs included.
   A target above the ceiling cannot be met by a better walk alone.

Launch overhead: a numba-cuda launch costs tens of microseconds of Python on the host, more than
a small layer takes on the GPU. Each timed block therefore starts behind a GPU-side sleep
(``torch.cuda._sleep``) long enough for the host to enqueue the whole block, so the events
measure GPU time alone; the host cost is reported in its own column (CUDA graphs would remove
it in a real decode loop).

Usage::

    python benchmarks/gpu_kernels.py              # full grid incl. 2:4 (a few minutes on an H100/H200)
    python benchmarks/gpu_kernels.py --quick      # a subset (about a minute)
    python benchmarks/gpu_kernels.py --simulate   # tiny shapes on the CUDA simulator, no GPU
    python benchmarks/gpu_kernels.py --json out.json
    python benchmarks/gpu_kernels.py --fit out.json   # no GPU: what cuBLAS's times say is reachable

Without a GPU (and without ``--simulate``) it exits with status 2 and one sentence saying so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

FULL = {
    "shapes": [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)],
    # 75% first: the targets are set there, and a run cut short by a time limit still has them
    "sparsities": [0.75, 0.5, 0.7, 0.9, "2:4"],
    "batches": [1, 4, 16],
    "value_types": ["fp16", "int8", "int4"],
}
QUICK = {
    "shapes": [(4096, 4096), (11008, 4096)],
    "sparsities": [0.5, 0.75],
    "batches": [1, 16],
    "value_types": ["fp16", "int8", "int4"],
}
SIMULATE = {
    "shapes": [(6, 72), (9, 128)],
    "sparsities": [0.5, 0.9, "2:4"],
    "batches": [1, 4],
    "value_types": ["fp16", "int8", "int4"],
}
INT4_GROUP = 128


@dataclass
class Row:
    rows: int
    cols: int
    sparsity: float | str
    value_type: str
    batch: int
    bits_per_weight: float
    ours_us: float
    cublas_us: float
    speedup: float
    ours_bw_frac: float
    cublas_bw_frac: float
    floor_us: float
    host_us_per_call: float
    max_err_ratio: float
    warps: int = 4
    design: str = "lanes"
    #: cuBLAS fp16 on a dense ``[same_bytes_rows, cols]`` weight of the sparse layer's bytes
    same_bytes_rows: int = 0
    same_bytes_cublas_us: float = math.nan
    ceiling: float = math.nan


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a subset of the grid")
    p.add_argument("--simulate", action="store_true", help="tiny shapes on numba's CUDA simulator (no GPU)")
    p.add_argument("--value-types", help="comma-separated subset, e.g. fp16,int4")
    p.add_argument("--shapes", help="comma-separated ROWSxCOLS subset, e.g. 11008x4096,4096x11008")
    p.add_argument("--sparsities", help="comma-separated subset, e.g. 0.75,2:4")
    p.add_argument("--batches", help="comma-separated subset, e.g. 1,16")
    p.add_argument("--warps", default="default",
                   help="comma-separated rows (warps) per block to compare, 1-8, or 'default' (each "
                        "design's own: 8 for lanes, 4 for tiles and nm)")
    p.add_argument("--designs", default="lanes",
                   help="comma-separated bitmask kernel designs to compare: lanes, runs, tiles, mma "
                        "(default: %(default)s; mma runs fp16 and int8 values only, and is skipped for "
                        "others)")
    p.add_argument("--repeats", type=int, default=15, help="timed blocks per measurement (median taken)")
    p.add_argument("--block", type=int, default=40, help="launches per timed block")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit", metavar="JSON",
                   help="no GPU needed: fit cuBLAS time = fixed + bytes / bandwidth to a --json file of an "
                        "earlier run, and print the speedup a sparse layer would get at that fit")
    return p.parse_args(argv)


def fit_cublas(rows: list[dict]) -> dict[int, tuple[float, float]]:
    """``{batch: (fixed us, GB/s)}``: least squares of cuBLAS's median time per shape against its
    dense fp16 weight bytes, one line per batch (needs two shapes or more)."""
    import numpy as np

    times: dict[tuple[int, int, int], list[float]] = {}
    for r in rows:
        if not math.isnan(r["cublas_us"]):
            times.setdefault((r["batch"], r["rows"], r["cols"]), []).append(r["cublas_us"])
    fits = {}
    for batch in sorted({b for b, _, _ in times}):
        shapes = [(rr * cc * 2, statistics.median(t)) for (b, rr, cc), t in times.items() if b == batch]
        if len(shapes) < 2:
            continue
        mb = np.array([s[0] / 1e6 for s in shapes])
        us = np.array([s[1] for s in shapes])
        slope, fixed = np.polyfit(mb, us, 1)
        fits[batch] = (float(fixed), float(1e3 / slope))
    return fits


def print_fit(path: str) -> int:
    """The ``--fit`` report: the line through cuBLAS's times, then per measured configuration
    the speedup of a kernel that moved the sparse layer's bytes on the same line (``ceiling``)."""
    with open(path) as f:
        rows = json.load(f)
    fits = fit_cublas(rows)
    if not fits:
        print(f"{path} has cuBLAS times for fewer than two shapes at every batch; nothing to fit", file=sys.stderr)
        return 2
    for batch, (fixed, gbs) in fits.items():
        print(f"batch {batch}: cuBLAS fp16 time = {fixed:.2f} us + dense bytes / {gbs:.0f} GB/s")
    print(f"{'shape':>12} {'sparse':>6} {'vtype':>5} {'batch':>5} {'bits/w':>6} {'cuBLAS us':>9} "
          f"{'same line us':>12} {'ceiling':>7}")
    seen = set()
    for r in rows:
        key = (r["rows"], r["cols"], str(r["sparsity"]), r["value_type"], r["batch"])
        if key in seen or r["batch"] not in fits or math.isnan(r["cublas_us"]):
            continue
        seen.add(key)
        fixed, gbs = fits[r["batch"]]
        at_fit = fixed + r["rows"] * r["cols"] * r["bits_per_weight"] / 8 / 1e6 * 1e3 / gbs
        shape = f"{r['rows']}x{r['cols']}"
        print(f"{shape:>12} {str(r['sparsity']):>6} {r['value_type']:>5} {r['batch']:5d} "
              f"{r['bits_per_weight']:6.2f} {r['cublas_us']:9.2f} {at_fit:12.2f} {r['cublas_us'] / at_fit:7.2f}")
    return 0


def no_gpu_reason(torch) -> str | None:
    if not torch.cuda.is_available():
        build = (
            "a CPU-only torch build"
            if torch.version.cuda is None
            else f"torch built for CUDA {torch.version.cuda}"
        )
        return f"torch.cuda.is_available() is False ({build})"
    from sparsec.codegen.cuda import cuda_available

    ok, why = cuda_available()
    return None if ok else why


def random_weight(torch, rows: int, cols: int, sparsity, gen):
    """Random fp32 weight on the generator's device: ``sparsity`` a fraction (exactly
    ``round(sparsity * cols)`` zeros a row, unstructured) or ``"N:M"`` (the N largest of every
    M consecutive columns kept)."""
    w = torch.randn(rows, cols, generator=gen, device=gen.device)
    if isinstance(sparsity, str):
        n, m = (int(v) for v in sparsity.split(":"))
        groups = w.view(rows, cols // m, m)
        keep = groups.abs().topk(n, dim=2).indices
        return (groups * torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True)).view(rows, cols)
    k = int(round(sparsity * cols))
    if k:
        drop = torch.rand(rows, cols, generator=gen, device=gen.device).argsort(dim=1)[:, :k]
        w.scatter_(1, drop, 0.0)
    return w


def pack_for(pack, w, sparsity, value_type: str, group: int):
    """``nm`` for an ``"N:M"`` sparsity, ``bitmask`` otherwise."""
    options = {"group_size": group} if value_type == "int4" else {}
    if isinstance(sparsity, str):
        n, m = (int(v) for v in sparsity.split(":"))
        return pack(w, "nm", value_type, n=n, m=m, **options)
    return pack(w, "bitmask", value_type, **options)


def designs_for(designs: list[str], packed) -> list[str]:
    """The bitmask designs of ``designs`` that run ``packed`` (``["-"]``, the format's one kernel,
    for other formats): the tensor-core design runs fp16 and int8 values only."""
    from sparsec.codegen.cuda.bitmask_mma import VALUE_TYPES

    if packed.format_name != "bitmask":
        return ["-"]
    return [d for d in designs if d != "mma" or packed.value_type in VALUE_TYPES]


def check_output(torch, y, x, w_ref) -> float:
    """Max of |y - ref| / bound with ref in float64; must be <= 1 (bound stated below)."""
    xd = x.double()
    ref = xd @ w_ref.T
    mag = xd.abs() @ w_ref.abs().T
    # float32 accumulation over up to 11008 terms, then an fp16 output rounding.
    bound = 1e-4 * mag + 2.0**-10 * ref.abs() + 1e-3
    return float(((y.double() - ref).abs() / bound).max())


class GpuTimer:
    """Median GPU time of a launch, hiding host launch cost behind a GPU-side sleep."""

    def __init__(self, torch, repeats: int, block: int) -> None:
        self.torch = torch
        self.repeats = repeats
        self.block = block
        self.cycles_per_us = self._calibrate_sleep()

    def _calibrate_sleep(self) -> float:
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 20_000_000
        torch.cuda._sleep(1000)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        return cycles / (start.elapsed_time(end) * 1e3)

    def host_cost_us(self, launches) -> float:
        torch = self.torch
        torch.cuda.synchronize()
        n = 2 * len(launches)
        t0 = time.perf_counter()
        for i in range(n):
            launches[i % len(launches)]()
        t = (time.perf_counter() - t0) / n
        torch.cuda.synchronize()
        return t * 1e6

    def time_us(self, launches) -> tuple[float, float]:
        """``(median GPU microseconds per launch, host microseconds per launch)``."""
        torch = self.torch
        for i in range(max(10, len(launches))):  # warm-up: compile, caches, clocks
            launches[i % len(launches)]()
        torch.cuda.synchronize()
        host = self.host_cost_us(launches)
        sleep_us = 2.0 * host * self.block + 200.0
        samples = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(self.repeats):
            torch.cuda._sleep(int(sleep_us * self.cycles_per_us))
            t0 = time.perf_counter()
            start.record()
            for i in range(self.block):
                launches[i % len(launches)]()
            end.record()
            enqueue_us = (time.perf_counter() - t0) * 1e6
            torch.cuda.synchronize()
            if enqueue_us > sleep_us:  # the GPU caught up with the host: that block is not valid
                sleep_us = 2.0 * enqueue_us
                continue
            samples.append(start.elapsed_time(end) * 1e3 / self.block)
        if not samples:
            raise RuntimeError("the host never enqueued a block faster than the GPU ran it; raise --block")
        return statistics.median(samples), host


def bandwidth_gbs(torch, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del a, b
    return 2 * (nbytes // 2) / statistics.median(times) / 1e9


def empty_kernel_us(torch, timer: GpuTimer, blocks: int) -> float:
    """GPU time of a numba-cuda launch of ``blocks`` x 256 threads that do nothing: the part of
    every kernel's time that no walk can remove (launch, block scheduling, completion)."""
    import numpy as np

    from sparsec.codegen.cuda._compat import without_nrt
    from sparsec.codegen.cuda.device import cuda, jit_kernel

    @jit_kernel
    def nothing(flag):
        if flag[0] == 12345:  # never: the argument only keeps the launch shaped like a kernel's
            flag[0] = 0

    flag = cuda.to_device(np.zeros(1, dtype=np.int32))
    stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)

    def launch() -> None:
        with without_nrt():  # as the layers' kernels are launched (the first launch compiles)
            nothing[blocks, 256, stream](flag)

    us, _ = timer.time_us([launch])
    return us


def run_gpu(args, grid) -> list[Row]:
    import torch

    from sparsec.codegen.cuda import build_linear_kernel
    from sparsec.formats import pack

    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    bw = bandwidth_gbs(torch)
    print(f"device: {props.name}, L2 {l2 / 2**20:.0f} MiB, copy bandwidth {bw:.0f} GB/s (read + write)")
    timer = GpuTimer(torch, args.repeats, args.block)
    blocks = props.multi_processor_count * 8
    try:  # a reference point only: its failure must not cost the run its kernel timings
        empty_us = empty_kernel_us(torch, timer, blocks)
        print(f"empty kernel: {empty_us:.2f} us of GPU time a launch ({blocks} blocks of 256 threads that do "
              f"nothing: no launch of that size is faster)")
    except Exception as e:
        print(f"empty kernel: not measured ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    results: list[Row] = []
    same_bytes: dict[tuple[int, int, int], float] = {}  # (rows, cols, batch) -> cuBLAS us

    def cublas_same_bytes(nbytes: int, cols: int, x) -> tuple[int, float]:
        rows_eq = max(1, round(nbytes / (2 * cols)))
        key = (rows_eq, cols, x.shape[0])
        if key not in same_bytes:
            copies = [torch.randn(rows_eq, cols, generator=gen, device="cuda").half()
                      for _ in range(max(2, math.ceil(4 * l2 / (rows_eq * cols * 2))))]
            same_bytes[key], _ = timer.time_us(
                [lambda d=d: torch.nn.functional.linear(x, d) for d in copies]
            )
            del copies
        return rows_eq, same_bytes[key]
    for rows, cols in grid["shapes"]:
        dense_bytes = rows * cols * 2
        n_dense = max(2, math.ceil(4 * l2 / dense_bytes))
        for sparsity in grid["sparsities"]:
            w = random_weight(torch, rows, cols, sparsity, gen)
            dense = [w.to(torch.float16) for _ in range(n_dense)]
            w = w.cpu()
            for vt in grid["value_types"]:
                packed = pack_for(pack, w, sparsity, vt, INT4_GROUP)
                w_ref = packed.unpack().to("cuda", torch.float64)
                n_ours = max(2, math.ceil(4 * l2 / packed.nbytes()))
                designs = designs_for(args.design_list, packed)
                configs = [(d, wp, b) for d in designs for wp in args.warp_list for b in grid["batches"]]
                for design, warps, batch in configs:
                    if batch == grid["batches"][0]:
                        first = build_linear_kernel(packed, warps_per_block=warps,
                                                    design=None if design == "-" else design)
                        kernels = [first] + [first.replicate() for _ in range(n_ours - 1)]
                    x = torch.randn(batch, cols, generator=gen, device="cuda").half()
                    err = max(check_output(torch, k(x), x, w_ref) for k in kernels[:2])
                    if not err <= 1.0:
                        print(
                            f"WRONG RESULT {rows}x{cols} {vt} s={sparsity} b={batch}: error ratio {err:.3g}"
                        )
                        results.append(Row(rows, cols, sparsity, vt, batch, packed.bits_per_weight(),
                                           math.nan, math.nan, math.nan, math.nan, math.nan, math.nan,
                                           math.nan, err, warps or 0, design))  # fmt: skip
                        continue
                    ours, host = timer.time_us([lambda k=k, x=x: k(x) for k in kernels])
                    cublas, _ = timer.time_us(
                        [lambda d=d, x=x: torch.nn.functional.linear(x, d) for d in dense]
                    )
                    io = x.numel() * 2 + batch * rows * 2
                    ours_bytes = kernels[0].nbytes() + io
                    rows_eq, eq_us = cublas_same_bytes(kernels[0].nbytes(), cols, x)
                    row = Row(
                        rows, cols, sparsity, vt, batch, packed.bits_per_weight(),
                        ours, cublas, cublas / ours,
                        ours_bytes / (ours * 1e-6) / 1e9 / bw,
                        (dense_bytes + io) / (cublas * 1e-6) / 1e9 / bw,
                        ours_bytes / (bw * 1e9) * 1e6, host, err, warps or 0, design,
                        rows_eq, eq_us, cublas / eq_us,
                    )  # fmt: skip
                    results.append(row)
                    print_row(row)
                del kernels
            del dense
            torch.cuda.empty_cache()
    return results


def run_simulated(args, grid) -> list[Row]:
    """The same steps on the CUDA simulator with CPU tensors: checks the logic, times nothing real."""
    import torch

    from sparsec.codegen.cuda import build_linear_kernel
    from sparsec.formats import pack

    gen = torch.Generator().manual_seed(args.seed)
    results = []
    for rows, cols in grid["shapes"]:
        for sparsity in grid["sparsities"]:
            w = random_weight(torch, rows, cols, sparsity, gen)
            for vt in grid["value_types"]:
                packed = pack_for(pack, w, sparsity, vt, 32)
                w_ref = packed.unpack().double()
                designs = designs_for(args.design_list, packed)
                configs = [(d, wp, b) for d in designs for wp in args.warp_list for b in grid["batches"]]
                for design, warps, batch in configs:
                    kernel = build_linear_kernel(packed, warps_per_block=warps,
                                                 design=None if design == "-" else design)
                    x = torch.randn(batch, cols, generator=gen).half()
                    t0 = time.perf_counter()
                    y = kernel(x)
                    ours = (time.perf_counter() - t0) * 1e6
                    err = check_output(torch, y, x, w_ref)
                    t0 = time.perf_counter()
                    torch.nn.functional.linear(x.float(), w)
                    dense = (time.perf_counter() - t0) * 1e6
                    row = Row(rows, cols, sparsity, vt, batch, packed.bits_per_weight(), ours, dense,
                              dense / ours, math.nan, math.nan, math.nan, ours, err, warps or 0,
                              design)  # fmt: skip
                    results.append(row)
                    print_row(row)
                    if not err <= 1.0:
                        print(
                            f"WRONG RESULT {rows}x{cols} {vt} s={sparsity} b={batch}: error ratio {err:.3g}"
                        )
    return results


HEADER = (
    f"{'shape':>12} {'sparse':>6} {'vtype':>5} {'batch':>5} {'bits/w':>6} {'ours us':>9} {'cuBLAS us':>9} "
    f"{'speedup':>7} {'ours BW':>7} {'cuBLAS BW':>9} {'floor us':>8} {'host us':>8} {'err':>6} {'warps':>5} "
    f"{'design':>6} {'ceiling':>7}"
)


def print_row(r: Row) -> None:
    def pct(v: float) -> str:
        return "   n/a" if math.isnan(v) else f"{100 * v:5.1f}%"

    print(
        f"{f'{r.rows}x{r.cols}':>12} {str(r.sparsity):>6} {r.value_type:>5} {r.batch:5d} "
        f"{r.bits_per_weight:6.2f} "
        f"{r.ours_us:9.2f} {r.cublas_us:9.2f} {r.speedup:7.2f} {pct(r.ours_bw_frac):>7} "
        f"{pct(r.cublas_bw_frac):>9} {r.floor_us:8.2f} {r.host_us_per_call:8.1f} {r.max_err_ratio:6.3f} "
        f"{r.warps:5d} {r.design:>6} {r.ceiling:7.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fit:
        return print_fit(args.fit)
    if args.simulate:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba is imported
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import torch

    grid = dict(SIMULATE if args.simulate else QUICK if args.quick else FULL)
    if args.value_types:
        grid["value_types"] = args.value_types.split(",")
    if args.shapes:
        grid["shapes"] = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    if args.sparsities:
        grid["sparsities"] = [s if ":" in s else float(s) for s in args.sparsities.split(",")]
    if args.batches:
        grid["batches"] = [int(b) for b in args.batches.split(",")]
    args.warp_list = [None] if args.warps == "default" else [int(w) for w in args.warps.split(",")]
    args.design_list = args.designs.split(",")
    from sparsec.codegen.cuda import BITMASK_DESIGNS  # imports no numba

    unknown = [d for d in args.design_list if d not in BITMASK_DESIGNS]
    if unknown:
        print(f"--designs: unknown {', '.join(unknown)}; choose from {', '.join(BITMASK_DESIGNS)}", file=sys.stderr)
        return 2
    if args.simulate:
        print("CUDA simulator: outputs are checked, times are Python's and mean nothing about a GPU")
        print(HEADER)
        results = run_simulated(args, grid)
    else:
        why = no_gpu_reason(torch)
        if why is not None:
            print(
                f"gpu_kernels.py needs an NVIDIA GPU with a working CUDA driver and a CUDA build of torch: "
                f"{why}; run it with --simulate for a smoke test on the CUDA simulator",
                file=sys.stderr,
            )
            return 2
        print(HEADER)
        results = run_gpu(args, grid)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    wrong = [r for r in results if not r.max_err_ratio <= 1.0]
    if wrong:
        print(f"{len(wrong)} configuration(s) gave wrong results", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
