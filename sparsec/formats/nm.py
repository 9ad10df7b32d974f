"""The ``nm`` format: N:M structured sparsity along the input dimension (2:4, 1:4, 4:8, ...).

Every row is cut into ``cols / M`` groups of ``M`` consecutive columns; each group keeps at most
``N`` values. The format stores exactly ``N`` values per group and their positions in the group:

=============  ===================================  =======================================
``.shape``     int64 ``[2]``                        ``(rows, cols)``
``.values``    1-D, value-type dtype                ``rows * cols/M * N`` values, row-major,
                                                    group by group, by increasing position;
                                                    int4: two a byte
``.indices``   uint8 ``[rows, ceil(K * B / 8)]``    the in-group position of each value,
                                                    ``B = max(1, ceil(log2 M))`` bits each,
                                                    ``K = cols/M * N`` fields a row, packed
                                                    least-significant bit first (2:4: four
                                                    2-bit positions a byte)
``.scales``    float32 (int8/int4 only)             ``[rows]`` or ``[rows, ceil(cols/group_size)]``
=============  ===================================  =======================================

A group with fewer than ``N`` nonzeros is padded with zeros at its lowest unused positions, so
positions strictly increase within a group. Options: ``n`` (default 2), ``m`` (default 4),
``group_size`` (int4). A weight that keeps more than ``N`` values in some group, or whose ``cols``
is not a multiple of ``M``, is refused with an error that says where.

Example::

    w = torch.randn(8, 16) * torch.tensor([1, 0, 1, 0] * 4)   # 2:4 sparse
    p = NmWeight.pack(w, "fp16", n=2, m=4)
    assert p.bits_per_weight() < 10   # 8 bits of values + 1 bit of positions + shape
"""

from __future__ import annotations

import torch

from sparsec.formats._common import (
    QuantizableWeight,
    check_options,
    group_size_of,
    pack_fields,
    prepare_weight,
    read_scales,
    read_shape,
    read_values,
    require_tensor,
    unpack_fields,
)
from sparsec.formats.base import FormatError, register_format
from sparsec.formats.values import DEFAULT_GROUP_SIZE, decode, dequantize, encode, quantize

_OPTIONS = ("n", "m", "group_size")
MAX_M = 128


def index_bits(m: int) -> int:
    """Bits per stored in-group position for groups of ``m`` columns."""
    return max(1, (m - 1).bit_length())


def _check_nm(n: object, m: object) -> tuple[int, int]:
    for key, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FormatError(f"nm option {key} must be a positive integer, got {v!r}")
    if n > m:  # type: ignore[operator]
        raise FormatError(f"nm needs n <= m, got {n}:{m}")
    if m > MAX_M:  # type: ignore[operator]
        raise FormatError(f"nm supports m up to {MAX_M}, got m={m}")
    return int(n), int(m)  # type: ignore[arg-type]


def _select_positions(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, tuple[int, int, int] | None]:
    """The ``n`` stored positions of every group, uint8 ``[rows, cols/m, n]``, increasing.

    Every nonzero is selected, and a group with fewer than ``n`` pads with its lowest zero
    positions. Returns ``(positions, None)``, or ``(empty, (row, group, count))`` for the first
    group that keeps more than ``n`` nonzeros. Works on ``[rows, groups]`` strided column slices
    (one per in-group position): for the small ``m`` of real N:M patterns that is several times
    faster than sorting or boolean-indexing a ``[rows, groups, m]`` tensor.
    """
    rows, cols = w.shape
    groups = cols // m
    nonzero = [w[:, p::m] != 0 for p in range(m)]
    # uint8 counters: m <= MAX_M < 256, and uint8 passes are the cheapest torch has.
    kept = torch.zeros(rows, groups, dtype=torch.uint8)
    for nz in nonzero:
        kept += nz
    over = kept > n
    if over.any():
        r, g = (int(v) for v in over.nonzero()[0])
        return torch.empty(0, dtype=torch.uint8), (r, g, int(kept[r, g]))
    # selected_p: nonzero, or one of the first (n - kept) zeros; taken_p counts selections so far.
    missing = n - kept
    zeros_seen = torch.zeros_like(kept)
    taken = []
    count = torch.zeros_like(kept)
    for nz in nonzero:
        zero = ~nz
        pad = zero & (zeros_seen < missing)
        zeros_seen += zero
        count += nz | pad
        taken.append(count.clone())
    # The j-th selected position is the number of positions whose running count is still <= j.
    positions = torch.zeros(n, rows, groups, dtype=torch.uint8)
    for j in range(n):
        for c in taken[:-1]:
            positions[j] += c <= j
    positions = positions.permute(1, 2, 0).contiguous()
    return positions, None


@register_format("nm")
class NmWeight(QuantizableWeight):
    """A weight in N:M form (see module doc)."""

    def __init__(
        self,
        shape: tuple[int, int],
        value_type: str,
        n: int,
        m: int,
        values: torch.Tensor,
        indices: torch.Tensor,
        scales: torch.Tensor | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
    ) -> None:
        super().__init__(shape, value_type, scales, group_size)
        self.n, self.m = n, m
        self.values = values
        self.indices = indices

    @property
    def fields_per_row(self) -> int:
        return self.cols // self.m * self.n

    @classmethod
    def pack(cls, weight: torch.Tensor, value_type: str = "fp32", **options) -> NmWeight:
        check_options(options, (*_OPTIONS, "scales"), "nm")
        n, m = _check_nm(options.get("n", 2), options.get("m", 4))
        group_size = group_size_of(options)
        w = prepare_weight(weight)
        rows, cols = w.shape
        if cols % m:
            raise FormatError(f"nm {n}:{m} needs cols divisible by {m}, got a weight of shape {(rows, cols)}")
        groups = cols // m
        positions, too_many = _select_positions(w, n, m)
        if too_many is not None:
            r, g, k = too_many
            raise FormatError(
                f"weight is not {n}:{m} sparse: row {r}, columns {g * m}..{g * m + m - 1} keep "
                f"{k} nonzeros (at most {n} allowed); prune it to {n}:{m} first"
            )
        levels, scales = quantize(w, value_type, group_size, options.get("scales"))
        picked = levels.view(rows, groups, m).gather(2, positions.to(torch.int64))
        values = encode(picked.reshape(-1), value_type)
        indices = pack_fields(positions.view(rows, groups * n), index_bits(m))
        return cls((rows, cols), value_type, n, m, values, indices, scales, group_size)

    def positions(self) -> torch.Tensor:
        """int64 ``[rows, cols/M, N]``: the in-group column of every stored value."""
        k = self.fields_per_row
        return unpack_fields(self.indices, k, index_bits(self.m)).view(self.rows, self.cols // self.m, self.n)

    def unpack(self) -> torch.Tensor:
        rows, cols = self.shape
        groups = cols // self.m
        count = rows * groups * self.n
        vals = decode(self.values, self.value_type, count).to(torch.float32).view(rows, groups, self.n)
        dense = torch.zeros(rows, groups, self.m, dtype=torch.float32)
        dense.scatter_(2, self.positions(), vals)
        return dequantize(dense.view(rows, cols), self.value_type, self.scales, self.group_size)

    def options(self) -> dict[str, object]:
        return {"n": self.n, "m": self.m, **super().options()}

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return self._stored_tensors(prefix, values=self.values, indices=self.indices)

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor], **options) -> NmWeight:
        check_options(options, _OPTIONS, "nm")
        n, m = _check_nm(options.get("n", 2), options.get("m", 4))
        group_size = group_size_of(options)
        rows, cols = read_shape(tensors, prefix)
        if cols % m:
            raise FormatError(f"tensor '{prefix}.shape' has cols={cols}, not a multiple of m={m}")
        k = cols // m * n
        bits = index_bits(m)
        name = f"{prefix}.indices"
        why = f"{k} positions of {bits} bits a row for {n}:{m}"
        indices = require_tensor(tensors, name, torch.uint8, (rows, (k * bits + 7) // 8), why)
        indices = indices.contiguous()
        pos = unpack_fields(indices, k, bits).view(rows, cols // m, n)
        if (pos >= m).any() or (n > 1 and (pos[:, :, 1:] <= pos[:, :, :-1]).any()):
            raise FormatError(
                f"tensor {name!r} holds in-group positions that are >= {m} or not strictly increasing; "
                f"check the n and m options ({n}:{m})"
            )
        used = k * bits
        if used % 8 and rows and (indices[:, -1] >> (used % 8)).any():
            raise FormatError(f"tensor {name!r} has nonzero padding bits after the last position")
        values, value_type = read_values(tensors, f"{prefix}.values", rows * k)
        scales = read_scales(tensors, prefix, value_type, rows, cols, group_size)
        return cls((rows, cols), value_type, n, m, values, indices, scales, group_size)

    def __repr__(self) -> str:
        return f"NmWeight(shape={self.shape}, value_type={self.value_type!r}, n={self.n}, m={self.m})"
