"""CUDA kernels for the ``bitmask`` format on tensor cores (``mma`` design), for batches of 2-16.

Why tensor cores. At batch 16 a kept value costs a CUDA-core kernel 16 multiply-adds (and, with
fp16 ``x``, 16 conversions): at 4096 x 4096 and 75% sparsity that is about 4 us of issue on an
H200 before any decoding, against a 9 us budget for 1.5x cuBLAS (docs/performance.md). One
``mma.sync.m16n8k16`` does 2,048 multiply-adds, so the work moves to building dense fp16
fragments of the weight from its mask: a cost per kept value and per 64-column chunk, not per
kept value and batch row.

How a block works:

* a block owns one 16-row tile of the weight; its warps split the (padded) columns into equal
  slices, and add their partial tiles in shared memory at the end;
* per 64-column chunk, lane ``L`` expands row ``L // 2``, columns ``32 (L % 2)`` to ``+ 31`` of
  the chunk into a dense fp16 tile in shared memory: it zeroes its 16 words, then walks the set
  bits of its half of the chunk's 64-bit mask word and stores each kept value at its column
  (one 2-byte store a value; int8 values are converted to fp16, exactly: ``|q| <= 127``);
* the values are read a 64-bit word at a time (4 fp16 or 8 int8 values), the next word always
  in flight while the lane stores the current one's: a lane's kept values of a chunk are one
  contiguous run, but each lane's run lies elsewhere, so a warp's value load touches up to 32
  sectors; a word a value would be one such load, and one wait on it, per kept value;
* the chunk's first value words, the next chunk's mask word and the chunk's ``x`` are loaded
  before the walk, so that their latencies overlap it rather than follow one another;
* four ``m16n8k16`` steps then read the tile's A fragments and ``x``'s B fragments (one or two
  8-row halves of the batch) and accumulate in float32;
* each warp starts its slice at a value offset computed on the host (one int32 a row and slice),
  so no warp scans the mask before its own columns.

Stored bytes: the mask is the stored bitmask's bits, rows padded to 16 and columns to whole
chunks of every slice, and one word more (the prefetch past the last chunk reads it); the values
are the stored values in their stored (row-major) order, packed little-endian into 64-bit words,
and two words more (the prefetch past the last value reads them). Only the offsets (4 bytes a
row and slice) are added.

The order of ``k``. A chunk's 64 columns may enter the four steps in any order, as long as the
A and B fragments use the same one. Lane ``t = L % 4`` of each row group takes columns ``16t`` to
``16t + 15``: in step ``s`` its fragment pairs ``(2t, 2t + 1)`` and ``(2t + 8, 2t + 9)`` hold
columns ``16t + 4s + (0, 1)`` and ``16t + 4s + (2, 3)``. So its ``x`` for the whole chunk is one
contiguous run (two 16-byte loads a batch row in fp16, four in float32) and its A fragments of
a step are one 8-byte shared load a row (the tile row is 34 words, so that a half-warp's 8-byte
loads fall in distinct bank pairs).

``x`` is read where it lies (``[m, cols]``, float16 or float32), straight into the B fragments:
no copy or conversion kernel runs before the launch. Batch rows past ``m`` read row ``m - 1``
(they only feed output columns that are never stored); a padding chunk reads the row's first
columns (its weights are zero); only a partial last chunk (``cols`` not a multiple of 64) clamps
each load to the row.
float32 ``x`` enters as ``hi = fp16(x)`` and ``lo = fp16((x - hi) * 2048)``, a second ``mma`` a
step whose sum is added back scaled by ``1 / 2048``: products then carry about 22 bits of ``x``,
as float32 accumulation does, where one fp16 part carries 11. Inputs must lie within fp16's
range (``|x| < 65504``), as for any fp16 tensor-core product.

Value types: fp16 and int8 (row scales applied after the sum). bf16, float32 and int4 values are
not served by this design (the others serve every type).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sparsec.codegen.cuda.device import (
    LO_SCALE,
    SIMULATOR,
    cuda,
    int_to_half_bits,
    jit_kernel,
    make_load_x_run,
    make_output,
    mma_f16,
    splits_x,
    store_half,
    warp_sync,
)

#: Value types this design serves.
VALUE_TYPES: tuple[str, ...] = ("fp16", "int8")
#: ``mma.sync.m16n8k16`` with fp16 inputs came with Ampere.
MIN_COMPUTE_CAPABILITY = (8, 0)
#: Columns a block's warp expands at a time: one 64-bit mask word a row, half of it a lane.
CHUNK_COLS = 64
#: Rows of the weight a block computes (the ``mma`` tile's M).
TILE_ROWS = 16
#: A tile row in shared memory, in uint32 words: 32 (64 fp16), padded by 2 so that the 8-byte
#: A-fragment loads of a half-warp (4 row groups x 4 column groups) fall in distinct bank pairs.
TILE_ROW_WORDS = 34
#: Most warps (column slices) a block may have; the default.
MAX_SLICES = 8
#: Batch buckets: one kernel for up to 8 rows (one ``mma`` a step), one for up to 16 (two).
BATCH_BUCKETS: tuple[int, ...] = (8, 16)
#: Stored values a 64-bit value word holds, by value type.
VALUES_PER_WORD: dict[str, int] = {"fp16": 4, "int8": 8}


def check_value_type(value_type: str) -> None:
    """Refuse, in one line, a value type this design does not run."""
    if value_type not in VALUE_TYPES:
        raise ValueError(f"the CUDA bitmask design 'mma' takes {' or '.join(VALUE_TYPES)} values, not "
                         f"{value_type}; quantize to one of those or choose design 'lanes'")


def column_slices(cols: int, max_slices: int = MAX_SLICES) -> tuple[int, int]:
    """``(slices, chunks a slice)`` for a row of ``cols`` columns: at most ``max_slices`` warps a
    block, as few padding chunks as that allows (576 columns: 5 slices of 2 chunks, 640 columns
    in all, where 8 slices would pad to 1,024)."""
    chunks = max(1, math.ceil(cols / CHUNK_COLS))
    per_slice = math.ceil(chunks / min(max_slices, chunks))
    return math.ceil(chunks / per_slice), per_slice


def padded_cols(cols: int, max_slices: int = MAX_SLICES) -> int:
    """Columns the kernel walks: whole chunks of every slice."""
    slices, per_slice = column_slices(cols, max_slices)
    return CHUNK_COLS * slices * per_slice


@dataclass(frozen=True)
class MmaArrays:
    """Host arrays in the layout the kernel reads (moved to the device by the caller)."""

    mask: np.ndarray  # uint64 [rows_p * cols_p / 64 + 1]: the bitmask, one little-endian word a chunk, flat
    values: np.ndarray  # uint64 [nnz / VALUES_PER_WORD + 2]: the stored values, stored order, packed
    slice_offsets: np.ndarray  # int32 [rows_p * slices]: each row's first value in each slice
    scales: np.ndarray  # float32 [rows, 1] (int8) or [1, 1] (unused)


def prepare_arrays(rows: int, cols: int, value_type: str, values: np.ndarray, bitmask: np.ndarray,
                   scales: np.ndarray | None, max_slices: int = MAX_SLICES) -> MmaArrays:
    """The stored bitmask tensors in the kernel's layout; no stored value is changed.

    ``values`` is the ``compressed`` tensor as NumPy (only its bytes are used), ``bitmask``
    uint8 ``[rows, ceil(cols / 8)]``; ``scales`` the int8 row scales (``[rows]`` or
    ``[rows, 1]``), ``None`` for fp16.
    """
    check_value_type(value_type)
    slices, per_slice = column_slices(cols, max_slices)
    rows_p = max(1, math.ceil(rows / TILE_ROWS)) * TILE_ROWS
    cols_p = CHUNK_COLS * slices * per_slice
    dense = np.zeros((rows_p, cols_p), dtype=bool)
    if rows and cols:
        dense[:rows, :cols] = np.unpackbits(bitmask, axis=1, count=cols, bitorder="little").astype(bool)
    counts = dense.reshape(rows_p, slices, cols_p // slices).sum(axis=2, dtype=np.int64)
    nnz = int(counts.sum())
    if nnz >= 2**31:
        raise ValueError(f"a layer with {nnz} kept values exceeds the kernel's 32-bit value index")
    row_start = np.concatenate(([0], np.cumsum(counts.sum(axis=1))[:-1]))
    offsets = row_start[:, None] + np.cumsum(counts, axis=1) - counts
    mask = np.packbits(dense, axis=1, bitorder="little").view("<u8").astype(np.uint64).reshape(-1)
    mask = np.concatenate((mask, np.zeros(1, dtype=np.uint64)))
    element_bytes = 8 // VALUES_PER_WORD[value_type]
    packed = np.zeros((nnz // VALUES_PER_WORD[value_type] + 2) * 8, dtype=np.uint8)
    packed[: nnz * element_bytes] = np.ascontiguousarray(values).reshape(-1).view(np.uint8)[: nnz * element_bytes]
    if value_type == "int8":
        sc = np.ascontiguousarray(np.asarray(scales, dtype=np.float32).reshape(rows, 1))
    else:
        sc = np.zeros((1, 1), dtype=np.float32)
    return MmaArrays(
        mask=mask,
        values=packed.view("<u8").astype(np.uint64),
        slice_offsets=offsets.astype(np.int32).reshape(-1),
        scales=sc,
    )


def make_kernel(value_type: str, cols: int, batch: int, activation: str | None, has_bias: bool,
                max_slices: int = MAX_SLICES):
    """The ``@cuda.jit`` kernel for one specialization (``batch``: a bucket, 8 or 16).

    ``kernel[rows_p / 16, 32 * slices](y, x, m, rows, mask, values, slice_offsets, scales,
    bias)``: ``y`` ``[m, rows]`` and ``x`` ``[m, cols]``, both float32 or both float16, ``m <=
    batch``; the arrays of :func:`prepare_arrays`; ``bias`` float32 ``[rows]`` (or a 1-element
    placeholder).
    """
    check_value_type(value_type)
    slices, per_slice = column_slices(cols, max_slices)
    cols_p = CHUNK_COLS * slices * per_slice
    row_chunks = cols_p // CHUNK_COLS
    halves = 1 if batch <= 8 else 2  # 8-row halves of the batch: the mma's N is 8
    row_pairs = TILE_ROW_WORDS // 2  # a tile row in uint64 (two-word) elements
    tile_pairs = TILE_ROWS * row_pairs  # a shared array's shape must be a compile-time constant
    # The simulator's mma emulation needs [16, 16] and [16, 8] float32 scratch a warp; on a GPU
    # the arrays are never read, and one element keeps them from taking shared memory.
    sa_rows, sb_cols = (16, 8) if SIMULATOR else (1, 1)
    int8 = value_type == "int8"
    output = make_output(value_type, has_bias, activation)
    # x's row length as launched (a layer without columns gets one zero column). With whole
    # chunks, a lane's 16 columns are two or four 16-byte loads; otherwise element by element,
    # clamped to the row.
    cols_x = max(cols, 1)
    load_x_run = make_load_x_run(cols_x, cols_x % CHUNK_COLS == 0)
    cols_u = np.uint32(cols_x)
    lo_weight = np.float32(1.0 / LO_SCALE)
    zero = np.uint32(0)
    zero64 = np.uint64(0)
    one = np.uint32(1)
    low32 = np.uint64(0xFFFFFFFF)
    shift32 = np.uint64(32)
    word_shift = np.uint32(VALUES_PER_WORD[value_type].bit_length() - 1)  # k // per_word as a shift
    in_word = np.uint32(VALUES_PER_WORD[value_type] - 1)
    value_bits = np.uint32(64 // VALUES_PER_WORD[value_type])
    word_bits = np.uint32(64)
    byte = np.uint32(0xFF)
    sign8 = np.int32(0x80)

    @jit_kernel
    def kernel(y, x, m, rows, mask, values, slice_offsets, scales, bias):
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        g = lane // 4
        t = np.uint32(lane % 4)
        sa = cuda.shared.array((slices, sa_rows, 16), np.float32)
        sb = cuda.shared.array((slices, 16, sb_cols), np.float32)
        partial = cuda.shared.array((slices, 32, 8), np.float32)
        tiles = cuda.shared.array((slices, tile_pairs), np.uint64)
        tile = tiles[warp]
        m0 = cuda.blockIdx.x * TILE_ROWS
        # The row and 32-column half this lane expands, and where its 8 pairs sit in the tile.
        own_row = m0 + lane // 2
        half = np.uint32(lane % 2)
        own_pair = np.uint32((lane // 2) * row_pairs + half * 8)
        # Views of the lane's own tile pairs (which it zeroes) and of its A fragments: rows g
        # and g + 8, pairs 4t + step (see the module docstring for the order of k). Views keep
        # the addresses constant offsets from one base.
        mine = tile[own_pair : own_pair + 8]
        a_g = tile[g * row_pairs + 4 * t : g * row_pairs + 4 * t + 4]
        a_g8 = tile[(g + 8) * row_pairs + 4 * t : (g + 8) * row_pairs + 4 * t + 4]
        own_half = np.uint32(4 * own_pair)  # the lane's first fp16 of the tile
        # uint32 indices: numba's 64-bit integer arithmetic would cost a 64-bit address
        # computation on every load.
        k_next = np.uint32(slice_offsets[own_row * slices + warp])
        first_chunk = own_row * row_chunks + warp * per_slice
        # The lane's row, the warp's slice, and one word past it: the prefetch of the chunk after
        # the slice's last reads it (another slice's word, or the array's padding word).
        my_mask = mask[first_chunk : first_chunk + per_slice + 1]
        split = splits_x(x)  # float32 x: a lo part, its own accumulators
        # The batch rows whose columns this lane gives the B fragments: g (and g + 8). A row
        # past m reads row m - 1 instead: it only feeds output columns that are never stored.
        x_rows = (np.uint32(min(g, m - 1) * cols_x), np.uint32(min(g + 8, m - 1) * cols_x))
        c = cuda.local.array(8, np.float32)  # batch rows 0-7, then 8-15 (see mma_f16)
        c_lo = cuda.local.array(8, np.float32)
        for i in range(8):
            c[i] = np.float32(0.0)
            c_lo[i] = np.float32(0.0)
        word = my_mask[0]
        for chunk in range(per_slice):
            w0 = np.uint32(word & low32)  # columns 0-31 of the chunk
            w1 = np.uint32(word >> shift32)  # columns 32-63
            word = my_mask[chunk + 1]  # the next chunk's, in flight during this one
            rest = w1 if half else w0
            k = np.uint32(k_next + (np.uint32(cuda.popc(w0)) if half else zero))
            k_next = np.uint32(k_next + cuda.popc(w0) + cuda.popc(w1))
            # The value word holding value k, the bit where value k starts in it, and the word
            # after it (the padding words keep both loads inside the array).
            my_values = values[np.uint32(k >> word_shift):]
            cur = my_values[0]
            nxt = my_values[1]
            at = np.uint32(value_bits * (k & in_word))
            j = np.uint32(2)
            first_col = np.uint32((warp * per_slice + chunk) * CHUNK_COLS)
            if first_col >= cols_u:  # a padding chunk: no kept value; any finite x will do
                first_col = zero
            col = np.uint32(first_col + 16 * t)  # the lane's 16 columns of the chunk
            # fp16 x's runs for both halves are 16 registers, float32 x's 32: the second half of
            # float32 x waits for the walk's end, or the registers would halve the blocks an SM holds.
            run0 = load_x_run(x, x_rows[0], col)
            early = halves == 2 and not split
            run1 = load_x_run(x, x_rows[1], col) if early else run0
            for i in range(8):
                mine[i] = zero64
            while rest != zero:
                if at == word_bits:  # the next word arrived while this one's values were stored
                    cur = nxt
                    nxt = my_values[j]
                    j = np.uint32(j + one)
                    at = zero
                bit = np.uint32(cuda.ffs(rest) - 1)
                rest = np.uint32(rest & np.uint32(rest - one))
                v = np.uint32(cur >> np.uint64(at))  # the store keeps the low 16 bits: no mask for fp16
                if int8:  # sign-extend the byte, then its exact fp16
                    v = int_to_half_bits(np.int32(v & byte) - ((np.int32(v) & sign8) << 1))
                store_half(tile, own_half, bit, v)
                at = np.uint32(at + value_bits)
            warp_sync()
            if halves == 2 and not early:
                run1 = load_x_run(x, x_rows[1], col)
            for nb in range(halves):
                run = run0 if nb == 0 else run1
                for step in range(4):  # the chunk's 16-column steps
                    pg = a_g[step]  # row g: a0 low, a2 high
                    pg8 = a_g8[step]  # row g + 8: a1, a3
                    a0 = np.uint32(pg & low32)
                    a2 = np.uint32(pg >> shift32)
                    a1 = np.uint32(pg8 & low32)
                    a3 = np.uint32(pg8 >> shift32)
                    d = mma_f16(a0, a1, a2, a3, run[2 * step], run[2 * step + 1], c[4 * nb], c[4 * nb + 1],
                                c[4 * nb + 2], c[4 * nb + 3], lane, sa[warp], sb[warp])
                    for i in range(4):
                        c[4 * nb + i] = d[i]
                    if split:
                        d = mma_f16(a0, a1, a2, a3, run[8 + 2 * step], run[9 + 2 * step], c_lo[4 * nb],
                                    c_lo[4 * nb + 1], c_lo[4 * nb + 2], c_lo[4 * nb + 3], lane, sa[warp], sb[warp])
                        for i in range(4):
                            c_lo[4 * nb + i] = d[i]
            warp_sync()  # every lane has read the tile before the next chunk overwrites it
        # The warps' partial tiles, summed by warp 0, which finishes its lanes' outputs: rows
        # g and g + 8 of the tile, batch rows 2t and 2t + 1 of each half.
        for i in range(8):
            partial[warp, lane, i] = c[i] + c_lo[i] * lo_weight if split else c[i]
        cuda.syncthreads()
        if warp == 0:
            for nb in range(halves):
                for i in range(4):
                    s = np.float32(0.0)
                    for w in range(slices):
                        s += partial[w, lane, 4 * nb + i]
                    row = m0 + g + (8 if i >= 2 else 0)
                    b = nb * 8 + 2 * t + (i % 2)
                    if row < rows and b < m:
                        y[b, row] = output(s, row, scales, bias)

    return kernel
