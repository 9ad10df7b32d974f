"""Probe: the ``gather`` way of building tensor-core A fragments from the bitmask format.

docs/performance.md works out why no CUDA-core kernel reaches the batch-16 target (1.5x cuBLAS
fp16 at 75%): 16 multiply-adds and 16 conversions a kept value already cost about 4 us of issue
at 4096x4096. One ``mma.sync.m16n8k16`` does 2,048 multiply-adds instead, so the cost moves to
expanding the weight into dense fp16 fragments from its mask. This script measures one way of
doing it, ``gather``: a masked popcount per *position*, whatever the sparsity. The other way,
``scatter`` (a walk over kept values into a shared tile), is the package's ``mma`` design
(``sparsec/codegen/cuda/bitmask_mma.py``), timed by ``benchmarks/gpu_kernels.py --designs mma``.

The probe kernel (fp16 values, fp16 ``x``, float32 accumulation, batch up to 16):

* a block owns one 16-row tile of the weight; its warps split the columns into equal slices
  and add their partial tiles in shared memory at the end;
* per 16-column step a lane reads the 16-bit mask chunk of each of its two rows (``g`` and
  ``g + 8``, ``g = lane // 4``), finds the value index of each of its four positions
  (``2t, 2t+1, 2t+8, 2t+9``, ``t = lane % 4``) with a masked popcount, loads the kept ones
  (zeros elsewhere) and packs them into the A fragment of ``mma.m16n8k16.row.col`` (the PTX
  ISA's fragment layout, the package's ``mma_f16``); ``x`` supplies the B fragments, two 8-row
  halves of the batch;
* each warp starts its slice at a value offset computed on the host (one int32 a row and slice).

On a GPU it checks every output against float64, then times the kernel and cuBLAS fp16 with
CUDA events the way ``gpu_kernels.py`` does. ``--simulate`` runs the same kernel on numba's
CUDA simulator (the ``mma`` is emulated through shared memory there) and only checks:

    python benchmarks/cuda_mma_probe.py                 # on a GPU: 75%, batch 16, four shapes
    python benchmarks/cuda_mma_probe.py --simulate      # tiny shapes, checks only
"""

from __future__ import annotations

import argparse
import math
import os
import sys

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
#: ``numba.cuda`` (the GPU target or the simulator), set by :func:`load_cuda` once the choice is
#: made. The kernels must find it as a module global: the simulator swaps it there for its own.
cuda = None
SIM_SHAPES = [(40, 200), (17, 96)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--simulate", action="store_true", help="tiny shapes on numba's CUDA simulator, checks only")
    p.add_argument("--shapes", help="comma-separated ROWSxCOLS (default: the benchmark's four)")
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--batch", type=int, default=16, help="1-16 (the tile computes 16 rows either way)")
    p.add_argument("--slices", default="4,8", help="comma-separated warps a block (column slices) to time")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--block", type=int, default=40)
    return p.parse_args(argv)


def load_cuda():
    """Import numba's CUDA target through sparsec (which fixes numba-cuda's NumPy shim) into
    this module's ``cuda``."""
    global cuda
    from sparsec.codegen.cuda.device import cuda as target

    cuda = target
    return target


def make_kernel(slices: int, tiles_per_slice: int):
    """The probe kernel for ``slices`` warps a block, each over ``tiles_per_slice`` 16-column steps.

    ``kernel[rows_p // 16, 32 * slices](y, x32, mask16, values, slice_offsets, rows, m)``:
    ``y`` float32 ``[m, rows]``; ``x32`` uint32 ``[16 * cols_p // 2]`` (fp16 ``x`` zero-padded to
    16 rows and ``cols_p = 16 * slices * tiles_per_slice`` columns, two values a word, flat);
    ``mask16`` uint16 ``[rows_p * cols_p // 16]`` (flat); ``values`` uint16 (the stored fp16
    values, row-major); ``slice_offsets`` int32 ``[rows_p, slices]``: the index of each row's
    first value in each slice. Flat arrays with compile-time row lengths: a 2-D index costs a
    64-bit address computation on every load, a constant stride folds into the loop's pointers.
    """
    import numpy as np

    from sparsec.codegen.cuda.device import SIMULATOR, jit_kernel, mma_f16

    store_tile = make_store_tile(slices)
    steps = slices * tiles_per_slice  # 16-column steps a row (mask16 row length)
    x_words = np.uint32(8 * steps)  # uint32 words an x row
    zero = np.uint32(0)
    one = np.uint32(1)
    eight = np.uint32(8)
    nine = np.uint32(9)
    sixteen = np.uint32(16)
    # mma_f16's scratch tiles: [16, 16] and [16, 8] float32 a warp on the simulator; on a GPU
    # they are never read, and one element keeps them from taking shared memory.
    sa_rows, sb_cols = (16, 8) if SIMULATOR else (1, 1)

    @jit_kernel
    def kernel(y, x32, mask16, values, slice_offsets, rows, m):
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        g = lane // 4
        t = lane % 4
        t2 = np.uint32(2 * t)  # the lane's first column in a 16-column step (and + 1, + 8, + 9)
        sa = cuda.shared.array((slices, sa_rows, 16), np.float32)
        sb = cuda.shared.array((slices, 16, sb_cols), np.float32)
        partial = cuda.shared.array((slices, 32, 8), np.float32)
        r0 = cuda.blockIdx.x * 16 + g
        r1 = r0 + 8
        # Bits below each of the lane's two position pairs, and the pairs' own bits.
        below_lo = np.uint32((one << t2) - one)
        below_hi = np.uint32((one << (t2 + eight)) - one)
        off0 = np.uint32(slice_offsets[r0, warp])
        off1 = np.uint32(slice_offsets[r1, warp])
        # Where this lane's rows start in the flat arrays (uint32: numba's 64-bit integer
        # arithmetic would cost a 64-bit address computation on every load).
        mask_at = (np.uint32(r0 * steps), np.uint32(r1 * steps))
        x_at = (np.uint32(g * x_words), np.uint32((8 + g) * x_words))  # batch rows g, 8 + g
        c = cuda.local.array(8, np.float32)
        for i in range(8):
            c[i] = np.float32(0.0)
        regs = cuda.local.array(4, np.uint32)  # the A fragment
        first = np.uint32(warp * tiles_per_slice)
        for step in range(tiles_per_slice):
            kt = np.uint32(first + np.uint32(step))
            for half_row in range(2):
                off = off0 if half_row == 0 else off1
                mk = np.uint32(mask16[np.uint32(mask_at[half_row] + kt)])
                lo = np.uint32(cuda.popc(mk & below_lo))
                hi = np.uint32(cuda.popc(mk & below_hi))
                e0 = np.uint32((mk >> t2) & one)
                e1 = np.uint32((mk >> np.uint32(t2 + one)) & one)
                e8 = np.uint32((mk >> np.uint32(t2 + eight)) & one)
                e9 = np.uint32((mk >> np.uint32(t2 + nine)) & one)
                v0 = np.uint32(values[np.uint32(off + lo)]) if e0 else zero
                v1 = np.uint32(values[np.uint32(off + lo + e0)]) if e1 else zero
                v8 = np.uint32(values[np.uint32(off + hi)]) if e8 else zero
                v9 = np.uint32(values[np.uint32(off + hi + e8)]) if e9 else zero
                regs[half_row] = np.uint32(v0 | (v1 << sixteen))  # a0 (row g) / a1 (row g + 8)
                regs[2 + half_row] = np.uint32(v8 | (v9 << sixteen))  # a2 / a3: columns + 8
                if half_row == 0:
                    off0 = np.uint32(off0 + cuda.popc(mk))
                else:
                    off1 = np.uint32(off1 + cuda.popc(mk))
            col_word = np.uint32(kt * np.uint32(8) + np.uint32(t))  # x32 word of columns 16 kt + 2t, + 1
            for nb in range(2):
                b0 = np.uint32(x32[np.uint32(x_at[nb] + col_word)])
                b1 = np.uint32(x32[np.uint32(x_at[nb] + col_word + np.uint32(4))])
                d = mma_f16(regs[0], regs[1], regs[2], regs[3], b0, b1,
                            c[4 * nb], c[4 * nb + 1], c[4 * nb + 2], c[4 * nb + 3], lane, sa[warp], sb[warp])
                for i in range(4):
                    c[4 * nb + i] = d[i]
        store_tile(y, c, partial, warp, lane, r0, r1, rows, m)

    return kernel


def make_store_tile(slices: int):
    """Device function ``store_tile(y, c, partial, warp, lane, r0, r1, rows, m)``: the block's
    warps add their partial 16-row tiles (``c``: the lane's two accumulator fragments, batch rows
    0-7 then 8-15) in shared memory and warp 0 stores the sum (rows ``r0 = m0 + lane // 4`` and
    ``r1 = r0 + 8``, batch rows ``2 (lane % 4)`` and ``+ 1`` of each half), where in range."""
    import numpy as np

    @cuda.jit(device=True)
    def store_tile(y, c, partial, warp, lane, r0, r1, rows, m):
        for i in range(8):
            partial[warp, lane, i] = c[i]
        cuda.syncthreads()
        if warp == 0:
            t = lane % 4
            for nb in range(2):
                for i in range(4):
                    s = np.float32(0.0)
                    for w in range(slices):
                        s += partial[w, lane, 4 * nb + i]
                    row = r0 if i < 2 else r1  # d0, d1: row g; d2, d3: row g + 8
                    b = nb * 8 + 2 * t + (i % 2)  # batch row: column 2t or 2t + 1 of the tile
                    if row < rows and b < m:
                        y[b, row] = s

    return store_tile


def prepare(torch, np, w, slices: int) -> dict:
    """Host arrays of the probe layout for fp16 weight ``w`` ``[rows, cols]`` (zeros pruned).

    Rows are padded to 16 and columns to ``16 * slices`` (whole 16-column steps in every
    slice); ``mask`` is the stored bitmask's bytes read as uint16 words, one a row and step;
    values are the stored fp16 values in row-major order, as uint16 bits.
    """
    rows, cols = w.shape
    rows_p = -(-rows // 16) * 16
    cols_p = max(1, -(-cols // (16 * slices))) * 16 * slices
    dense = torch.zeros(rows_p, cols_p, dtype=torch.float16)
    dense[:rows, :cols] = w
    kept = (dense != 0).numpy()
    bits = np.ascontiguousarray(np.packbits(kept, axis=1, bitorder="little"))  # [rows_p, cols_p / 8]
    values = dense.numpy()[kept].view(np.uint16).copy()
    counts = kept.reshape(rows_p, slices, cols_p // slices).sum(axis=2)
    row_start = np.concatenate(([0], np.cumsum(kept.sum(axis=1))[:-1]))
    return {
        "rows_p": rows_p,
        "cols_p": cols_p,
        "mask": bits.view("<u2").astype(np.uint16).reshape(-1),
        "values": values if values.size else np.zeros(1, dtype=np.uint16),
        "slice_offsets": (row_start[:, None] + np.cumsum(counts, axis=1) - counts).astype(np.int32),
    }


def build(slices: int, cols_p: int):
    """The probe kernel for a layer of ``cols_p`` (padded, as :func:`prepare` does) columns."""
    return make_kernel(slices, cols_p // (16 * slices))


def padded_x(torch, x, cols_p: int):
    """fp16 ``x [m, cols]`` zero-padded to ``[16, cols_p]`` on its device (the kernel reads it as
    words of two values: a uint32 view on the simulator, an int32 one on a GPU)."""
    padded = torch.zeros(16, cols_p, dtype=torch.float16, device=x.device)
    padded[: x.shape[0], : x.shape[1]] = x
    return padded


def run_simulated(args) -> int:
    import numpy as np
    import torch

    load_cuda()
    shapes = parse_shapes(args.shapes) if args.shapes else SIM_SHAPES
    worst = 0.0
    for rows, cols in shapes:
        for slices in (1, 2):
            gen = torch.Generator().manual_seed(rows * cols + slices)
            w = random_sparse(torch, rows, cols, args.sparsity, gen)
            layer = prepare(torch, np, w, slices)
            x = torch.randn(args.batch, cols, generator=gen).half()
            x32 = padded_x(torch, x, layer["cols_p"]).numpy().view(np.uint32).reshape(-1)
            y = np.zeros((args.batch, rows), dtype=np.float32)
            build(slices, layer["cols_p"])[layer["rows_p"] // 16, 32 * slices](
                y, x32, layer["mask"], layer["values"], layer["slice_offsets"], rows, args.batch)
            err = error_ratio(torch, torch.from_numpy(y), x, w)
            worst = max(worst, err)
            print(f"simulator gather {rows}x{cols} {args.sparsity:.0%} batch {args.batch} slices {slices}: "
                  f"error ratio {err:.3f} (<= 1 passes)")
    return 0 if worst <= 1.0 else 1


def run_gpu(args) -> int:
    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_kernels import GpuTimer, no_gpu_reason

    why = no_gpu_reason(torch)
    if why is not None:
        print(f"cuda_mma_probe.py needs an NVIDIA GPU: {why}; run it with --simulate to check it on the "
              f"CUDA simulator", file=sys.stderr)
        return 2
    from sparsec.codegen.cuda._compat import without_nrt

    load_cuda()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    timer = GpuTimer(torch, args.repeats, args.block)
    stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    print(f"device: {props.name}; sparsity {args.sparsity:.0%}, batch {args.batch}, fp16 values and x")
    print(f"{'shape':>12} {'slices':>6} {'probe us':>9} {'cuBLAS us':>9} {'speedup':>7} {'err':>6}")
    failed = False
    for rows, cols in parse_shapes(args.shapes) if args.shapes else SHAPES:
        shape = f"{rows}x{cols}"
        gen = torch.Generator().manual_seed(rows + cols)
        w = random_sparse(torch, rows, cols, args.sparsity, gen)
        x = torch.randn(args.batch, cols, generator=gen).half().cuda()
        dense = [w.cuda() for _ in range(max(2, math.ceil(4 * l2 / (rows * cols * 2))))]
        cublas, _ = timer.time_us([lambda d=d, x=x: torch.nn.functional.linear(x, d) for d in dense])
        del dense
        for slices in (int(s) for s in args.slices.split(",")):
            layer = prepare(torch, np, w, slices)
            x32 = cuda.as_cuda_array(padded_x(torch, x, layer["cols_p"]).view(torch.int32).reshape(-1), sync=False)
            y = torch.empty(args.batch, rows, dtype=torch.float32, device="cuda")
            arrays = (layer["mask"], layer["values"], layer["slice_offsets"])
            copies = [tuple(cuda.to_device(a) for a in arrays)
                      for _ in range(max(2, math.ceil(4 * l2 / sum(a.nbytes for a in arrays))))]
            configured = build(slices, layer["cols_p"])[layer["rows_p"] // 16, 32 * slices, stream]
            launches = [launcher(configured, without_nrt,
                                 (cuda.as_cuda_array(y, sync=False), x32, *a, rows, args.batch)) for a in copies]
            y.fill_(float("nan"))
            launches[0]()
            torch.cuda.synchronize()
            err = error_ratio(torch, y.cpu(), x.cpu(), w)
            if not err <= 1.0:
                print(f"{shape:>12} {slices:>6} WRONG RESULT: error ratio {err:.3g}")
                failed = True
                continue
            probe, _ = timer.time_us(launches)
            print(f"{shape:>12} {slices:>6} {probe:9.2f} {cublas:9.2f} {cublas / probe:7.2f} {err:6.3f}")
            del copies
    return 1 if failed else 0


def launcher(configured, without_nrt, args: tuple):
    """A no-argument call of the configured kernel on ``args`` (the first call compiles it,
    without numba's runtime library, as the package's kernels are)."""

    def launch() -> None:
        with without_nrt():
            configured(*args)

    return launch


def random_sparse(torch, rows: int, cols: int, sparsity: float, gen):
    """fp16 ``[rows, cols]`` with exactly ``round(sparsity * cols)`` zeros a row, at random places."""
    w = torch.randn(rows, cols, generator=gen)
    k = int(round(sparsity * cols))
    if k:
        w.scatter_(1, torch.rand(rows, cols, generator=gen).argsort(dim=1)[:, :k], 0.0)
    return w.half()


def error_ratio(torch, y, x, w) -> float:
    """Max of |y - ref| / bound against float64; at most 1 passes. The products of fp16 values
    are exact in float32; the bound allows for float32 accumulation over up to 14336 terms
    (tensor cores may round their sums less carefully than IEEE adds), as ``gpu_kernels.py``."""
    xd, wd = x.double().cpu(), w.double().cpu()
    ref = xd @ wd.T
    bound = 1e-4 * (xd.abs() @ wd.abs().T) + 1e-6
    return float(((y.double().cpu() - ref).abs() / bound).max())


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 1 <= args.batch <= 16:
        print(f"--batch must be 1-16 (one 16-row tile), got {args.batch}", file=sys.stderr)
        return 2
    if args.simulate:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba is imported
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    return run_simulated(args) if args.simulate else run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
