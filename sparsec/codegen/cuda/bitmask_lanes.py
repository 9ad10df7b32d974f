"""CUDA kernels for the ``bitmask`` format, lane-word design: ``y = act(x @ W^T + bias)``.

Why a second design. The warp-tile kernel (``bitmask.py``) splits a tile's values evenly over
the lanes and looks each value's column up in a shared-memory list; its ``x[b, col]`` gathers go
through L1, and for one load instruction the 32 lanes touch up to 32 different 128-byte lines,
which L1 serves one line a cycle. Measured on an H200 it ran at 2-19% of the memory bandwidth.
This design removes both costs:

* ``x`` is staged once per block in shared memory (float32), and blocks are persistent (they
  loop over row groups), so the staging is paid a few times per SM, not once per row;
* the mask is stored *transposed* within each 1024-column tile: lane ``l`` holds one 32-bit word
  whose bit ``j`` is column ``32 j + l`` of the tile. A lane's columns are then all congruent to
  ``l`` modulo 32, so its reads of ``x`` always fall in shared-memory bank ``l``: the warp's
  gathers are conflict-free whatever the sparsity pattern;
* the tile's values are stored lane by lane (lane 0's values in column order, then lane 1's,
  ...), so one warp scan of the lanes' popcounts gives each lane the start of its own contiguous
  run of values, which it reads 32 bits at a time (2 fp16/bf16, 4 int8 or 8 int4 values a load)
  while walking the set bits of its word: the bit gives the column, no list is needed.

Both are permutations made once on the host when the kernel is built: the same bytes are
stored (mask bits and values), only their order within each row's tile changes, so bytes moved
per row are exactly the stored format's. Row starts (``row_offsets``) are unchanged.

The cost of the design is lane imbalance: a lane walks its own word, so a tile takes as many
steps as its fullest lane (about 1.6x the mean at 75% sparsity).

Launch: ``grid = min(row groups, resident blocks)``, ``block = 32 * warps``; each warp computes
one row of a row group at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sparsec.codegen.cuda.device import (
    WARP,
    cuda,
    jit_kernel,
    make_epilogue,
    make_load_row,
    warp_scan,
)
from sparsec.codegen.cuda.values import VALUE_CODES, VALUES_PER_U32, kernel_scales, make_dequant_low, words32

#: Columns a tile covers: 32 lanes x one 32-bit mask word.
TILE_COLS = WARP * 32
#: Rows (warps) per block: more warps share one staged copy of ``x``.
WARPS_PER_BLOCK = 8
#: Shared memory a block may use for staged ``x`` (the static limit is 48 KiB a block).
X_STAGE_BYTES = 47 * 1024


def padded_cols(cols: int) -> int:
    """Columns rounded up to whole 1024-column tiles."""
    return max(1, math.ceil(cols / TILE_COLS)) * TILE_COLS


def stages_x(cols: int, batch: int) -> bool:
    """Whether a kernel for ``cols`` and batch bucket ``batch`` keeps ``x`` in shared memory."""
    return batch * padded_cols(cols) * 4 <= X_STAGE_BYTES


def x_by_column(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x [m, cols]`` as ``[cols, batch]`` zero-padded past ``m``: the layout of the buckets
    that do not stage ``x`` (see :func:`make_add_x`)."""
    by_col = x.new_zeros((x.shape[1], batch))
    by_col[:, : x.shape[0]] = x.T
    return by_col


def shared_bytes(cols: int, batch: int, warps: int) -> int:
    """Shared memory one block of the kernel uses on a GPU: staged ``x`` (the scratch rows are
    used by the simulator only). ``warps`` is taken for the signature the split design shares."""
    return (batch * padded_cols(cols) * 4 if stages_x(cols, batch) else 0) + 16


def make_stage_x(cols: int, batch: int, threads: int):
    """Device function ``stage_x(xs, x, tid, last)``: the block copies ``x [m, cols]`` into the
    float32 shared array ``xs [batch * padded_cols]``, then synchronises.

    Batch rows past ``m`` repeat row ``m - 1`` (``last``); padding columns hold zero, and are
    never read (no mask bit). Every thread of the block must call it.
    """
    cols_p = padded_cols(cols)
    # Why constant trip counts and 32-bit indices: a ``while i < len`` loop over a flat index
    # compiled (sm_90 SASS) to about 55 instructions an element, 64-bit signed division
    # included, with each load waiting for the previous store; per block that was about as many
    # instructions as the block's rows themselves at batch 1. Unrolled, a thread issues all its
    # loads before the first store.
    per_thread = -(-cols_p // threads)
    threads_u = np.uint32(threads)
    cols_u = np.uint32(cols)
    cols_p_u = np.uint32(cols_p)

    @cuda.jit(device=True, inline=True)
    def stage_x(xs, x, tid, last):
        t = np.uint32(tid)
        for b in range(batch):
            src = min(b, last)
            for k in range(per_thread):
                c = np.uint32(np.uint32(k) * threads_u + t)
                if c < cols_p_u:
                    v = np.float32(0.0)
                    if c < cols_u:
                        v = np.float32(x[src, c])
                    xs[np.uint32(np.uint32(b) * cols_p_u + c)] = v
        cuda.syncthreads()

    return stage_x


def make_add_x(cols: int, batch: int):
    """Device function ``add_x(acc, v, xs, x, col)``: ``acc[b] += v * x[b, col]`` for every batch
    row ``b`` of the bucket.

    ``x`` comes from the shared copy when the kernel stages it (:func:`stages_x`). Otherwise
    it comes by column, ``[cols, batch]`` zero-padded past ``m`` (the launcher transposes it), so
    one column's ``batch`` values sit side by side and arrive in one or a few vector loads
    (:func:`~sparsec.codegen.cuda.device.make_load_row`). Read as ``x[row, col]`` it took about
    9 instructions a value and batch row; read element by element from the column layout, one
    2-byte load a batch row, each touching its own cache line in every lane.
    """
    cols_p = padded_cols(cols)
    stage = stages_x(cols, batch)
    load_row = make_load_row(batch)

    @cuda.jit(device=True, inline=True)
    def add_x(acc, v, xs, x, col):
        if stage:
            for b in range(batch):
                acc[b] += v * xs[np.uint32(b * cols_p + col)]
        else:
            column = load_row(x, col)
            for b in range(batch):
                acc[b] += v * column[b]

    return add_x


@dataclass(frozen=True)
class LaneArrays:
    """Host arrays in the layout the kernel reads (moved to the device by the caller)."""

    mask: np.ndarray  # uint32 [rows, tiles * 32]: transposed tile words
    words: np.ndarray  # uint32 [n]: values in lane order (the split design: uint64 16-byte pieces)
    row_offsets: np.ndarray  # int32 [rows]: start of each row, in values
    scales: np.ndarray  # float32 [rows, G] (int8: G=1; float types: [1, 1], unused)


def _unpack_mask(bitmask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Dense bool ``[rows, padded_cols]`` from the stored ``[rows, ceil(cols/8)]`` bytes."""
    dense = np.zeros((rows, padded_cols(cols)), dtype=bool)
    if rows and cols:
        dense[:, :cols] = np.unpackbits(bitmask, axis=1, count=cols, bitorder="little").astype(bool)
    return dense


def _value_elements(values: np.ndarray, value_type: str, count: int) -> np.ndarray:
    """The first ``count`` stored values as one array element each (int4: one nibble a byte)."""
    raw = np.ascontiguousarray(values).reshape(-1)
    if value_type == "int4":
        b = raw.view(np.uint8)
        nib = np.empty(2 * b.size, dtype=np.uint8)
        nib[0::2] = b & 0x0F
        nib[1::2] = b >> 4
        return nib[:count]
    width = {"fp32": np.uint32, "bf16": np.uint16, "fp16": np.uint16, "int8": np.uint8}[value_type]
    return raw.view(np.uint8).view(width)[:count]


def _element_bytes(elements: np.ndarray, value_type: str) -> np.ndarray:
    """Inverse of :func:`_value_elements`: the elements' storage bytes (int4 packed two a byte)."""
    if value_type == "int4":
        nib = elements if elements.size % 2 == 0 else np.append(elements, np.uint8(0))
        return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(elements).view(np.uint8)


def _pad_lane_runs(elements: np.ndarray, counts: np.ndarray, per_word: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad each (row, lane) run of ``elements`` (``counts [rows, 32]`` long, in that order) with
    zeros to a multiple of ``per_word``; return the padded elements and each row's start."""
    counts = counts.astype(np.int64).reshape(-1)
    padded = -(-counts // per_word) * per_word
    if padded.sum() >= 2**31:
        raise ValueError(f"a layer with {int(padded.sum())} padded values exceeds the kernel's 32-bit value index")
    src_start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    dst_start = np.concatenate(([0], np.cumsum(padded)[:-1]))
    run = np.repeat(np.arange(counts.size), counts)
    out = np.zeros(int(padded.sum()), dtype=elements.dtype)
    out[dst_start[run] + np.arange(elements.size) - src_start[run]] = elements
    rows = counts.size // WARP
    row_starts = dst_start.reshape(rows, WARP)[:, 0] if rows else np.zeros(0, dtype=np.int64)
    return out, row_starts.astype(np.int32)


def prepare_arrays(
    rows: int,
    cols: int,
    value_type: str,
    values: np.ndarray,
    bitmask: np.ndarray,
    row_offsets: np.ndarray,
    scales: np.ndarray | None,
    row_runs: bool = False,
) -> LaneArrays:
    """Permute the stored bitmask tensors into the lane-word layout; no stored value is changed.

    ``values`` is the ``compressed`` tensor as numpy (only its bytes are used), ``bitmask``
    uint8 ``[rows, ceil(cols/8)]``, ``row_offsets`` int64 ``[rows]`` (in values).

    ``row_runs`` (the ``runs`` design): each lane's values form one run across the whole row
    (lane 0's values of every tile, then lane 1's, ...) instead of one run per tile, and each
    run is padded with zero values to whole 32-bit words, so a lane's run starts at a word
    (``row_offsets`` then count the padded values). The padding adds at most one word a lane
    and row (on average half a word: 1.3% of a 4096-column fp16 row at 75%, 5% for int4);
    the mask words are the same.
    """
    dense = _unpack_mask(bitmask, rows, cols)
    tiles = dense.shape[1] // TILE_COLS
    # [rows, tile, j, lane] -> [rows, tile, lane, j]: lane l's word holds columns 32 j + l.
    lane_major = dense.reshape(rows, tiles, 32, WARP).transpose(0, 1, 3, 2)
    mask = (
        np.packbits(lane_major, axis=3, bitorder="little").reshape(rows, tiles * WARP, 4).copy().view("<u4")
    ).reshape(rows, tiles * WARP).astype(np.uint32)
    nnz = int(dense.sum())
    if nnz >= 2**31:
        raise ValueError(f"a layer with {nnz} kept values exceeds the kernel's 32-bit value index")
    # Each kept position's index in the stored (row-major) order, read back in lane order.
    order = np.full(dense.shape, -1, dtype=np.int32)
    order[dense] = np.arange(nnz, dtype=order.dtype)
    # [rows, tile, j, lane] -> per tile lane-major, or (row_runs) lane-major over the whole row
    lane_order = (0, 3, 1, 2) if row_runs else (0, 1, 3, 2)
    perm = order.reshape(rows, tiles, 32, WARP).transpose(*lane_order).reshape(-1)
    perm = perm[perm >= 0]
    elements = _value_elements(values, value_type, nnz)[perm]
    offsets = np.ascontiguousarray(row_offsets, dtype=np.int64).reshape(-1).astype(np.int32)
    if row_runs and rows:
        elements, offsets = _pad_lane_runs(elements, lane_major.sum(axis=(1, 3)), VALUES_PER_U32[value_type])
    if rows == 0:
        offsets = np.zeros(1, dtype=np.int32)
        mask = np.zeros((1, WARP), dtype=np.uint32)
    return LaneArrays(
        mask=np.ascontiguousarray(mask),
        words=words32(_element_bytes(elements, value_type)),
        row_offsets=offsets,
        scales=kernel_scales(value_type, scales, rows),
    )


def make_kernel(
    value_type: str,
    cols: int,
    batch: int,
    activation: str | None,
    has_bias: bool,
    group_size: int,
    warps: int = WARPS_PER_BLOCK,
):
    """A ``@cuda.jit`` kernel specialized on value type, ``cols``, batch bucket and epilogue.

    Launch with ``block = 32 * warps`` and any grid (blocks loop over row groups) as
    ``kernel[grid, block, stream](y, x, m, rows, mask, words, row_offsets, scales, bias)``:
    ``x`` float32/float16 ``[m, cols]`` (``1 <= m <= batch``) when the kernel stages it
    (:func:`stages_x`), else ``[cols, batch]`` with zero columns past ``m``; ``y`` ``[m, rows]``
    of x's dtype, the weight arrays from :func:`prepare_arrays`, ``bias`` float32 ``[rows]``
    (any float32 array when ``has_bias`` is false).
    """
    vt = VALUE_CODES[value_type]
    per_u32 = VALUES_PER_U32[value_type]
    vshift = np.uint32(int(math.log2(per_u32)))
    vmask = np.uint32(per_u32 - 1)
    field_bits = 32 // per_u32
    field_shift = np.uint32(field_bits % 32)  # fp32: one value a word, never shifted
    cols_p = padded_cols(cols)
    ntiles = cols_p // TILE_COLS
    stage = stages_x(cols, batch)
    xs_len = batch * cols_p if stage else 1
    finish = make_epilogue(batch, value_type, has_bias, activation)
    stage_x = make_stage_x(cols, batch, warps * WARP)
    add_x = make_add_x(cols, batch)
    gsize = int(group_size)
    warps = int(warps)
    one = np.uint32(1)
    zero_u = np.uint32(0)
    dequant_low = make_dequant_low(value_type)

    @jit_kernel
    def kernel(y, x, m, rows, mask, words, row_offsets, scales, bias):
        tid = cuda.threadIdx.x
        warp = tid // WARP
        lane = tid % WARP
        scan_scratch = cuda.shared.array((warps, WARP), np.int32)
        sum_scratch = cuda.shared.array((warps, WARP), np.float32)
        xs = cuda.shared.array(xs_len, np.float32)
        last = m - 1
        if stage:
            stage_x(xs, x, tid, last)
        acc = cuda.local.array(batch, np.float32)
        groups = (rows + warps - 1) // warps
        # Every warp of a block runs the same row groups and tiles, even past the last row:
        # the collectives inside must be reached by the whole block (see device.py).
        g = cuda.blockIdx.x
        while g < groups:
            row = g * warps + warp
            live = row < rows
            for b in range(batch):
                acc[b] = np.float32(0.0)
            start = np.int32(row_offsets[row]) if live else np.int32(0)
            upcoming = mask[row, lane] if live else zero_u
            # int4: the row's group scales as a 1-D view (one index a value, not a 2-D one)
            row_scales = scales[row] if vt == 4 and live else scales[0]
            for t in range(ntiles):
                word = upcoming
                # The next tile's word is loaded a tile ahead: its latency overlaps this tile.
                if live and t + 1 < ntiles:
                    upcoming = mask[row, (t + 1) * WARP + lane]
                count = np.int32(cuda.popc(word))
                before, total = warp_scan(count, lane, scan_scratch[warp])
                # Index arithmetic stays 32-bit and unsigned (no wraparound code for indices).
                kk = np.uint32(start + before)
                rest = word
                # Column of bit position p (1-based, from ffs): tile start + lane + 32 (p - 1).
                col_base = np.int32(t * TILE_COLS + lane - 32)
                # ``cur`` holds the current value word shifted so its next value is the low field.
                cur = zero_u
                if rest != zero_u:
                    cur = np.uint32(words[kk >> vshift] >> np.uint32((kk & vmask) * field_bits))
                while rest != zero_u:
                    if (kk & vmask) == zero_u:
                        cur = words[kk >> vshift]
                    pos = np.int32(cuda.ffs(rest))
                    rest = np.uint32(rest & np.uint32(rest - one))
                    col = np.uint32(col_base + (pos << 5))
                    v = dequant_low(cur)
                    cur = np.uint32(cur >> field_shift)
                    if vt == 4:
                        v *= row_scales[col // gsize]
                    add_x(acc, v, xs, x, col)
                    kk = np.uint32(kk + one)
                start = np.int32(start + total)
            finish(y, acc, m, row, live, lane, scales, bias, sum_scratch[warp])
            g += cuda.gridDim.x

    return kernel


def make_runs_kernel(
    value_type: str,
    cols: int,
    batch: int,
    activation: str | None,
    has_bias: bool,
    group_size: int,
    warps: int = WARPS_PER_BLOCK,
):
    """The ``runs`` design: the lane-word kernel with one walk per row, a value word at a time.

    Why. On an H200 the lane-word kernel is bound by instruction issue (a variant that waited
    less on memory but issued ~30% more instructions a value was 14-39% slower). Two costs
    dominate its walk, and this design removes both:

    * lane imbalance: ``lanes`` walks a row tile by tile and the lanes reconverge after every
      tile, so a row costs the sum over tiles of the fullest lane's bit count (1.66x the mean
      at 75% sparsity and 4096 columns). Here each lane walks all of its row's words in one
      loop: a row costs the fullest lane's count over the row (1.33x), and one warp scan a row
      replaces one a tile;
    * the per-value test for the next value word (six instructions issued on every value,
      predicated off on most): each lane's run starts at a word (the ``row_runs`` layout of
      :func:`prepare_arrays` pads runs to whole words), so the walk loads one word and takes
      its values in a fully unrolled step; only the run's last word tests which values exist.

    Same launch and arguments as :func:`make_kernel`, with the ``row_runs`` arrays.
    """
    vt = VALUE_CODES[value_type]
    per_u32 = VALUES_PER_U32[value_type]
    vshift = np.uint32(int(math.log2(per_u32)))
    vmask = np.uint32(per_u32 - 1)
    field_shift = np.uint32((32 // per_u32) % 32)  # fp32: one value a word, never shifted
    cols_p = padded_cols(cols)
    ntiles = cols_p // TILE_COLS
    last_tile = np.uint32(ntiles - 1)
    stage = stages_x(cols, batch)
    xs_len = batch * cols_p if stage else 1
    finish = make_epilogue(batch, value_type, has_bias, activation)
    stage_x = make_stage_x(cols, batch, warps * WARP)
    add_x = make_add_x(cols, batch)
    gsize = int(group_size)
    warps = int(warps)
    one = np.uint32(1)
    zero_u = np.uint32(0)
    dequant_low = make_dequant_low(value_type)

    @cuda.jit(device=True, inline=True)
    def take(acc, rest, upcoming, tile, col_base, cur, mask, row, lane, xs, x, row_scales):
        """Multiply the low value of ``cur`` by ``x`` at the lane's next set bit, moving to the
        next non-empty mask word first when this one is spent (one is left: the caller knows).
        Returns the walk's state: ``(rest, upcoming, tile, col_base, cur)``."""
        while rest == zero_u:
            tile = np.uint32(tile + one)
            rest = upcoming
            col_base = np.int32(col_base + TILE_COLS)
            upcoming = mask[row, min(np.uint32(tile + one), last_tile) * WARP + lane]
        pos = np.int32(cuda.ffs(rest)) - np.int32(1)
        rest = np.uint32(rest & np.uint32(rest - one))
        col = np.uint32(col_base + (pos << 5))
        v = dequant_low(cur)
        if vt == 4:
            v *= row_scales[col // gsize]
        add_x(acc, v, xs, x, col)
        return rest, upcoming, tile, col_base, np.uint32(cur >> field_shift)

    @jit_kernel
    def kernel(y, x, m, rows, mask, words, row_offsets, scales, bias):
        tid = cuda.threadIdx.x
        warp = tid // WARP
        lane = tid % WARP
        scan_scratch = cuda.shared.array((warps, WARP), np.int32)
        sum_scratch = cuda.shared.array((warps, WARP), np.float32)
        xs = cuda.shared.array(xs_len, np.float32)
        last = m - 1
        if stage:
            stage_x(xs, x, tid, last)
        acc = cuda.local.array(batch, np.float32)
        groups = (rows + warps - 1) // warps
        # Every warp of a block runs the same row groups, even past the last row: the
        # collectives inside must be reached by the whole block (see device.py).
        g = cuda.blockIdx.x
        while g < groups:
            row = g * warps + warp
            live = row < rows
            for b in range(batch):
                acc[b] = np.float32(0.0)
            start = np.uint32(row_offsets[row]) if live else zero_u
            # The lane's bit count over the row: its words' loads are independent, all in flight.
            count = np.int32(0)
            if live:
                for t in range(ntiles):
                    count += np.int32(cuda.popc(mask[row, t * WARP + lane]))
            nwords = (np.uint32(count) + vmask) >> vshift
            before, _ = warp_scan(np.int32(nwords), lane, scan_scratch[warp])
            # Index arithmetic stays 32-bit and unsigned (no wraparound code for indices).
            w = np.uint32((start >> vshift) + np.uint32(before))
            wend = np.uint32(w + nwords)
            rest = zero_u
            upcoming = zero_u
            if live:
                rest = mask[row, lane]
                upcoming = mask[row, min(one, last_tile) * WARP + lane]
            tile = zero_u
            col_base = np.int32(lane)  # column of the current mask word's bit 0
            # int4: the row's group scales as a 1-D view, so a value's scale costs one index
            # (a 2-D index recomputed the 64-bit row offset on every value)
            row_scales = scales[row] if vt == 4 and live else scales[0]
            # Every word but the run's last holds ``per_u32`` values: no test of which exist.
            while np.uint32(w + one) < wend:
                cur = words[w]
                for _ in range(per_u32):
                    rest, upcoming, tile, col_base, cur = take(acc, rest, upcoming, tile, col_base, cur,
                                                               mask, row, lane, xs, x, row_scales)
                w = np.uint32(w + one)
            if w < wend:  # the last word: ``left`` values, the rest is padding
                left = count - np.int32((nwords - one) << vshift)
                cur = words[w]
                for e in range(per_u32):
                    if e < left:
                        rest, upcoming, tile, col_base, cur = take(acc, rest, upcoming, tile, col_base, cur,
                                                                   mask, row, lane, xs, x, row_scales)
            finish(y, acc, m, row, live, lane, scales, bias, sum_scratch[warp])
            g += cuda.gridDim.x

    return kernel
