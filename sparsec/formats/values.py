"""Value types: how kept weights become stored values and back, shared by every format.

A format decides *which* positions it stores; this module decides *how* a value is stored.
Quantization is computed on the dense masked matrix, so every format sees the same quantized
value at the same position, and a pruned position (a zero) always quantizes to exactly zero:

* ``int8``: symmetric per output row, ``scale[r] = max|w[r, :]| / 127``, ``q = round(w / scale)``.
* ``int4``: symmetric per row and group of ``group_size`` dense columns,
  ``scale[r, g] = max|w[r, g*gs:(g+1)*gs]| / 7``, ``q = clamp(round(w / scale), -8, 7)``; two
  values a byte, element ``2k`` in the low nibble and ``2k+1`` in the high one.

A row (or group) with no kept value gets scale 0: its values are all zero and so is the product.

Example::

    q, scales = quantize(w, "int4", group_size=128)   # q: int8 [rows, cols], scales: [rows, G]
    w_hat = dequantize(q, "int4", scales, group_size=128)
    assert ((w_hat - w).abs() <= scales.repeat_interleave(128, 1)[:, : w.shape[1]] / 2 + 1e-6).all()
"""

from __future__ import annotations

import math

import torch

from sparsec.formats.base import STORAGE_DTYPE, VALUE_TYPES, FormatError, all_finite

FLOAT_TYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")
QUANT_TYPES: tuple[str, ...] = ("int8", "int4")
INT8_QMAX = 127
INT4_QMIN, INT4_QMAX = -8, 7
DEFAULT_GROUP_SIZE = 128

_VALUE_TYPE_OF_DTYPE: dict[torch.dtype, str] = {dtype: vt for vt, dtype in STORAGE_DTYPE.items()}


def check_value_type(value_type: str) -> None:
    """Raise :class:`FormatError` unless ``value_type`` is one of :data:`VALUE_TYPES`."""
    if value_type not in VALUE_TYPES:
        raise FormatError(f"unknown value type {value_type!r}; choose one of {', '.join(VALUE_TYPES)}")


def check_group_size(group_size: int) -> int:
    """Validate the int4 ``group_size`` option (a positive int) and return it."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise FormatError(f"group_size must be a positive integer, got {group_size!r}")
    return group_size


def value_type_of(dtype: torch.dtype, name: str) -> str:
    """The value type whose storage dtype is ``dtype``; ``name`` is the tensor blamed otherwise."""
    try:
        return _VALUE_TYPE_OF_DTYPE[dtype]
    except KeyError:
        allowed = ", ".join(str(d) for d in STORAGE_DTYPE.values())
        raise FormatError(f"tensor {name!r} has dtype {dtype}; stored values must be one of {allowed}") from None


def scales_shape(value_type: str, rows: int, cols: int, group_size: int) -> tuple[int, ...] | None:
    """Shape of the ``scales`` tensor for ``value_type``, or ``None`` for float value types."""
    if value_type == "int8":
        return (rows,)
    if value_type == "int4":
        return (rows, math.ceil(cols / group_size))
    return None


def quantize(
    weight: torch.Tensor,
    value_type: str,
    group_size: int = DEFAULT_GROUP_SIZE,
    scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize a dense masked ``[rows, cols]`` weight to ``value_type``.

    Returns ``(values, scales)``: for float types ``values`` is the weight in the storage dtype
    and ``scales`` is ``None``; for ``int8``/``int4`` ``values`` is an ``int8`` tensor of the
    quantized levels (int4 levels not yet packed) and ``scales`` is float32 (see module doc).
    Zeros map to zeros in every value type. Raises :class:`FormatError` when a value does not fit
    (e.g. ``|w| > 65504`` for fp16).

    ``scales`` (int8/int4 only) imposes the scales instead of deriving them from ``weight``: a
    weight already on a quantization grid (GPTQ's output) then packs back to exactly its levels,
    even where its largest value no longer reaches the top level. Levels are still clamped.
    """
    check_value_type(value_type)
    rows, cols = weight.shape
    w = weight.detach().to(torch.float32)
    if value_type in FLOAT_TYPES:
        if scales is not None:
            raise FormatError(f"scales apply to int8/int4 values, not {value_type}")
        out = w.to(STORAGE_DTYPE[value_type])
        if not all_finite(out):
            raise FormatError(
                f"weight has values beyond the range of {value_type} (max |w| = {w.abs().max().item():.4g}); "
                "store it as fp32 or bf16"
            )
        return out, None
    if scales is not None:
        want = scales_shape(value_type, rows, cols, group_size)
        if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != want:
            got = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
            raise FormatError(
                f"scales for {value_type} values of a {rows}x{cols} weight must have shape {want}, got {got}"
            )
        scales = scales.detach().to("cpu", torch.float32)
        if not all_finite(scales) or bool((scales < 0).any()):
            raise FormatError("scales must be finite and non-negative")
    if value_type == "int8":
        grouped, qmin, qmax = w.view(rows, 1, cols), -INT8_QMAX, INT8_QMAX
    else:
        check_group_size(group_size)
        groups = math.ceil(cols / group_size)
        pad = groups * group_size - cols
        padded = torch.nn.functional.pad(w, (0, pad)) if pad else w
        grouped, qmin, qmax = padded.view(rows, groups, group_size), INT4_QMIN, INT4_QMAX
    if scales is not None:
        scales = scales.reshape(grouped.shape[:2])
    elif grouped.numel():
        lo, hi = torch.aminmax(grouped, dim=2)
        scales = torch.maximum(-lo, hi) / qmax
    else:
        scales = torch.zeros(grouped.shape[:2])
    # A zero scale only happens where every value is zero; divide by 1 there to keep zeros zero.
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = grouped / safe.unsqueeze(2)
    q = q.round_().clamp_(qmin, qmax).to(torch.int8).view(rows, grouped.shape[1] * grouped.shape[2])[:, :cols]
    scales = scales.view(rows) if value_type == "int8" else scales
    return q.contiguous(), scales.to(torch.float32).contiguous()


def dequantize(
    values: torch.Tensor,
    value_type: str,
    scales: torch.Tensor | None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> torch.Tensor:
    """Inverse of :func:`quantize` on a dense ``[rows, cols]`` matrix of stored values (float32 out).

    ``values`` holds the storage dtype for float types and int8 levels for int8/int4; a value at
    column ``c`` of row ``r`` becomes ``q * scales[r]`` (int8) or ``q * scales[r, c // group_size]``
    (int4), computed in float32 as a kernel would.
    """
    if value_type in FLOAT_TYPES:
        return values.to(torch.float32)
    assert scales is not None
    rows, cols = values.shape
    if value_type == "int8":
        per_value = scales[:, None]
    else:
        per_value = scales.repeat_interleave(group_size, dim=1)[:, :cols]
    return values.to(torch.float32) * per_value


def pack_int4(levels: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D tensor of int4 levels (int8 in ``[-8, 7]``) two a byte, low nibble first.

    Returns ``uint8`` of length ``ceil(n / 2)``; an odd tail leaves the last high nibble zero.
    """
    flat = levels.reshape(-1).to(torch.uint8) & 0x0F
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: the first ``count`` signed levels as int8."""
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:count]
    # Sign-extend a 4-bit two's complement value: flip the sign bit, then subtract it.
    return ((nibbles.to(torch.int16) ^ 8) - 8).to(torch.int8)


def encode(levels: torch.Tensor, value_type: str) -> torch.Tensor:
    """Turn a 1-D run of kept values (output of :func:`quantize`) into its stored tensor."""
    return pack_int4(levels) if value_type == "int4" else levels.reshape(-1).contiguous()


def decode(stored: torch.Tensor, value_type: str, count: int) -> torch.Tensor:
    """Inverse of :func:`encode`: ``count`` values, int8 levels for int types, storage dtype else."""
    return unpack_int4(stored, count) if value_type == "int4" else stored.reshape(-1)[:count]


def stored_length(value_type: str, count: int) -> int:
    """Elements of the stored values tensor that holds ``count`` values."""
    return (count + 1) // 2 if value_type == "int4" else count


def stored_dtype(value_type: str) -> torch.dtype:
    return STORAGE_DTYPE[value_type]
