"""Pieces every format shares: the state and tensors common to all of them, reading stored tensors
with errors that name them, the quantize step of ``pack``, bit packing.

Private to :mod:`sparsec.formats`; kernels and passes use the format classes instead.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsec.formats.base import FormatError, PackedWeight
from sparsec.formats.values import (
    DEFAULT_GROUP_SIZE,
    QUANT_TYPES,
    all_finite,
    check_group_size,
    quantize,
    scales_shape,
    stored_length,
    value_type_of,
)

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool ``[rows, cols]`` mask into uint8 ``[rows, ceil(cols/8)]``, little-endian bits.

    Bit ``j`` of byte ``b`` in row ``r`` is column ``8*b + j``; the bits past ``cols`` are zero.
    Same result as ``numpy.packbits(mask, axis=-1, bitorder="little")``.
    """
    rows, cols = mask.shape
    nbytes = (cols + 7) // 8
    padded = torch.zeros(rows, nbytes * 8, dtype=torch.uint8)
    padded[:, :cols] = mask
    lanes = padded.view(rows, nbytes, 8)
    # Eight passes over a uint8 view: cheaper than a sum that would widen to int64.
    out = lanes[:, :, 0].clone()
    for j in range(1, 8):
        out |= lanes[:, :, j] << j
    return out


def unpack_bits(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: bool ``[rows, cols]``."""
    rows = bits.shape[0]
    expanded = (bits.unsqueeze(-1) & _BIT_WEIGHTS) != 0
    return expanded.reshape(rows, bits.shape[1] * 8)[:, :cols]


def require(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``tensors[name]`` or a :class:`FormatError` saying it is missing."""
    try:
        t = tensors[name]
    except KeyError:
        raise FormatError(f"missing tensor {name!r}") from None
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
    return t


def require_dtype(t: torch.Tensor, name: str, dtypes: torch.dtype | tuple[torch.dtype, ...]) -> None:
    allowed = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    if t.dtype not in allowed:
        want = " or ".join(str(d) for d in allowed)
        raise FormatError(f"tensor {name!r} has dtype {t.dtype}, expected {want}")


def require_shape(t: torch.Tensor, name: str, shape: tuple[int, ...], why: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        reason = f" ({why})" if why else ""
        raise FormatError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}{reason}")


def require_tensor(
    tensors: dict[str, torch.Tensor],
    name: str,
    dtypes: torch.dtype | tuple[torch.dtype, ...],
    shape: tuple[int, ...],
    why: str = "",
) -> torch.Tensor:
    """``tensors[name]``, checked to be present, of one of ``dtypes`` and of exactly ``shape``.

    The checks, in that order, are :func:`require`, :func:`require_dtype` and
    :func:`require_shape` (``why`` goes into the shape error); the first that fails raises its
    :class:`FormatError`. The tensor comes back as stored (not made contiguous).
    """
    t = require(tensors, name)
    require_dtype(t, name, dtypes)
    require_shape(t, name, shape, why)
    return t


def read_shape(tensors: dict[str, torch.Tensor], prefix: str) -> tuple[int, int]:
    """The dense ``(rows, cols)`` stored in ``<prefix>.shape`` (int64 ``[2]``, non-negative)."""
    name = f"{prefix}.shape"
    t = require_tensor(tensors, name, (torch.int64, torch.int32), (2,))
    rows, cols = (int(v) for v in t.tolist())
    if rows < 0 or cols < 0:
        raise FormatError(f"tensor {name!r} holds a negative dimension {(rows, cols)}")
    return rows, cols


def shape_tensor(rows: int, cols: int) -> torch.Tensor:
    return torch.tensor([rows, cols], dtype=torch.int64)


def read_values(
    tensors: dict[str, torch.Tensor], name: str, count: int | None = None, dims: int = 1
) -> tuple[torch.Tensor, str]:
    """A stored values tensor and its value type (from its dtype).

    When ``count`` is given the tensor must hold exactly the stored length of ``count`` values.
    """
    t = require(tensors, name)
    value_type = value_type_of(t.dtype, name)
    if t.dim() != dims:
        raise FormatError(f"tensor {name!r} must be {dims}-D, got shape {tuple(t.shape)}")
    if count is not None and dims == 1:
        want = stored_length(value_type, count)
        if t.numel() != want:
            raise FormatError(
                f"tensor {name!r} holds {t.numel()} elements but the mask keeps {count} values "
                f"({want} elements of {t.dtype} expected)"
            )
    if value_type in ("fp32", "bf16", "fp16") and not all_finite(t):
        raise FormatError(f"tensor {name!r} holds NaN or Inf values")
    return t.contiguous(), value_type


def read_scales(
    tensors: dict[str, torch.Tensor],
    prefix: str,
    value_type: str,
    rows: int,
    cols: int,
    group_size: int,
) -> torch.Tensor | None:
    """``<prefix>.scales`` for quantized value types (validated), ``None`` for float ones."""
    name = f"{prefix}.scales"
    want = scales_shape(value_type, rows, cols, group_size)
    if want is None:
        if name in tensors:
            raise FormatError(f"tensor {name!r} is present but the values are {value_type}, which has no scales")
        return None
    t = require(tensors, name)
    require_dtype(t, name, torch.float32)
    why = "one per row" if value_type == "int8" else f"one per row and group of {group_size} columns"
    if value_type == "int4" and t.dim() == 2 and t.shape[0] == rows and t.shape[1] != want[1]:
        why += "; pass the group_size the weight was packed with"
    require_shape(t, name, want, why)
    if not all_finite(t) or (t < 0).any():
        raise FormatError(f"tensor {name!r} must hold finite non-negative scales")
    return t.contiguous()


def check_options(options: dict[str, object], allowed: tuple[str, ...], fmt: str) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = ", ".join(allowed) or "none"
        raise FormatError(f"format {fmt!r} got unknown option(s) {', '.join(unknown)}; it accepts {known}")


def group_size_of(options: dict[str, object]) -> int:
    return check_group_size(options.get("group_size", DEFAULT_GROUP_SIZE))  # type: ignore[arg-type]


def is_quantized(value_type: str) -> bool:
    return value_type in QUANT_TYPES


def prepare_weight(weight: torch.Tensor) -> torch.Tensor:
    """Check a weight handed to ``pack`` and return it detached on the CPU (never modified)."""
    if not isinstance(weight, torch.Tensor):
        raise FormatError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise FormatError(f"formats store 2-D [rows, cols] weights, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise FormatError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    w = weight.detach().to("cpu")
    if not all_finite(w):
        raise FormatError("weight holds NaN or Inf values; fix the model before packing")
    return w


def quantize_for_pack(
    weight: torch.Tensor, value_type: str, options: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """The quantize step of ``pack``, once its options are checked: ``(w, levels, scales, group_size)``.

    ``group_size`` is :func:`group_size_of` ``options``; ``w`` is ``weight`` through
    :func:`prepare_weight` (detached, on the CPU, never modified); ``levels, scales`` are
    :func:`~sparsec.formats.values.quantize` of ``w`` to ``value_type`` at that group size, with
    ``options["scales"]`` imposed when given. The checks run, and raise, in that order.
    """
    group_size = group_size_of(options)
    w = prepare_weight(weight)
    levels, scales = quantize(w, value_type, group_size, options.get("scales"))
    return w, levels, scales, group_size


class QuantizableWeight(PackedWeight):
    """A :class:`PackedWeight` whose values may be of any value type, int8/int4 included.

    Holds what every format keeps besides its own tensors: ``shape``, ``value_type``, ``scales``
    (float32 for int8/int4, ``None`` for float values) and ``group_size`` (the int4 scale group;
    kept, unused, for the other types). Gives the ``options`` and the shape and scales tensors
    that follow from them; a format adds its own tensors and options around them.
    """

    scales: torch.Tensor | None
    group_size: int

    def __init__(self, shape: tuple[int, int], value_type: str, scales: torch.Tensor | None, group_size: int) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.value_type = value_type
        self.scales = scales
        self.group_size = group_size

    def options(self) -> dict[str, object]:
        """``{"group_size": ...}`` for int4 values, whose scales depend on it; ``{}`` otherwise.

        A format with options of its own returns them first, then these.
        """
        return {"group_size": self.group_size} if self.value_type == "int4" else {}

    def _stored_tensors(self, prefix: str, **fields: torch.Tensor) -> dict[str, torch.Tensor]:
        """What ``tensors(prefix)`` returns, in this order: ``{prefix}.shape`` (int64
        ``[rows, cols]``), each of ``fields`` as ``{prefix}.{field}`` in the order given, then
        ``{prefix}.scales`` when the weight has scales.

        These names and this order are the safetensors layout of artifacts and of
        compressed-tensors folders.
        """
        out = {f"{prefix}.shape": shape_tensor(*self.shape)}
        out.update((f"{prefix}.{field}", t) for field, t in fields.items())
        if self.scales is not None:
            out[f"{prefix}.scales"] = self.scales
        return out


def pack_fields(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[rows, k]`` small non-negative integers ``bits`` wide into uint8 ``[rows, ceil(k*bits/8)]``.

    Field ``i`` of a row occupies bits ``i*bits .. i*bits+bits-1`` of the row's little-endian bit
    stream (least significant bit first), the layout :func:`pack_bits` gives a bool stream.
    """
    rows, k = fields.shape
    if 8 % bits == 0:
        # Whole fields per byte (1, 2, 4 or 8 bits): OR shifted uint8 lanes, no bit stream.
        per_byte = 8 // bits
        nbytes = (k + per_byte - 1) // per_byte
        lanes = torch.zeros(rows, nbytes * per_byte, dtype=torch.uint8)
        lanes[:, :k] = fields
        lanes = lanes.view(rows, nbytes, per_byte)
        out = lanes[:, :, 0].clone()
        for j in range(1, per_byte):
            out |= lanes[:, :, j] << (j * bits)
        return out
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((fields.to(torch.int64).unsqueeze(-1) >> shifts) & 1).bool().reshape(rows, k * bits)
    return pack_bits(stream)


def unpack_fields(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_fields`: int64 ``[rows, k]``."""
    rows = packed.shape[0]
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        lanes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return lanes.reshape(rows, packed.shape[1] * len(shifts))[:, :k].to(torch.int64)
    stream = unpack_bits(packed, k * bits).reshape(rows, k, bits).to(torch.int64)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(-1)
