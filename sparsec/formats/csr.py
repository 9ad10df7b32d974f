"""The ``csr`` format: compressed sparse rows with the narrowest integer types that fit.

Tensors under ``prefix``:

=============  =================================  ==============================================
``.shape``     int64 ``[2]``                      ``(rows, cols)``
``.indptr``    int ``[rows + 1]``                 row ``r``'s values are ``indptr[r]:indptr[r+1]``
``.indices``   int ``[nnz]``                      column of each kept value, increasing in a row
``.values``    1-D, value-type dtype              kept values in row-major order; int4: two a byte
``.scales``    float32 (int8/int4 only)           ``[rows]`` or ``[rows, ceil(cols/group_size)]``
=============  =================================  ==============================================

``indptr`` and ``indices`` use the narrowest of uint8, int16, int32, int64 that holds their
largest value (``nnz`` and ``cols - 1``). A 4096-column layer at sparsity ``s`` with ``b``-bit
values stores ``(1 - s) * (b + 16)`` bits per weight against the bitmask's ``1 + (1 - s) * b``,
so CSR is the smaller of the two only above ``15/16 = 93.75%`` sparsity.

Example::

    p = CsrWeight.pack(w, "fp16")
    assert p.indices.dtype == torch.int16   # for cols <= 32768
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
    read_values,
    require_tensor,
)
from sparsec.formats.base import FormatError, register_format
from sparsec.formats.values import DEFAULT_GROUP_SIZE, decode, dequantize, encode

INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.uint8, torch.int16, torch.int32, torch.int64)


def narrowest_index_dtype(max_value: int) -> torch.dtype:
    """The narrowest of :data:`INDEX_DTYPES` that holds every integer in ``[0, max_value]``."""
    for dtype in INDEX_DTYPES:
        if max_value <= torch.iinfo(dtype).max:
            return dtype
    raise FormatError(f"index {max_value} does not fit in int64")


@register_format("csr")
class CsrWeight(QuantizableWeight):
    """A weight in compressed sparse row form (see module doc). Options: ``group_size`` (int4)."""

    def __init__(
        self,
        shape: tuple[int, int],
        value_type: str,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        values: torch.Tensor,
        scales: torch.Tensor | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
    ) -> None:
        super().__init__(shape, value_type, scales, group_size)
        self.indptr = indptr
        self.indices = indices
        self.values = values

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @classmethod
    def pack(cls, weight: torch.Tensor, value_type: str = "fp32", **options) -> CsrWeight:
        check_options(options, ("group_size", "scales"), "csr")
        w, levels, scales, group_size = quantize_for_pack(weight, value_type, options)
        rows, cols = w.shape
        mask = w != 0
        counts = mask.sum(dim=1)
        nnz = int(counts.sum())
        indptr = torch.zeros(rows + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=indptr[1:])
        indices = mask.nonzero()[:, 1]
        values = encode(levels[mask], value_type)
        return cls(
            (rows, cols),
            value_type,
            indptr.to(narrowest_index_dtype(nnz)),
            indices.to(narrowest_index_dtype(max(cols - 1, 0))),
            values,
            scales,
            group_size,
        )

    def row_ids(self) -> torch.Tensor:
        """int64 ``[nnz]``: the row of each stored value."""
        counts = self.indptr[1:].to(torch.int64) - self.indptr[:-1].to(torch.int64)
        return torch.repeat_interleave(torch.arange(self.rows), counts)

    def unpack(self) -> torch.Tensor:
        rows, cols = self.shape
        dense = torch.zeros(rows, cols, dtype=torch.float32)
        vals = decode(self.values, self.value_type, self.nnz).to(torch.float32)
        dense[self.row_ids(), self.indices.to(torch.int64)] = vals
        return dequantize(dense, self.value_type, self.scales, self.group_size)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return self._stored_tensors(prefix, indptr=self.indptr, indices=self.indices, values=self.values)

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor], **options) -> CsrWeight:
        check_options(options, ("group_size",), "csr")
        group_size = group_size_of(options)
        rows, cols = read_shape(tensors, prefix)
        name = f"{prefix}.indptr"
        indptr = require_tensor(tensors, name, INDEX_DTYPES, (rows + 1,), "rows + 1 from .shape")
        ptr = indptr.to(torch.int64)
        if int(ptr[0]) != 0 or (ptr[1:] < ptr[:-1]).any():
            raise FormatError(f"tensor {name!r} must start at 0 and never decrease")
        nnz = int(ptr[-1])
        name = f"{prefix}.indices"
        indices = require_tensor(tensors, name, INDEX_DTYPES, (nnz,), f"indptr[-1] = {nnz} values")
        idx = indices.to(torch.int64)
        if nnz and (int(idx.min()) < 0 or int(idx.max()) >= cols):
            raise FormatError(f"tensor {name!r} holds a column outside [0, {cols})")
        # Within a row, columns must strictly increase; a row start may go back to a low column.
        starts = torch.zeros(nnz, dtype=torch.bool)
        starts[ptr[:-1][ptr[:-1] < nnz]] = True
        if nnz > 1 and ((idx[1:] <= idx[:-1]) & ~starts[1:]).any():
            raise FormatError(f"tensor {name!r} has columns that do not strictly increase within a row")
        values, value_type = read_values(tensors, f"{prefix}.values", nnz)
        scales = read_scales(tensors, prefix, value_type, rows, cols, group_size)
        return cls((rows, cols), value_type, indptr.contiguous(), indices.contiguous(), values, scales, group_size)

    def __repr__(self) -> str:
        return f"CsrWeight(shape={self.shape}, value_type={self.value_type!r}, nnz={self.nnz})"
