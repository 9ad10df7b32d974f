"""Stored values in registers: the dequantization every CUDA kernel here shares.

Kernels read stored values 16 bytes at a time as two uint64 words (see ``device.load_u64x2``);
:func:`make_dequant` returns the device function that takes value ``e`` out of such a word, in
the layout of :mod:`sparsec.formats.values`: fp32/fp16/bf16 bit patterns, int8 levels, or int4
levels two a byte (value ``2k`` in the low nibble), all little-endian, so value ``e`` of a word
sits at bits ``e * (64 / per_word)`` upwards.
"""

from __future__ import annotations

import numpy as np

from sparsec.codegen.cuda.device import bits_to_f32, cuda, half_bits_to_f32

#: Stored values per 64-bit word, by value type.
VALUES_PER_WORD = {"fp32": 2, "bf16": 4, "fp16": 4, "int8": 8, "int4": 16}
#: Stored values per 32-bit word, by value type (half a 64-bit word's).
VALUES_PER_U32 = {vt: n // 2 for vt, n in VALUES_PER_WORD.items()}
#: Value types as the small integers the kernels branch on (compile-time constants).
VALUE_CODES = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3, "int4": 4}
#: Batch sizes a kernel is specialized for; a batch runs in the smallest bucket that holds it.
BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16)


def make_dequant(value_type: str):
    """Device function ``dequant(word, e) -> float32``: value ``e`` of a uint64 word.

    Float types give the value; int8/int4 give the signed level (the caller applies scales).
    """
    code = VALUE_CODES[value_type]
    field_bits = 64 // VALUES_PER_WORD[value_type]
    field_mask = np.uint64((1 << field_bits) - 1)

    @cuda.jit(device=True, inline=True)
    def dequant(word, e):
        field = (word >> np.uint64(field_bits * e)) & field_mask
        if code == 0:
            return bits_to_f32(field)
        if code == 1:
            return bits_to_f32(field << np.uint64(16))
        if code == 2:
            return half_bits_to_f32(field)
        q = np.int32(field)
        if code == 3:
            q -= (q & 0x80) << 1  # sign-extend 8 bits
        else:
            q -= (q & 0x8) << 1  # sign-extend 4 bits
        return np.float32(q)

    return dequant


#: Float32 ``2**23``: OR-ing an 8- or 4-bit field into its mantissa and subtracting gives the
#: field exactly, with no integer-to-float conversion instruction.
_MAGIC_BITS = np.uint32(0x4B000000)


def make_dequant_low(value_type: str):
    """Device function ``dequant(word) -> float32``: the value in the low field of a uint32 word.

    Float types give the value; int8/int4 give the signed level (the caller applies scales).
    Signed levels are decoded by bit arithmetic: flipping the sign bit turns a two's complement
    field into an offset one, which the float32 ``2**23 + field`` holds exactly.
    """
    code = VALUE_CODES[value_type]
    field_bits = 32 // VALUES_PER_U32[value_type]
    field_mask = np.uint32((1 << field_bits) - 1) if field_bits < 32 else np.uint32(0xFFFFFFFF)
    sign = np.uint32(1 << (field_bits - 1))
    bias = np.float32(2.0**23 + (1 << (field_bits - 1)))
    sixteen = np.uint32(16)

    @cuda.jit(device=True, inline=True)
    def dequant(word):
        if code == 0:
            return bits_to_f32(word)
        field = np.uint32(word & field_mask)
        if code == 1:
            return bits_to_f32(np.uint32(field << sixteen))
        if code == 2:
            return half_bits_to_f32(field)
        return bits_to_f32(np.uint32(_MAGIC_BITS | np.uint32(field ^ sign))) - bias

    return dequant


def words32(raw: np.ndarray) -> np.ndarray:
    """Bytes of stored values as little-endian uint32 words, the last one zero-padded (a kernel
    reads a word only for a value it holds)."""
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    padded = np.zeros(max(1, -(-raw.size // 4)) * 4, dtype=np.uint8)
    padded[: raw.size] = raw
    return padded.view("<u4").astype(np.uint32)


def pad_to_pieces(raw: np.ndarray) -> np.ndarray:
    """Bytes of stored values as uint64 words, padded to whole 16-byte pieces plus one spare
    piece (an aligned 16-byte load may run past the last value)."""
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    pieces = raw.size // 16 + 1
    padded = np.zeros(pieces * 16, dtype=np.uint8)
    padded[: raw.size] = raw
    return padded.view("<u8").astype(np.uint64)


def kernel_scales(value_type: str, scales: np.ndarray | None, rows: int) -> np.ndarray:
    """Scales as the kernels read them: float32 ``[rows, G]`` (int8: ``G = 1``; float types:
    a ``[1, 1]`` placeholder that is never read)."""
    if value_type not in ("int8", "int4") or rows == 0:
        return np.zeros((1, 1), dtype=np.float32)
    sc = np.asarray(scales, dtype=np.float32)
    return np.ascontiguousarray(sc.reshape(rows, sc.size // rows))
