"""Probe: does a tensor-core walk of the bitmask format beat cuBLAS at batch 16?

docs/performance.md works out why no CUDA-core kernel reaches the batch-16 target (1.5x cuBLAS
fp16 at 75%): 16 multiply-adds and 16 conversions a kept value already cost about 4 us of issue
at 4096x4096. One ``mma.sync.m16n8k16`` does 2,048 multiply-adds instead, so the cost moves to
expanding the weight into dense fp16 fragments from its mask: a cost per *position*, not per
kept value. This script measures that idea before it becomes a kernel of the package.

The probe kernel (fp16 values, fp16 ``x``, float32 accumulation, batch up to 16):

* a block owns one 16-row tile of the weight; its warps split the columns into equal slices
  and add their partial tiles in shared memory at the end;
* per 16-column step a lane reads the 16-bit mask chunk of each of its two rows (``g`` and
  ``g + 8``, ``g = lane // 4``), finds the value index of each of its four positions
  (``2t, 2t+1, 2t+8, 2t+9``, ``t = lane % 4``) with a masked popcount, loads the kept ones
  (zeros elsewhere) and packs them into the A fragment of ``mma.m16n8k16.row.col`` (the PTX
  ISA's fragment layout); ``x`` supplies the B fragments, two 8-row halves of the batch;
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
    p.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated subset of gather, scatter")
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


def make_mma(simulator: bool):
    """Device function ``mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, lane, sa, sb)``:
    ``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`` on one warp's fragments (``a*``/``b*``
    uint32 holding two fp16 each, ``c*`` float32), returning ``(d0, d1, d2, d3)``.

    On a GPU it is the instruction (inline PTX). On the simulator it is emulated: every lane
    writes its fragment elements into the warp's float32 scratch tiles ``sa [16, 16]`` and
    ``sb [16, 8]``, and computes its four outputs from them; every thread of the block must call
    it the same number of times (it synchronises the block)."""
    import numpy as np

    if simulator:

        def half(bits):
            return np.float32(np.array([int(bits) & 0xFFFF], dtype=np.uint16).view(np.float16)[0])

        @cuda.jit(device=True)
        def mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, lane, sa, sb):
            g, t = lane // 4, lane % 4
            k = 2 * t
            for reg, row, col in ((a0, g, k), (a1, g + 8, k), (a2, g, k + 8), (a3, g + 8, k + 8)):
                sa[row, col] = half(reg)
                sa[row, col + 1] = half(int(reg) >> 16)
            for reg, kk in ((b0, k), (b1, k + 8)):
                sb[kk, g] = half(reg)
                sb[kk + 1, g] = half(int(reg) >> 16)
            cuda.syncthreads()
            out = []
            for row, col, c in ((g, k, c0), (g, k + 1, c1), (g + 8, k, c2), (g + 8, k + 1, c3)):
                acc = np.float32(c)
                for kk in range(16):
                    acc = np.float32(acc + sa[row, kk] * sb[kk, col])
                out.append(acc)
            cuda.syncthreads()
            return out[0], out[1], out[2], out[3]

        return mma

    from llvmlite import ir
    from numba.cuda import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def _mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        if any(v != types.uint32 for v in (a0, a1, a2, a3, b0, b1)):
            return None
        if any(v != types.float32 for v in (c0, c1, c2, c3)):
            return None
        result = types.UniTuple(types.float32, 4)

        def codegen(context, builder, signature, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4)
            asm = ir.InlineAsm(
                fnty,
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
                "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
                side_effect=False,
            )
            out = builder.call(asm, args)
            return context.make_tuple(builder, result, [builder.extract_value(out, i) for i in range(4)])

        return result(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3), codegen

    @cuda.jit(device=True, inline=True)
    def mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, lane, sa, sb):
        return _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

    return mma


def make_kernel(simulator: bool, slices: int, tiles_per_slice: int):
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

    from sparsec.codegen.cuda.device import jit_kernel

    mma = make_mma(simulator)
    store_tile = make_store_tile(slices)
    steps = slices * tiles_per_slice  # 16-column steps a row (mask16 row length)
    x_words = np.uint32(8 * steps)  # uint32 words an x row
    zero = np.uint32(0)
    one = np.uint32(1)
    eight = np.uint32(8)
    nine = np.uint32(9)
    sixteen = np.uint32(16)

    @jit_kernel
    def kernel(y, x32, mask16, values, slice_offsets, rows, m):
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        g = lane // 4
        t = lane % 4
        t2 = np.uint32(2 * t)  # the lane's first column in a 16-column step (and + 1, + 8, + 9)
        sa = cuda.shared.array((slices, 16, 16), np.float32)  # simulator only
        sb = cuda.shared.array((slices, 16, 8), np.float32)
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
                d = mma(regs[0], regs[1], regs[2], regs[3], b0, b1,
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


def make_store_half(simulator: bool):
    """Device function ``store_half(words, index, value)``: the low 16 bits of ``value`` into
    16-bit element ``index`` of the uint32 array ``words`` (one 2-byte store on a GPU)."""
    import numpy as np

    if simulator:

        @cuda.jit(device=True)
        def store_half(words, index, value):
            words.view(np.uint16)[index] = np.uint16(int(value) & 0xFFFF)

        return store_half

    from llvmlite import ir
    from numba.cuda import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def _store_half(typingctx, words, index, value):
        if not (isinstance(words, types.Array) and words.dtype == types.uint32 and words.ndim == 1):
            return None
        if not (isinstance(index, types.Integer) and value == types.uint32):
            return None

        def codegen(context, builder, signature, args):
            arrty, idxty, valty = signature.args
            arr = context.make_array(arrty)(context, builder, args[0])
            i16 = ir.IntType(16)
            at = builder.gep(builder.bitcast(arr.data, i16.as_pointer()),
                             [context.cast(builder, args[1], idxty, types.intp)])
            builder.store(builder.trunc(args[2], i16), at)
            return context.get_dummy_value()

        return types.none(words, index, value), codegen

    @cuda.jit(device=True, inline=True)
    def store_half(words, index, value):
        _store_half(words, index, np.uint32(value))  # a 32-bit value: the store truncates it

    return store_half


#: The scatter kernel's chunk: 64 columns (two mask words a row, four 16-column steps), and
#: the shared tile's row length in uint32 words (32, padded by 4 so that the A-fragment loads of
#: the 8 row groups fall in distinct banks).
CHUNK = 64
TILE_ROW_WORDS = 36


def make_scatter_kernel(simulator: bool, slices: int, chunks_per_slice: int):
    """The ``scatter`` probe: each warp expands its 16 rows x 64 columns of the weight into a
    dense fp16 tile in shared memory, then takes its four A fragments from there.

    The expansion is a walk over kept values, not a test per position: lane ``L`` owns row
    ``L // 2`` and 32-column half ``L % 2`` of the tile, zeroes its 16 words, and stores each of
    its kept values at its column (the walk of the ``lanes`` kernel, one 2-byte store a value).
    Arguments as :func:`make_kernel`, except ``mask32`` uint32 ``[rows_p * cols_p // 32]``
    (flat) and ``cols_p = 64 * slices * chunks_per_slice``.
    """
    import numpy as np

    from sparsec.codegen.cuda.device import jit_kernel, warp_sync

    mma = make_mma(simulator)
    store_tile = make_store_tile(slices)
    store_half = make_store_half(simulator)
    tile_words = 16 * TILE_ROW_WORDS  # a shared array's shape must be a compile-time constant
    row_mask_words = np.uint32(2 * slices * chunks_per_slice)
    x_words = np.uint32(32 * slices * chunks_per_slice)  # uint32 words an x row
    zero = np.uint32(0)
    one = np.uint32(1)

    @jit_kernel
    def kernel(y, x32, mask32, values, slice_offsets, rows, m):
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        g = lane // 4
        t = np.uint32(lane % 4)
        sa = cuda.shared.array((slices, 16, 16), np.float32)  # simulator only
        sb = cuda.shared.array((slices, 16, 8), np.float32)
        partial = cuda.shared.array((slices, 32, 8), np.float32)
        tiles = cuda.shared.array((slices, tile_words), np.uint32)
        tile = tiles[warp]
        m0 = cuda.blockIdx.x * 16
        # The row and half this lane expands, and where its words sit in the tile.
        own_row = lane // 2
        half = np.uint32(lane % 2)
        own_word = np.uint32(own_row * TILE_ROW_WORDS + half * 16)
        off = np.uint32(slice_offsets[m0 + own_row, warp])
        mask_at = np.uint32((m0 + own_row) * row_mask_words + warp * chunks_per_slice * 2)
        x_at = (np.uint32(g * x_words), np.uint32((8 + g) * x_words))  # batch rows g, 8 + g
        a_at = (np.uint32(g * TILE_ROW_WORDS) + t, np.uint32((g + 8) * TILE_ROW_WORDS) + t)
        c = cuda.local.array(8, np.float32)
        for i in range(8):
            c[i] = np.float32(0.0)
        for ch in range(chunks_per_slice):
            w0 = mask32[np.uint32(mask_at + np.uint32(2 * ch))]
            w1 = mask32[np.uint32(mask_at + np.uint32(2 * ch + 1))]
            rest = w1 if half else w0
            k = np.uint32(off + (np.uint32(cuda.popc(w0)) if half else zero))
            off = np.uint32(off + cuda.popc(w0) + cuda.popc(w1))
            for i in range(16):
                tile[np.uint32(own_word + np.uint32(i))] = zero
            while rest != zero:
                bit = np.uint32(cuda.ffs(rest) - 1)
                rest = np.uint32(rest & np.uint32(rest - one))
                store_half(tile, np.uint32(2 * own_word + bit), values[k])
                k = np.uint32(k + one)
            warp_sync()
            for s in range(4):  # the chunk's 16-column steps
                word = np.uint32(8 * s)
                a0 = tile[np.uint32(a_at[0] + word)]  # row g, columns 16 s + 2t, + 1
                a1 = tile[np.uint32(a_at[1] + word)]  # row g + 8
                a2 = tile[np.uint32(a_at[0] + word + np.uint32(4))]  # row g, columns + 8
                a3 = tile[np.uint32(a_at[1] + word + np.uint32(4))]
                col_word = np.uint32((np.uint32(warp * chunks_per_slice + ch) * np.uint32(4) + s) * 8) + t
                for nb in range(2):
                    b0 = np.uint32(x32[np.uint32(x_at[nb] + col_word)])
                    b1 = np.uint32(x32[np.uint32(x_at[nb] + col_word + np.uint32(4))])
                    d = mma(a0, a1, a2, a3, b0, b1,
                            c[4 * nb], c[4 * nb + 1], c[4 * nb + 2], c[4 * nb + 3], lane, sa[warp], sb[warp])
                    for i in range(4):
                        c[4 * nb + i] = d[i]
            warp_sync()  # every lane has read the tile before the next chunk overwrites it
        store_tile(y, c, partial, warp, lane, m0 + g, m0 + g + 8, rows, m)

    return kernel


KERNELS = ("gather", "scatter")


def prepare(torch, np, w, slices: int) -> dict:
    """Host arrays of the probe layout for fp16 weight ``w`` ``[rows, cols]`` (zeros pruned).

    Rows are padded to 16 and columns to ``64 * slices`` (both kernels' steps divide it); the
    mask is the stored bitmask's bytes, read as uint16 (``gather``) or uint32 (``scatter``)
    words; values are the stored fp16 values in row-major order, as uint16 bits.
    """
    rows, cols = w.shape
    rows_p = -(-rows // 16) * 16
    cols_p = max(1, -(-cols // (CHUNK * slices))) * CHUNK * slices
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
        "gather": bits.view("<u2").astype(np.uint16).reshape(-1),
        "scatter": bits.view("<u4").astype(np.uint32).reshape(-1),
        "values": values if values.size else np.zeros(1, dtype=np.uint16),
        "slice_offsets": (row_start[:, None] + np.cumsum(counts, axis=1) - counts).astype(np.int32),
    }


def build(name: str, simulator: bool, slices: int, cols_p: int):
    """The ``gather`` or ``scatter`` kernel for a layer of ``cols_p`` (padded) columns."""
    if name == "gather":
        return make_kernel(simulator, slices, cols_p // (16 * slices))
    return make_scatter_kernel(simulator, slices, cols_p // (CHUNK * slices))


def padded_x(torch, x, cols_p: int):
    """fp16 ``x [m, cols]`` zero-padded to ``[16, cols_p]`` on its device (the kernels read it as
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
            for name in args.kernels.split(","):
                y = np.zeros((args.batch, rows), dtype=np.float32)
                kernel = build(name, True, slices, layer["cols_p"])
                kernel[layer["rows_p"] // 16, 32 * slices](y, x32, layer[name], layer["values"],
                                                           layer["slice_offsets"], rows, args.batch)
                err = error_ratio(torch, torch.from_numpy(y), x, w)
                worst = max(worst, err)
                print(f"simulator {name:>7} {rows}x{cols} {args.sparsity:.0%} batch {args.batch} slices {slices}: "
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
    print(f"{'shape':>12} {'kernel':>7} {'slices':>6} {'probe us':>9} {'cuBLAS us':>9} {'speedup':>7} {'err':>6}")
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
            for name in args.kernels.split(","):
                arrays = (layer[name], layer["values"], layer["slice_offsets"])
                copies = [tuple(cuda.to_device(a) for a in arrays)
                          for _ in range(max(2, math.ceil(4 * l2 / sum(a.nbytes for a in arrays))))]
                configured = build(name, False, slices, layer["cols_p"])[layer["rows_p"] // 16, 32 * slices, stream]
                launches = [launcher(configured, without_nrt,
                                     (cuda.as_cuda_array(y, sync=False), x32, *a, rows, args.batch)) for a in copies]
                y.fill_(float("nan"))
                launches[0]()
                torch.cuda.synchronize()
                err = error_ratio(torch, y.cpu(), x.cpu(), w)
                if not err <= 1.0:
                    print(f"{shape:>12} {name:>7} {slices:>6} WRONG RESULT: error ratio {err:.3g}")
                    failed = True
                    continue
                probe, _ = timer.time_us(launches)
                print(f"{shape:>12} {name:>7} {slices:>6} {probe:9.2f} {cublas:9.2f} {cublas / probe:7.2f} {err:6.3f}")
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
    unknown = sorted(set(args.kernels.split(",")) - set(KERNELS))
    if unknown:
        print(f"--kernels: unknown {', '.join(unknown)}; choose from {', '.join(KERNELS)}", file=sys.stderr)
        return 2
    if args.simulate:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba is imported
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    return run_simulated(args) if args.simulate else run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
