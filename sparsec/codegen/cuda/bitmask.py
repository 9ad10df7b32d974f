"""CUDA kernels for the ``bitmask`` format: ``y = act(x @ W^T + bias)`` for batch 1 to 16.

Work split: one warp per output row, ``WARPS_PER_BLOCK`` rows a block. A warp walks its row in
tiles of 2048 columns, one 64-bit mask word per lane:

1. decode: each lane loads its mask word (the warp reads 256 contiguous bytes), counts its
   kept columns (``popc``), and one warp scan turns the counts into each lane's offset among
   the tile's kept values; the lane then writes the column of each of its kept values into a
   per-warp shared-memory list, in value order (the layout's row-major order);
2. multiply: the tile's values are a contiguous run of ``compressed`` (``row_offsets`` gives
   the row start, the scan total the tile length). Lanes read that run 16 bytes at a time, lane
   ``l`` taking the ``l``-th 16-byte piece, so a warp's loads cover 512 contiguous bytes. Each
   value is dequantized in registers (fp16/bf16 widened, int8/int4 sign-extended) and
   multiplied with ``x[b, col]`` for every batch row, its column read from the shared list;
3. epilogue: a warp reduction per batch row, then the int8 row scale, bias and activation.

Bytes moved per row are the stored bytes (mask + values + one offset, plus scales for int4)
and ``x`` (shared by all rows, so it stays in L1/L2). The 16-byte pieces are aligned, so the
first and last piece of a tile may straddle its neighbours: those are loaded twice (from L1)
and the values outside the tile are skipped.

Host side, the packed weight is repacked once, without changing a value: the mask rows are
padded to whole 64-bit words and ``compressed`` is padded to whole 16-byte pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sparsec.codegen.cuda.device import (
    WARP,
    cuda,
    jit_kernel,
    load_u64x2,
    make_epilogue,
    warp_scan,
    warp_sync,
)
from sparsec.codegen.cuda.values import (
    BATCH_BUCKETS,
    VALUE_CODES,
    VALUES_PER_WORD,
    kernel_scales,
    make_dequant,
    pad_to_pieces,
)

#: Rows (warps) per thread block. Four warps keep a block small enough for many to be resident.
WARPS_PER_BLOCK = 4
#: Mask words per tile: one per lane.
TILE_WORDS = WARP
TILE_COLS = TILE_WORDS * 64
MAX_BATCH = BATCH_BUCKETS[-1]


def batch_bucket(m: int) -> int:
    """The smallest specialized batch size that holds ``m`` (1 <= m <= 16) rows."""
    for b in BATCH_BUCKETS:
        if m <= b:
            return b
    raise ValueError(f"batch {m} exceeds the largest kernel batch {MAX_BATCH}; split it")


@dataclass(frozen=True)
class BitmaskDeviceArrays:
    """Host arrays in the layout the kernel reads (moved to the device by the caller)."""

    mask: np.ndarray  # uint64 [rows, ceil(cols/64)]
    words: np.ndarray  # uint64 [2 * pieces]: compressed, padded to whole 16-byte pieces
    row_offsets: np.ndarray  # int64 [rows]
    scales: np.ndarray  # float32 [rows, G] (int8: G=1; float types: [1, 1], unused)


def prepare_arrays(
    rows: int,
    cols: int,
    value_type: str,
    values: np.ndarray,
    bitmask: np.ndarray,
    row_offsets: np.ndarray,
    scales: np.ndarray | None,
) -> BitmaskDeviceArrays:
    """Repack the stored bitmask tensors for the kernel; no value is changed.

    ``values`` is the ``compressed`` tensor as numpy (any dtype: only its bytes are used),
    ``bitmask`` uint8 ``[rows, ceil(cols/8)]``, ``row_offsets`` int64 ``[rows]``.
    """
    nwords = math.ceil(cols / 64)
    mask_bytes = np.zeros((max(rows, 1), max(nwords, 1) * 8), dtype=np.uint8)
    mask_bytes[:rows, : bitmask.shape[1]] = bitmask
    # The format numbers bits little-endian within a byte and bytes in column order, so the
    # bytes read as a little-endian uint64 put column 64*w + j at bit j of word w.
    mask = mask_bytes.view("<u8").astype(np.uint64)
    words = pad_to_pieces(values)
    offsets = np.ascontiguousarray(row_offsets, dtype=np.int64).reshape(-1)
    if rows == 0:
        offsets = np.zeros(1, dtype=np.int64)
    sc = kernel_scales(value_type, scales, rows)
    return BitmaskDeviceArrays(mask=mask, words=words, row_offsets=offsets, scales=sc)


def make_kernel(
    value_type: str,
    cols: int,
    batch: int,
    activation: str | None,
    has_bias: bool,
    group_size: int,
    warps: int = WARPS_PER_BLOCK,
):
    """A ``@cuda.jit`` kernel specialized on its value type, ``cols``, batch bucket and epilogue.

    ``warps``: rows (warps) per block, a tuning knob (``benchmarks/gpu_kernels.py --warps``).
    Launch with ``grid = ceil(rows / warps)``, ``block = 32 * warps`` as
    ``kernel[grid, block, stream](y, x, m, rows, mask, words, row_offsets, scales, bias)``:
    ``x`` float32/float16 ``[m, cols]`` (``1 <= m <= batch``), ``y`` ``[m, rows]`` of x's dtype,
    the weight arrays from :func:`prepare_arrays`, ``bias`` float32 ``[rows]`` (any float32
    array when ``has_bias`` is false).
    """
    vt = VALUE_CODES[value_type]
    per_word = VALUES_PER_WORD[value_type]
    per_piece = 2 * per_word
    nwords = math.ceil(cols / 64)
    ntiles = math.ceil(nwords / TILE_WORDS)
    # Shared column lists: 2 bytes a column while every column number fits, 4 beyond that.
    idx_dtype = np.uint16 if cols <= 65536 else np.int32
    finish = make_epilogue(batch, value_type, has_bias, activation)
    gsize = int(group_size)
    warps = int(warps)
    tile_cols = TILE_COLS
    tile_words = TILE_WORDS
    one = np.uint64(1)

    dequant = make_dequant(value_type)

    @cuda.jit(device=True, inline=True)
    def fma_piece(acc, lo, hi, first, j_lo, j_hi, seen, x, last, scales, row):
        """``acc[b] += w_k * x[b, col_k]`` for the values ``j`` in ``[j_lo, j_hi)`` of a 16-byte piece.

        ``first`` is the piece's first value's index within the tile, so value ``j`` sits in
        column ``seen[first + j]``.
        """
        for h in range(2):
            w = lo if h == 0 else hi
            for e in range(per_word):
                j = h * per_word + e
                if j >= j_lo and j < j_hi:
                    col = seen[np.uint32(first + j)]  # unsigned: no negative-index wraparound code
                    v = dequant(w, e)
                    if vt == 4:
                        v *= scales[row, col // gsize]
                    for b in range(batch):
                        acc[b] += v * np.float32(x[min(b, last), col])

    @jit_kernel
    def kernel(y, x, m, rows, mask, words, row_offsets, scales, bias):
        tid = cuda.threadIdx.x
        warp = tid // WARP
        lane = tid % WARP
        row = cuda.blockIdx.x * warps + warp
        live = row < rows
        cols_seen = cuda.shared.array((warps, tile_cols), idx_dtype)
        scan_scratch = cuda.shared.array((warps, WARP), np.int32)
        sum_scratch = cuda.shared.array((warps, WARP), np.float32)
        acc = cuda.local.array(batch, np.float32)
        for b in range(batch):
            acc[b] = np.float32(0.0)
        last = m - 1
        start = row_offsets[row] if live else row_offsets[0]
        # Every warp runs the same number of tiles even past the last row: the collectives
        # inside must be reached by the whole block (see device.py).
        # Loads are issued one step ahead of their use (the next tile's mask word, the next
        # 16-byte piece), so each lane keeps two loads in flight instead of waiting on each.
        zero = np.uint64(0)
        pieces = words.shape[0] // 2
        next_word = zero
        if live and lane < nwords:
            next_word = mask[row, lane]
        for t in range(ntiles):
            word = next_word
            wi = t * tile_words + lane
            next_word = zero
            if live and wi + tile_words < nwords:
                next_word = mask[row, wi + tile_words]
            # The tile's first pieces start where the last tile ended, known before the scan:
            # load them now (speculatively; pieces past the tile are never used) so that their
            # memory latency overlaps the scan and the column decode.
            piece = start // per_piece + lane
            lo = zero
            hi = zero
            if live and piece < pieces:
                lo, hi = load_u64x2(words, piece)
            count = np.int32(cuda.popc(word))
            before, total = warp_scan(count, lane, scan_scratch[warp])
            end = start + total
            last_piece = (end - 1) // per_piece if total > 0 else piece - 1
            seen = cols_seen[warp]
            pos = before
            col0 = wi * 64
            rest = word
            while rest != 0:
                low = rest & (~rest + one)
                seen[np.uint32(pos)] = col0 + np.int32(cuda.popc(low - one))
                pos += 1
                rest ^= low
            warp_sync()
            while piece <= last_piece:
                following = piece + WARP
                next_lo = zero
                next_hi = zero
                if following <= last_piece:
                    next_lo, next_hi = load_u64x2(words, following)
                first = piece * per_piece - start  # position of the piece in the tile
                if first >= 0 and first + per_piece <= total:
                    # Interior piece: constant bounds, so every check folds away.
                    fma_piece(acc, lo, hi, first, 0, per_piece, seen, x, last, scales, row)
                else:
                    fma_piece(acc, lo, hi, first, -first, total - first, seen, x, last, scales, row)
                lo = next_lo
                hi = next_hi
                piece = following
            warp_sync()
            start = end
        finish(y, acc, m, row, live, lane, scales, bias, sum_scratch[warp])

    return kernel
