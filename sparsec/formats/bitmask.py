"""The ``bitmask`` format: one bit per dense position plus the kept values in row-major order.

Byte-compatible with the compressed-tensors ``sparse-bitmask`` layout, so checkpoints move
between the two ecosystems unchanged. Tensors under ``prefix``:

================  ==========================  ===================================================
``.shape``        int64 ``[2]``               ``(rows, cols)``
``.compressed``   1-D, value-type dtype       kept values, row 0's by increasing column, then row 1's
                                              ...; int4: ``ceil(nnz/2)`` bytes, two values a byte,
                                              so a row may start mid-byte
``.bitmask``      uint8 ``[rows, ceil(cols/8)]``  bit ``j`` of byte ``b`` (``(byte >> j) & 1``) is
                                              column ``8*b + j``; bits past ``cols`` are zero
``.row_offsets``  int64 ``[rows]``            index into ``compressed`` (in values) where a row starts
``.scales``       float32 (int8/int4 only)    ``[rows]`` or ``[rows, ceil(cols/group_size)]``
================  ==========================  ===================================================

A position is kept iff the dense weight is nonzero there. At sparsity ``s`` with ``b``-bit values
this stores ``1 + (1 - s) * b`` bits per weight, plus 64 bits per row of offsets and the scales.

Example::

    w = torch.randn(64, 100) * (torch.rand(64, 100) > 0.75)
    p = BitmaskWeight.pack(w, "int8")
    a = p.arrays()          # numpy views for a kernel: values, bitmask, row_offsets, scales
    back = BitmaskWeight.from_tensors("layer", p.tensors("layer"))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparsec.formats._common import (
    QuantizableWeight,
    check_options,
    group_size_of,
    pack_bits,
    quantize_for_pack,
    read_scales,
    read_shape,
    read_values,
    require_tensor,
    unpack_bits,
)
from sparsec.formats.base import FormatError, register_format
from sparsec.formats.values import DEFAULT_GROUP_SIZE, decode, dequantize, encode

FIELDS: tuple[str, ...] = ("shape", "compressed", "bitmask", "row_offsets")


@dataclass(frozen=True)
class BitmaskArrays:
    """The raw arrays a kernel reads, so kernel code never needs tensor names.

    ``values`` is the ``compressed`` tensor as numpy: float32, float16, int8 levels, uint8
    (int4: two levels a byte, low nibble first), or uint16 holding the raw bf16 bit patterns
    (numpy has no bfloat16; ``values.astype(np.uint32) << 16`` viewed as float32 decodes them).
    All arrays are C-contiguous and share memory with the packed weight: do not write to them.
    """

    rows: int
    cols: int
    value_type: str
    group_size: int
    values: np.ndarray
    bitmask: np.ndarray
    row_offsets: np.ndarray
    scales: np.ndarray | None


@register_format("bitmask")
class BitmaskWeight(QuantizableWeight):
    """A weight in the ``bitmask`` format (see module doc). Options: ``group_size`` (int4)."""

    def __init__(
        self,
        shape: tuple[int, int],
        value_type: str,
        compressed: torch.Tensor,
        bitmask: torch.Tensor,
        row_offsets: torch.Tensor,
        scales: torch.Tensor | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
    ) -> None:
        super().__init__(shape, value_type, scales, group_size)
        self.compressed = compressed
        self.bitmask = bitmask
        self.row_offsets = row_offsets

    @property
    def nnz(self) -> int:
        """Number of kept positions."""
        if self.rows == 0:
            return 0
        return int(self.row_offsets[-1]) + int(unpack_bits(self.bitmask[-1:], self.cols).sum())

    @classmethod
    def pack(cls, weight: torch.Tensor, value_type: str = "fp32", **options) -> BitmaskWeight:
        check_options(options, ("group_size", "scales"), "bitmask")
        w, levels, scales, group_size = quantize_for_pack(weight, value_type, options)
        rows, cols = w.shape
        mask = w != 0
        counts = mask.sum(dim=1)
        row_offsets = torch.cumsum(counts, 0) - counts
        # Boolean indexing walks the matrix in row-major order: exactly the compressed order.
        compressed = encode(levels[mask], value_type)
        return cls((rows, cols), value_type, compressed, pack_bits(mask), row_offsets, scales, group_size)

    def mask(self) -> torch.Tensor:
        """Bool ``[rows, cols]``: which positions are stored."""
        return unpack_bits(self.bitmask, self.cols)

    def unpack(self) -> torch.Tensor:
        rows, cols = self.shape
        mask = self.mask()
        nnz = int(mask.sum())
        dense = torch.zeros(rows, cols, dtype=torch.float32)
        dense[mask] = decode(self.compressed, self.value_type, nnz).to(torch.float32)
        return dequantize(dense, self.value_type, self.scales, self.group_size)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return self._stored_tensors(
            prefix, compressed=self.compressed, bitmask=self.bitmask, row_offsets=self.row_offsets
        )

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor], **options) -> BitmaskWeight:
        check_options(options, ("group_size",), "bitmask")
        group_size = group_size_of(options)
        rows, cols = read_shape(tensors, prefix)
        name = f"{prefix}.bitmask"
        bitmask = require_tensor(tensors, name, torch.uint8, (rows, (cols + 7) // 8), "rows x ceil(cols/8) from .shape")
        bitmask = bitmask.contiguous()
        if cols % 8 and rows and (bitmask[:, -1] >> (cols % 8)).any():
            raise FormatError(f"tensor {name!r} has bits set past column {cols} (the padding bits must be zero)")
        # kept values per row: a popcount of the packed bytes (padding bits are zero, checked above),
        # far cheaper than unpacking every bit when an artifact of 200 layers loads
        counts = torch.from_numpy(np.bitwise_count(bitmask.numpy()).sum(axis=1, dtype=np.int64))
        name = f"{prefix}.row_offsets"
        row_offsets = require_tensor(tensors, name, torch.int64, (rows,), "one offset per row")
        expected = torch.cumsum(counts, 0) - counts
        if not torch.equal(row_offsets, expected):
            bad = int((row_offsets != expected).nonzero()[0, 0])
            raise FormatError(
                f"tensor {name!r} is inconsistent with the bitmask: row {bad} starts at "
                f"{int(row_offsets[bad])} but the popcount of the rows above it is {int(expected[bad])}"
            )
        nnz = int(counts.sum())
        compressed, value_type = read_values(tensors, f"{prefix}.compressed", nnz)
        scales = read_scales(tensors, prefix, value_type, rows, cols, group_size)
        return cls((rows, cols), value_type, compressed, bitmask, row_offsets.contiguous(), scales, group_size)

    def arrays(self) -> BitmaskArrays:
        """numpy views of the stored tensors, for kernels (see :class:`BitmaskArrays`)."""
        values = self.compressed
        if values.dtype == torch.bfloat16:
            values_np = values.view(torch.int16).numpy().view(np.uint16)
        else:
            values_np = values.numpy()
        return BitmaskArrays(
            rows=self.rows,
            cols=self.cols,
            value_type=self.value_type,
            group_size=self.group_size,
            values=np.ascontiguousarray(values_np),
            bitmask=np.ascontiguousarray(self.bitmask.numpy()),
            row_offsets=np.ascontiguousarray(self.row_offsets.numpy()),
            scales=None if self.scales is None else np.ascontiguousarray(self.scales.numpy()),
        )

    def __repr__(self) -> str:
        return f"BitmaskWeight(shape={self.shape}, value_type={self.value_type!r}, nnz={self.nnz})"
