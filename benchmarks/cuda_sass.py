"""Instructions per kept value of the CUDA bitmask kernels, read from their sm_90 machine code.

No GPU needed. The kernels are compiled to PTX for sm_90 (numba-cuda with libnvvm), assembled
with ``ptxas`` and disassembled with ``nvdisasm``; the bit-walking loop of each kernel (the loop
whose body holds the ``FLO`` of the find-first-set) is located by its backward branch, and its
instructions are counted. On an H200 the lane-word kernel is bound by instruction issue (see
docs/performance.md), so these counts, weighted by how many loop trips the fullest lane makes,
predict the designs' relative cost; the GPU benchmark (``benchmarks/gpu_kernels.py``) measures it.

    CUDA_HOME=/path/to/nvidia/cu13 python benchmarks/cuda_sass.py [--cols 4096,11008] [--sparsity 0.75]

Needs, all available as wheels: ``CUDA_HOME`` pointing at a folder holding ``lib/libnvvm.so.4``
and ``lib/libnvrtc.so.13`` (the ``nvidia-nvvm`` and ``nvidia-cuda-nvrtc`` wheels unpacked into one
``nvidia/cu13``), ``ptxas`` (``nvidia-cuda-nvcc``) and ``nvdisasm`` (``nvidia-cuda-nvdisasm``) on
the PATH or named with ``--ptxas`` / ``--nvdisasm``.

Columns: ``loop`` the instructions of one trip of the bit walk, ``/trip`` the kept values it
takes (one a trip in ``lanes``, a value word's worth in ``runs``), ``/value`` their ratio,
``LDG``/``LDS`` the trip's global and shared loads (predicated ones included), ``regs`` the
kernel's registers, ``trips`` the values the fullest lane takes per row over random rows at the
given sparsity (lanes reconverge after every tile in ``lanes``, once a row in ``runs``), and
``slots/row`` the estimate ``/value * trips`` (per-tile and per-row setup, and the run's last
word in ``runs``, not counted). A trip is counted on its common path: the move to the next
non-empty mask word (a nested loop, about once a word) is left out.

``--mma`` prints, instead, the loops of the tensor-core kernels (4096 columns, 8 warps a block):
the package's ``mma`` design (``sparsec/codegen/cuda/bitmask_mma.py``; no activation or bias,
as for the bit walks above) for fp16 values with fp16 ``x`` at batch 8 and 16, fp16 values with
float32 ``x`` and int8 values with fp16 ``x`` at batch 16, then the ``gather`` kernel of
``benchmarks/cuda_mma_probe.py`` (fp16 values and ``x``, batch 16). A row per loop with ``HMMA``
or ``FLO`` on its common path: its kind (``mma``: the loop over a slice's chunks, or 16-column
steps in ``gather``, that issues the ``mma``; ``walk``: the ``mma`` design's bit walk that fills
a chunk's shared tile), its common-path instructions, their ``HMMA``, ``FLO`` and ``LDG`` counts
(predicated loads included), and the kernel's registers. A last line gives the walk's trips a
chunk at ``--sparsity`` (:func:`mma_walk_trips`): the mean lane's, the fullest lane's, and the
fullest were each row's values split between its two lanes by count.

``--balance`` prints, instead (no compiler needed), how far the fullest lane of a row sits
above the mean lane: tile by tile (``lanes``), over the row (``runs``), and over the row with
a per-tile rotation of the lanes' column classes chosen to level them
(:func:`rotated_fullest_lane_trips`, an estimate for a design not built).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

DESIGNS = ("lanes", "runs")
VALUE_TYPES = ("fp16", "int8", "int4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cols", default="4096,11008", help="comma-separated column counts (default: %(default)s)")
    p.add_argument("--sparsity", default="0.75",
                   help="fraction of weights pruned (default: %(default)s; with --balance, comma-separated)")
    p.add_argument("--value-types", default=",".join(VALUE_TYPES))
    p.add_argument("--batch", type=int, default=1, help="batch bucket the kernels are built for")
    p.add_argument("--ptxas", default=shutil.which("ptxas"), help="path of ptxas (default: from PATH)")
    p.add_argument("--nvdisasm", default=shutil.which("nvdisasm"), help="path of nvdisasm (default: from PATH)")
    p.add_argument("--rows", type=int, default=2000, help="random rows for the imbalance estimate")
    p.add_argument("--mma", action="store_true",
                   help="count the loops of the tensor-core kernels (the mma design, the probe's gather) instead")
    p.add_argument("--balance", action="store_true",
                   help="print the lane-imbalance table for --cols and --sparsity (comma-separated here) only")
    return p.parse_args(argv)


def print_balance(cols_list: list[int], sparsities: list[float], rows: int) -> None:
    """Fullest lane over mean lane, per row, for each design's reconvergence (see module doc)."""
    print(f"# fullest lane / mean lane over {rows} random rows")
    print(f"{'sparsity':>8} {'cols':>6} {'mean':>6} {'lanes':>6} {'runs':>6} {'rotated':>7}")
    for sparsity in sparsities:
        for cols in cols_list:
            mean = float(lane_counts(cols, sparsity, rows).sum(axis=1).mean())
            ratios = [fullest_lane_trips(d, cols, sparsity, rows) / mean for d in DESIGNS]
            rotated = rotated_fullest_lane_trips(cols, sparsity, rows) / mean
            print(f"{sparsity:>8.0%} {cols:>6} {mean:>6.1f} {ratios[0]:>6.2f} {ratios[1]:>6.2f} {rotated:>7.2f}")


def _parse(sass: str) -> tuple[list[str], dict[str, int]]:
    labels: dict[str, int] = {}
    code: list[str] = []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(code)
            continue
        ins = re.match(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if ins:
            code.append(ins.group(1))
    return code, labels


def _hot_path(code: list[str], labels: dict[str, int], first: int, last: int) -> list[str]:
    """The instructions of ``code[first..last]`` (a loop) that run when no nested loop is entered:
    nested loops, and blocks that a forward branch skips to avoid one, are left out (in the
    walk they move to the next non-empty mask word, about once a word)."""
    cold = set()
    for i in range(first, last):
        target = re.search(r"BRA `\((\.L_x_\d+)\)", code[i])
        if not target or target.group(1) not in labels:
            continue
        t = labels[target.group(1)]
        if first <= t <= i:  # a nested loop
            cold.update(range(t, i + 1))
    for i in range(first, last):
        target = re.search(r"BRA `\((\.L_x_\d+)\)", code[i])
        if target and target.group(1) in labels and i < labels[target.group(1)] <= last:
            skipped = range(i + 1, labels[target.group(1)])
            if any(j in cold for j in skipped):
                cold.update(skipped)
    return [code[i] for i in range(first, last + 1) if i not in cold]


def walk_loop(sass: str) -> dict[str, int] | None:
    """Counts for the bit walk: the loop holding find-first-sets (``FLO``) whose common path
    costs the fewest instructions a value, or None."""
    code, labels = _parse(sass)
    best = None
    for i, ins in enumerate(code):
        branch = re.search(r"BRA `\((\.L_x_\d+)\)", ins)
        if not branch or labels.get(branch.group(1), i + 1) > i:
            continue
        hot = _hot_path(code, labels, labels[branch.group(1)], i)
        values = sum(h.startswith("FLO") for h in hot)
        if values and (best is None or len(hot) / values < best["loop"] / best["values"]):
            best = {"loop": len(hot), "values": values, "LDG": sum("LDG" in h for h in hot),
                    "LDS": sum("LDS" in h for h in hot)}
    return best


def lane_counts(cols: int, sparsity: float, rows: int) -> np.ndarray:
    """Kept values per (row, tile, lane) of ``rows`` random rows, lane ``l`` of a tile holding
    columns ``32 j + l`` (the lane-word layout)."""
    tiles = -(-cols // 1024)
    rng = np.random.default_rng(0)
    kept = rng.random((rows, tiles, 32, 32)) >= sparsity  # row, tile, lane, bit j (column 32 j + lane)
    valid = (np.arange(tiles * 1024).reshape(tiles, 32, 32).transpose(0, 2, 1) < cols)
    return (kept & valid).sum(-1)


def fullest_lane_trips(design: str, cols: int, sparsity: float, rows: int) -> float:
    """Mean over random rows of the values the slowest lane takes per row (the lanes of a warp
    wait for each other at every reconvergence point)."""
    counts = lane_counts(cols, sparsity, rows)
    if design == "lanes":  # the warp reconverges after every tile
        return float(counts.max(axis=2).sum(axis=1).mean())
    return float(counts.sum(axis=1).max(axis=1).mean())  # one walk a row


def rotated_fullest_lane_trips(cols: int, sparsity: float, rows: int) -> float:
    """:func:`fullest_lane_trips` of a one-walk-a-row design whose lanes take a different
    column class in each tile: lane ``l`` of tile ``t`` holds columns ``32 j + (l + r_t) % 32``,
    with ``r_t`` chosen per row, tile by tile, to keep the lanes' running counts level (greedy:
    the smallest maximum, then the smallest sum of squares). Not a kernel here: an estimate of
    what balancing a row's lanes would save (one byte a tile and row would store ``r_t``)."""
    counts = lane_counts(cols, sparsity, rows)
    shift = (np.arange(32)[None, :] + np.arange(32)[:, None]) % 32  # [r, lane] -> column class
    total = np.zeros((rows, 32), dtype=np.int64)
    for t in range(counts.shape[1]):
        options = total[:, None, :] + counts[:, t][:, shift]  # [row, r, lane]
        score = options.max(axis=2) * (1 << 30) + (options**2).sum(axis=2)
        total = options[np.arange(rows), score.argmin(axis=1)]
    return float(total.max(axis=1).mean())


def compile_ptx(design: str, value_type: str, cols: int, batch: int) -> str:
    from numba import cuda
    from numba.cuda import types as T

    from sparsec.codegen.cuda import bitmask_lanes

    make = bitmask_lanes.make_runs_kernel if design == "runs" else bitmask_lanes.make_kernel
    kernel = make(value_type, cols, batch, None, False, 128)
    f16 = T.Array(T.float16, 2, "C")
    sig = (f16, f16, T.int64, T.int64, T.Array(T.uint32, 2, "C"), T.Array(T.uint32, 1, "C"),
           T.Array(T.int32, 1, "C"), T.Array(T.float32, 2, "C"), T.Array(T.float32, 1, "C"))
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    return ptx


def assemble(ptx: str, tmp: str, ptxas: str, nvdisasm: str) -> tuple[str, str]:
    """``(sm_90 SASS, registers used)`` of a PTX module, through ``ptxas`` and ``nvdisasm``."""
    ptx_path = os.path.join(tmp, "k.ptx")
    cubin = os.path.join(tmp, "k.cubin")
    with open(ptx_path, "w") as f:
        f.write(ptx)
    info = subprocess.run([ptxas, "-arch=sm_90", "-O3", "-v", ptx_path, "-o", cubin],
                          capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    return sass, regs.group(1) if regs else "?"


#: ``--mma`` rows of the package's ``mma`` design: (value type, ``x`` dtype, batch bucket).
MMA_CONFIGS = (("fp16", "fp16", 8), ("fp16", "fp16", 16), ("fp16", "f32", 16), ("int8", "fp16", 16))


def print_mma(tmp: str, ptxas: str, nvdisasm: str) -> None:
    """The ``--mma`` table (see the module doc)."""
    from numba import cuda
    from numba.cuda import types as T

    from sparsec.codegen.cuda import bitmask_mma

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cuda_mma_probe as probe

    probe.load_cuda()

    def arr(dtype, ndim):
        return T.Array(dtype, ndim, "C")

    kernels = []
    for value_type, x_type, batch in MMA_CONFIGS:
        x = arr(T.float16 if x_type == "fp16" else T.float32, 2)
        sig = (x, x, T.int64, T.int64, arr(T.uint64, 1), arr(T.uint64, 1), arr(T.int32, 1), arr(T.float32, 2),
               arr(T.float32, 1))
        kernel = bitmask_mma.make_kernel(value_type, 4096, batch, None, False)
        kernels.append((f"mma {value_type}/{x_type} b{batch}", kernel, sig))
    sig = (arr(T.float32, 2), arr(T.int32, 1), arr(T.uint16, 1), arr(T.uint16, 1), arr(T.int32, 2), T.int64, T.int64)
    kernels.append(("gather fp16/fp16 b16", probe.build(8, 4096), sig))

    print("# sm_90 SASS of the tensor-core kernels' loops, 4096 columns, 8 warps a block (values/x, batch)")
    print(f"{'kernel':>20} {'loop':>5} {'instructions':>12} {'HMMA':>5} {'FLO':>4} {'LDG':>4} {'regs':>5}")
    for name, kernel, sig in kernels:
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
        sass, regs = assemble(ptx, tmp, ptxas, nvdisasm)
        code, labels = _parse(sass)
        for i, ins in enumerate(code):
            branch = re.search(r"BRA `\((\.L_x_\d+)\)", ins)
            if not branch or labels.get(branch.group(1), i + 1) > i:
                continue
            hot = _hot_path(code, labels, labels[branch.group(1)], i)
            hmma = sum("HMMA" in h for h in hot)
            flo = sum(h.startswith("FLO") for h in hot)
            ldg = sum("LDG" in h for h in hot)
            if hmma or flo:
                kind = "mma" if hmma else "walk"
                print(f"{name:>20} {kind:>5} {len(hot):>12} {hmma:>5} {flo:>4} {ldg:>4} {regs:>5}")


def mma_walk_trips(sparsity: float, chunks: int = 20000) -> tuple[float, float, float]:
    """Trips of the ``mma`` design's walk a chunk at ``sparsity``, over ``chunks`` random 16-row
    chunks: ``(mean lane, fullest lane, fullest lane were each row's kept values split between
    its two lanes by count)``. A lane walks one row's 32 columns; the warp waits for its fullest
    lane. The third is an estimate for a walk not built (one lane from each end of the row)."""
    rng = np.random.default_rng(0)
    kept = rng.random((chunks, 16, 64)) >= sparsity  # chunk, row, column
    lanes = kept.reshape(chunks, 32, 32).sum(axis=2)  # lane 2r + h: row r, half h
    by_count = np.ceil(kept.sum(axis=2) / 2)
    return float(lanes.mean()), float(lanes.max(axis=1).mean()), float(by_count.max(axis=1).mean())


def print_mma_trips(sparsity: float) -> None:
    mean, fullest, by_count = mma_walk_trips(sparsity)
    print(f"# mma walk trips a chunk at {sparsity:.0%}, 20,000 random chunks: mean lane {mean:.2f}, "
          f"fullest lane {fullest:.2f} ({fullest / mean:.2f}x), split by count {by_count:.2f} "
          f"({by_count / mean:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.balance:
        print_balance([int(c) for c in args.cols.split(",")], [float(v) for v in str(args.sparsity).split(",")],
                      args.rows)
        return 0
    if not args.ptxas or not args.nvdisasm:
        print("cuda_sass.py needs ptxas and nvdisasm: put them on the PATH or pass --ptxas/--nvdisasm",
              file=sys.stderr)
        return 2
    if not os.environ.get("CUDA_HOME"):
        print("cuda_sass.py needs CUDA_HOME: a folder with lib/libnvvm.so.4 and lib/libnvrtc.so.13", file=sys.stderr)
        return 2
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import numba.cuda.dispatcher as dispatcher

    class _Hopper:  # no GPU here: numba-cuda asks the current device for its compute capability
        compute_capability = (9, 0)

    dispatcher.get_current_device = lambda: _Hopper()

    if args.mma:
        with tempfile.TemporaryDirectory() as tmp:
            print_mma(tmp, args.ptxas, args.nvdisasm)
        print_mma_trips(float(args.sparsity))
        return 0
    args.sparsity = float(args.sparsity)
    print(f"# sm_90 SASS of the bitmask bit walk, batch {args.batch}, sparsity {args.sparsity:.0%}")
    print(f"{'cols':>6} {'design':>6} {'values':>6} {'loop':>5} {'/trip':>5} {'/value':>6} {'LDG':>4} {'LDS':>4} "
          f"{'regs':>5} {'trips':>7} {'slots/row':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for cols in (int(c) for c in args.cols.split(",")):
            for value_type in args.value_types.split(","):
                for design in DESIGNS:
                    sass, regs = assemble(compile_ptx(design, value_type, cols, args.batch), tmp,
                                          args.ptxas, args.nvdisasm)
                    loop = walk_loop(sass)
                    if loop is None:
                        print(f"{cols:>6} {design:>6} {value_type:>6}  no bit-walk loop found")
                        continue
                    trips = fullest_lane_trips(design, cols, args.sparsity, args.rows)
                    per_value = loop["loop"] / loop["values"]
                    print(f"{cols:>6} {design:>6} {value_type:>6} {loop['loop']:>5} {loop['values']:>5} "
                          f"{per_value:>6.1f} {loop['LDG']:>4} {loop['LDS']:>4} {regs:>5} "
                          f"{trips:>7.1f} {per_value * trips:>9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
