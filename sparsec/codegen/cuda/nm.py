"""CUDA kernels for the ``nm`` format (N:M structured sparsity, 2:4 first of all).

An N:M row stores exactly ``K = cols / M * N`` values, so row ``r``'s values are the fixed run
``[r*K, (r+1)*K)`` and no decode of counts is needed: the value ``j`` of a row belongs to group
``j // N`` and sits at column ``(j // N) * M + pos_j``, ``pos_j`` being field ``j`` of the row's
position bit stream (``B = ceil(log2 M)`` bits a field, least significant bit first).

Work split as in the bitmask kernels: one warp per output row, four rows a block; lanes read
the row's values 16 bytes at a time (lane ``l`` takes the ``l``-th aligned piece, so a warp reads
512 contiguous bytes a step), take each value's position from the row's position words (32 bits
hold 16 positions of a 2:4 row, so neighbouring values hit the same word in L1), dequantize in
registers and multiply with ``x[b, col]``; a warp reduction and the epilogue end the row.

Host side, the stored tensors are repacked once without changing a value: values padded to whole
16-byte pieces, each row's position bytes padded to whole 32-bit words plus one spare word (a
field may straddle two words when ``32 % B != 0``, e.g. 3-bit fields of 4:8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sparsec.codegen.cuda.device import WARP, cuda, jit_kernel, load_u64x2, make_epilogue
from sparsec.codegen.cuda.values import VALUE_CODES, VALUES_PER_WORD, kernel_scales, make_dequant, pad_to_pieces

WARPS_PER_BLOCK = 4


def index_bits(m: int) -> int:
    """Bits per stored in-group position (the ``nm`` format's rule)."""
    return max(1, (m - 1).bit_length())


@dataclass(frozen=True)
class NmDeviceArrays:
    """Host arrays in the layout the kernel reads (moved to the device by the caller)."""

    positions: np.ndarray  # uint32 [rows, ceil(K*B/32) + 1]
    words: np.ndarray  # uint64: values padded to whole 16-byte pieces
    scales: np.ndarray  # float32 [rows, G] (int8: G=1; float types: [1, 1], unused)


def prepare_arrays(
    rows: int, cols: int, n: int, m: int, value_type: str, values: np.ndarray, indices: np.ndarray, scales
) -> NmDeviceArrays:
    """Repack the stored ``nm`` tensors (``values`` as bytes of any dtype, ``indices`` uint8)."""
    k = cols // m * n
    nwords = math.ceil(k * index_bits(m) / 32) + 1
    pos = np.zeros((max(rows, 1), nwords * 4), dtype=np.uint8)
    pos[:rows, : indices.shape[1]] = indices
    # Little-endian bytes as uint32: field j's bits stay at bit offset j*B of the row's stream.
    positions = pos.view("<u4").astype(np.uint32)
    return NmDeviceArrays(
        positions=positions, words=pad_to_pieces(values), scales=kernel_scales(value_type, scales, rows)
    )


def make_kernel(
    value_type: str,
    cols: int,
    n: int,
    m: int,
    batch: int,
    activation: str | None,
    has_bias: bool,
    group_size: int,
    warps: int = WARPS_PER_BLOCK,
):
    """A ``@cuda.jit`` N:M kernel specialized on value type, shape, N:M, batch bucket and epilogue.

    Launch as ``kernel[ceil(rows/4), 128, stream](y, x, m, rows, positions, words, scales, bias)``
    with the arrays of :func:`prepare_arrays` (same ``x``/``y``/``bias`` contract as the bitmask
    kernels).
    """
    vt = VALUE_CODES[value_type]
    per_word = VALUES_PER_WORD[value_type]
    per_piece = 2 * per_word
    k_row = cols // m * n
    bits = index_bits(m)
    field_mask = np.uint64((1 << bits) - 1)
    straddles = 32 % bits != 0
    group_n, group_m = n, m
    finish = make_epilogue(batch, value_type, has_bias, activation)
    gsize = int(group_size)
    warps = int(warps)  # rows (warps) per block, a tuning knob
    dequant = make_dequant(value_type)

    @cuda.jit(device=True, inline=True)
    def column_of(positions, row, j):
        """Dense column of the row's stored value ``j``."""
        bit = np.uint32(j * bits)
        word = np.uint64(positions[row, bit // 32])
        if straddles:
            word |= np.uint64(positions[row, bit // 32 + 1]) << np.uint64(32)
        field = (word >> np.uint64(bit % 32)) & field_mask
        return np.int32(j // group_n) * group_m + np.int32(field)

    @cuda.jit(device=True, inline=True)
    def fma_piece(acc, lo, hi, first, j_lo, j_hi, positions, row, x, last, scales):
        """``acc[b] += w_j * x[b, col_j]`` for values ``first + j``, ``j`` in ``[j_lo, j_hi)``."""
        for h in range(2):
            w = lo if h == 0 else hi
            for e in range(per_word):
                j = h * per_word + e
                if j >= j_lo and j < j_hi:
                    col = column_of(positions, row, np.uint32(first + j))
                    v = dequant(w, e)
                    if vt == 4:
                        v *= scales[row, col // gsize]
                    for b in range(batch):
                        acc[b] += v * np.float32(x[min(b, last), col])

    @jit_kernel
    def kernel(y, x, m, rows, positions, words, scales, bias):
        tid = cuda.threadIdx.x
        warp = tid // WARP
        lane = tid % WARP
        row = cuda.blockIdx.x * warps + warp
        live = row < rows
        sum_scratch = cuda.shared.array((warps, WARP), np.float32)
        acc = cuda.local.array(batch, np.float32)
        for b in range(batch):
            acc[b] = np.float32(0.0)
        last = m - 1
        if live and k_row > 0:
            start = row * k_row
            end = start + k_row
            piece = start // per_piece + lane
            last_piece = (end - 1) // per_piece
            zero = np.uint64(0)
            lo = zero
            hi = zero
            if piece <= last_piece:
                lo, hi = load_u64x2(words, piece)
            while piece <= last_piece:
                # The next piece is loaded before this one is used: two loads in flight a lane.
                following = piece + WARP
                next_lo = zero
                next_hi = zero
                if following <= last_piece:
                    next_lo, next_hi = load_u64x2(words, following)
                first = piece * per_piece - start
                if first >= 0 and first + per_piece <= k_row:
                    fma_piece(acc, lo, hi, first, 0, per_piece, positions, row, x, last, scales)
                else:
                    fma_piece(acc, lo, hi, first, -first, k_row - first, positions, row, x, last, scales)
                lo = next_lo
                hi = next_hi
                piece = following
        # Reached by every warp of the block, live or not (see device.py).
        finish(y, acc, m, row, live, lane, scales, bias, sum_scratch[warp])

    return kernel
