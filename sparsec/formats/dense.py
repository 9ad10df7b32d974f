"""The ``dense`` format: every position stored, zeros included; the baseline sparsity must beat.

Tensors under ``prefix``:

=============  ===================================  =========================================
``.shape``     int64 ``[2]``                        ``(rows, cols)``
``.weight``    value-type dtype ``[rows, cols]``;   the values (int8/int4: quantized levels);
               int4: uint8 ``[rows, ceil(cols/2)]``  int4 packs columns ``2k`` (low nibble) and
                                                    ``2k+1`` (high nibble) of a row into byte ``k``
``.scales``    float32 (int8/int4 only)             ``[rows]`` or ``[rows, ceil(cols/group_size)]``
=============  ===================================  =========================================

Each int4 row starts on a byte boundary (unlike the sparse formats' flat value runs) because a
dense kernel indexes columns directly.

Example::

    p = DenseWeight.pack(w, "int4", group_size=64)
    assert p.nbytes() == 16 + w.shape[0] * ((w.shape[1] + 1) // 2) + p.scales.numel() * 4
"""

from __future__ import annotations

import torch

from sparsec.formats._common import (
    QuantizableWeight,
    check_options,
    group_size_of,
    quantize_for_pack,
    read_scales,
    read_shape,
    require,
    require_shape,
)
from sparsec.formats.base import FormatError, all_finite, register_format
from sparsec.formats.values import DEFAULT_GROUP_SIZE, FLOAT_TYPES, dequantize, value_type_of


def pack_int4_rows(levels: torch.Tensor) -> torch.Tensor:
    """int8 levels ``[rows, cols]`` -> uint8 ``[rows, ceil(cols/2)]``, column ``2k`` in the low nibble."""
    rows, cols = levels.shape
    nib = levels.to(torch.uint8) & 0x0F
    if cols % 2:
        nib = torch.cat([nib, nib.new_zeros(rows, 1)], dim=1)
    pairs = nib.view(rows, nib.shape[1] // 2, 2)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).contiguous()


def unpack_int4_rows(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4_rows`: int8 levels ``[rows, cols]``."""
    rows = packed.shape[0]
    nib = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(rows, packed.shape[1] * 2)[:, :cols]
    return ((nib.to(torch.int16) ^ 8) - 8).to(torch.int8)


@register_format("dense")
class DenseWeight(QuantizableWeight):
    """A weight stored densely (see module doc). Options: ``group_size`` (int4)."""

    def __init__(
        self,
        shape: tuple[int, int],
        value_type: str,
        weight: torch.Tensor,
        scales: torch.Tensor | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
    ) -> None:
        super().__init__(shape, value_type, scales, group_size)
        self.weight = weight

    @classmethod
    def pack(cls, weight: torch.Tensor, value_type: str = "fp32", **options) -> DenseWeight:
        check_options(options, ("group_size", "scales"), "dense")
        w, levels, scales, group_size = quantize_for_pack(weight, value_type, options)
        stored = pack_int4_rows(levels) if value_type == "int4" else levels.contiguous()
        return cls(tuple(w.shape), value_type, stored, scales, group_size)

    def levels(self) -> torch.Tensor:
        """The ``[rows, cols]`` stored values (int8 levels for int8/int4), unpacked but not scaled."""
        if self.value_type == "int4":
            return unpack_int4_rows(self.weight, self.cols)
        return self.weight

    def unpack(self) -> torch.Tensor:
        return dequantize(self.levels(), self.value_type, self.scales, self.group_size)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return self._stored_tensors(prefix, weight=self.weight)

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor], **options) -> DenseWeight:
        check_options(options, ("group_size",), "dense")
        group_size = group_size_of(options)
        rows, cols = read_shape(tensors, prefix)
        name = f"{prefix}.weight"
        weight = require(tensors, name)
        value_type = value_type_of(weight.dtype, name)
        width = (cols + 1) // 2 if value_type == "int4" else cols
        require_shape(
            weight, name, (rows, width), "from .shape" + (", two int4 values a byte" if width != cols else "")
        )
        if value_type in FLOAT_TYPES and not all_finite(weight):
            raise FormatError(f"tensor {name!r} holds NaN or Inf values")
        if value_type == "int4" and cols % 2 and rows and (weight[:, -1] >> 4).any():
            raise FormatError(f"tensor {name!r} has a nonzero padding nibble past column {cols}")
        scales = read_scales(tensors, prefix, value_type, rows, cols, group_size)
        return cls((rows, cols), value_type, weight.contiguous(), scales, group_size)

    def __repr__(self) -> str:
        return f"DenseWeight(shape={self.shape}, value_type={self.value_type!r})"
