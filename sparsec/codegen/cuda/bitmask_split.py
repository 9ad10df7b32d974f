"""CUDA kernels for the ``bitmask`` format, split design: even value shares, columns by select.

Why a third design. On an H200 the lane-word kernel (``bitmask_lanes.py``) took about the same
time for fp16, int8 and int4 values: it is bound by instructions per kept value, not by bytes.
Two costs dominate it: every lane walks the set bits of its own mask word, so a tile takes as
many steps as its fullest lane (about 1.6x the mean at 75% sparsity), and each step carries a
loop test and a check for the next value word. This design gives every lane the same work:

* the weight layout is the lane-word one (the tile's mask transposed so lane ``l``'s word holds
  columns ``32 j + l``; values stored word by word in that order), and ``x`` is staged in shared
  memory the same way, so the shared reads stay nearly conflict-free;
* the tile's values are read as aligned 16-byte pieces, one per lane per round (8 fp16/bf16,
  16 int8 or 32 int4 values a piece), like the warp-tile kernel's coalesced loads;
* a lane finds the first value of its piece by a binary search over the warp's prefix counts
  (five shuffles), skips to it within that word, then walks the next set bits, moving to the
  next word when one is spent. The piece's values sit in registers and are taken by constant
  index in a fully unrolled loop: no per-value loop test, no per-value load.

Launch: as the lane-word kernel (persistent blocks of ``warps`` rows, ``block = 32 * warps``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sparsec.codegen.cuda import bitmask_lanes
from sparsec.codegen.cuda.device import (
    SIMULATOR,
    WARP,
    cuda,
    jit_kernel,
    load_u64x2,
    make_epilogue,
    warp_read,
    warp_scan,
    warp_sync,
)
from sparsec.codegen.cuda.values import VALUE_CODES, VALUES_PER_WORD, make_dequant, pad_to_pieces

TILE_COLS = bitmask_lanes.TILE_COLS
WARPS_PER_BLOCK = bitmask_lanes.WARPS_PER_BLOCK


def prepare_arrays(rows, cols, value_type, values, bitmask, row_offsets, scales) -> bitmask_lanes.LaneArrays:
    """The lane-word layout (see ``bitmask_lanes.prepare_arrays``) with the values as 16-byte
    pieces (``words``: uint64, two a piece, plus a spare piece)."""
    lanes = bitmask_lanes.prepare_arrays(rows, cols, value_type, values, bitmask, row_offsets, scales)
    return dataclasses.replace(lanes, words=pad_to_pieces(lanes.words.view(np.uint8)))


def shared_bytes(cols: int, batch: int, warps: int) -> int:
    """Shared memory one block uses on a GPU: the lane-word kernel's, plus each warp's copy of
    the tile's mask words and a sentinel."""
    return bitmask_lanes.shared_bytes(cols, batch, warps) + warps * (WARP + 1) * 4


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
    ``kernel[grid, block, stream](y, x, m, rows, mask, pieces, row_offsets, scales, bias)``:
    ``x`` float32/float16 ``[m, cols]`` (``1 <= m <= batch``), ``y`` ``[m, rows]`` of x's dtype,
    the weight arrays from :func:`prepare_arrays`, ``bias`` float32 ``[rows]`` (any float32
    array when ``has_bias`` is false).
    """
    vt = VALUE_CODES[value_type]
    per_word = VALUES_PER_WORD[value_type]
    per_piece = 2 * per_word
    cols_p = bitmask_lanes.padded_cols(cols)
    ntiles = cols_p // TILE_COLS
    stage = bitmask_lanes.stages_x(cols, batch)
    xs_len = batch * cols_p if stage else 1
    finish = make_epilogue(batch, value_type, has_bias, activation)
    stage_x = bitmask_lanes.make_stage_x(cols, batch, warps * WARP)
    read_x = bitmask_lanes.make_read_x(cols, batch)
    gsize = int(group_size)
    warps = int(warps)
    one = np.uint32(1)
    zero_u = np.uint32(0)
    zero64 = np.uint64(0)
    dequant = make_dequant(value_type)
    words_row = WARP + 1  # the tile's 32 words and a sentinel (see shared_bytes)

    @cuda.jit(device=True, inline=True)
    def take_value(acc, lo, hi, e, cur, w, words_s, col0, xs, x, last, scales, row):
        """Multiply the piece's value ``e`` by ``x`` at the next set bit; return ``(cur, w)``
        moved past that bit (to the next non-empty word when this one is spent)."""
        while cur == zero_u:
            w += 1
            cur = words_s[np.uint32(w)]
        pos = np.int32(cuda.ffs(cur)) - np.int32(1)
        cur = np.uint32(cur & np.uint32(cur - one))
        col = np.uint32(col0 + pos * np.int32(32) + w)
        v = dequant(lo if e < per_word else hi, e % per_word)
        if vt == 4:
            v *= scales[row, col // gsize]
        for b in range(batch):
            acc[b] += v * read_x(xs, x, b, last, col)
        return cur, w

    @jit_kernel
    def kernel(y, x, m, rows, mask, pieces, row_offsets, scales, bias):
        tid = cuda.threadIdx.x
        warp = tid // WARP
        lane = tid % WARP
        scan_scratch = cuda.shared.array((warps, WARP), np.int32)
        read_scratch = cuda.shared.array((warps, WARP), np.int32)
        sum_scratch = cuda.shared.array((warps, WARP), np.float32)
        words_all = cuda.shared.array((warps, words_row), np.uint32)
        xs = cuda.shared.array(xs_len, np.float32)
        block_rounds = cuda.shared.array(1, np.int32)  # the simulator's only
        last = m - 1
        if stage:
            stage_x(xs, x, tid, last)
        acc = cuda.local.array(batch, np.float32)
        words_s = words_all[warp]
        npieces_all = pieces.shape[0] // 2
        groups = (rows + warps - 1) // warps
        # Every warp of a block runs the same row groups, tiles and rounds, even past the last
        # row: the collectives inside must be reached by the whole block (see device.py).
        g = cuda.blockIdx.x
        while g < groups:
            row = g * warps + warp
            live = row < rows
            for b in range(batch):
                acc[b] = np.float32(0.0)
            start = np.int32(row_offsets[row]) if live else np.int32(0)
            upcoming = mask[row, lane] if live else zero_u
            for t in range(ntiles):
                word = upcoming
                if live and t + 1 < ntiles:
                    upcoming = mask[row, (t + 1) * WARP + lane]
                count = np.int32(cuda.popc(word))
                before, total = warp_scan(count, lane, scan_scratch[warp])
                words_s[lane] = word
                if lane == 0:
                    words_s[WARP] = one  # a sentinel: the walk never runs past the last word
                warp_sync()
                col0 = np.int32(t * TILE_COLS)
                first_piece = start // per_piece
                last_piece = (start + total - 1) // per_piece
                rounds = (last_piece - first_piece + WARP) // WARP if total > 0 else 0
                if SIMULATOR:
                    # The simulator's collectives synchronise the whole block, so every warp runs
                    # the block's largest round count (a GPU's shuffles need only the warp's own).
                    if tid == 0:
                        block_rounds[0] = 0
                    cuda.syncthreads()
                    if lane == 0:
                        cuda.atomic.max(block_rounds, 0, rounds)
                    cuda.syncthreads()
                    rounds = block_rounds[0]
                    cuda.syncthreads()
                for rnd in range(rounds):
                    piece = first_piece + rnd * WARP + lane
                    active = live and piece <= last_piece
                    lo = zero64
                    hi = zero64
                    if active and piece < npieces_all:
                        lo, hi = load_u64x2(pieces, piece)
                    f = np.int32(piece * per_piece - start)  # tile index of the piece's first value
                    v0 = max(f, np.int32(0))
                    # The owner of value v0: the last word whose prefix count is <= v0.
                    w = np.int32(0)
                    bw = np.int32(0)
                    step = 16
                    while step > 0:
                        probe_before = warp_read(before, w + step, lane, read_scratch[warp])
                        if probe_before <= v0:
                            w += step
                            bw = probe_before
                        step //= 2
                    e_lo = np.int32(0) if f >= 0 else -f
                    e_hi = min(np.int32(per_piece), total - f)
                    if not active:
                        e_hi = np.int32(0)
                    cur = words_s[np.uint32(w)]
                    skip = v0 - bw if active else np.int32(0)
                    for _ in range(skip):
                        cur = np.uint32(cur & np.uint32(cur - one))
                    if e_lo == 0 and e_hi == per_piece:
                        for e in range(per_piece):  # interior piece: no bounds to test
                            cur, w = take_value(acc, lo, hi, e, cur, w, words_s, col0, xs, x, last, scales, row)
                    else:
                        for e in range(per_piece):
                            if e >= e_lo and e < e_hi:
                                cur, w = take_value(acc, lo, hi, e, cur, w, words_s, col0, xs, x, last, scales,
                                                    row)
                warp_sync()  # words_s is rewritten by the next tile
                start = np.int32(start + total)
            finish(y, acc, m, row, live, lane, scales, bias, sum_scratch[warp])
            g += cuda.gridDim.x

    return kernel

