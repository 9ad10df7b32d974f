"""The ``block`` format: a bitmap of nonzero ``BR x BC`` blocks plus each kept block stored dense.

The matrix is tiled into ``ceil(rows/BR) x ceil(cols/BC)`` blocks (edge blocks are padded with
zeros to the full block). A block is kept iff any of its weights is nonzero. Tensors under
``prefix``:

=======================  =================================  ==================================
``.shape``               int64 ``[2]``                      ``(rows, cols)``
``.block_mask``          uint8 ``[RB, ceil(CB/8)]``         bit ``j`` of byte ``b`` in block row
                                                            ``R`` is block column ``8*b + j``
                                                            (little-endian, as in ``bitmask``)
``.block_row_offsets``   int64 ``[RB]``                     index (in blocks) of block row
                                                            ``R``'s first kept block
``.values``              1-D, value-type dtype              kept blocks in row-major block order,
                                                            each ``BR*BC`` values row-major inside
                                                            the block; int4: two a byte
``.scales``              float32 (int8/int4 only)           ``[rows]`` or
                                                            ``[rows, ceil(cols/group_size)]``
=======================  =================================  ==================================

``RB = ceil(rows/BR)``, ``CB = ceil(cols/BC)``. Options: ``block_shape`` (``(BR, BC)`` or a string
``"4x4"``; default ``(1, 16)``) and ``group_size`` (int4). Blocks pay where pruning was done by
block: a kernel loads a whole block with one vector load and no per-weight decode.

Example::

    p = BlockWeight.pack(w, "bf16", block_shape="4x4")
    assert p.options() == {"block_shape": (4, 4)}
"""

from __future__ import annotations

import math

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

_OPTIONS = ("block_shape", "group_size")
DEFAULT_BLOCK_SHAPE = (1, 16)


def parse_block_shape(value: object) -> tuple[int, int]:
    """``(BR, BC)`` from a pair of positive ints or a string like ``"4x4"``."""
    parts: object = value
    if isinstance(value, str):
        parts = value.lower().split("x")
    try:
        br, bc = (int(p) for p in parts)  # type: ignore[union-attr]
        ok = br >= 1 and bc >= 1 and not any(isinstance(p, (bool, float)) for p in parts)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise FormatError(f"block_shape must be two positive integers like (4, 4) or '1x16', got {value!r}")
    return br, bc


@register_format("block")
class BlockWeight(QuantizableWeight):
    """A weight stored as dense blocks behind a block bitmap (see module doc)."""

    def __init__(
        self,
        shape: tuple[int, int],
        value_type: str,
        block_shape: tuple[int, int],
        values: torch.Tensor,
        block_mask: torch.Tensor,
        block_row_offsets: torch.Tensor,
        scales: torch.Tensor | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
    ) -> None:
        super().__init__(shape, value_type, scales, group_size)
        self.block_shape = block_shape
        self.values = values
        self.block_mask = block_mask
        self.block_row_offsets = block_row_offsets

    @property
    def grid(self) -> tuple[int, int]:
        """``(RB, CB)``: blocks down and across."""
        br, bc = self.block_shape
        return math.ceil(self.rows / br), math.ceil(self.cols / bc)

    def kept_blocks(self) -> torch.Tensor:
        """Bool ``[RB, CB]``: which blocks are stored."""
        return unpack_bits(self.block_mask, self.grid[1])

    @classmethod
    def pack(cls, weight: torch.Tensor, value_type: str = "fp32", **options) -> BlockWeight:
        check_options(options, (*_OPTIONS, "scales"), "block")
        br, bc = parse_block_shape(options.get("block_shape", DEFAULT_BLOCK_SHAPE))
        w, levels, scales, group_size = quantize_for_pack(weight, value_type, options)
        rows, cols = w.shape
        rb, cb = math.ceil(rows / br), math.ceil(cols / bc)
        pad = (0, cb * bc - cols, 0, rb * br - rows)
        tiles = torch.nn.functional.pad(levels, pad).view(rb, br, cb, bc).permute(0, 2, 1, 3)
        nonzero = torch.nn.functional.pad((w != 0).to(torch.uint8), pad).view(rb, br, cb, bc)
        kept = nonzero.amax(dim=(1, 3)).bool()
        counts = kept.sum(dim=1)
        offsets = torch.cumsum(counts, 0) - counts
        values = encode(tiles[kept].reshape(-1), value_type)
        return cls((rows, cols), value_type, (br, bc), values, pack_bits(kept), offsets, scales, group_size)

    def unpack(self) -> torch.Tensor:
        rows, cols = self.shape
        br, bc = self.block_shape
        rb, cb = self.grid
        kept = self.kept_blocks()
        nblocks = int(kept.sum())
        vals = decode(self.values, self.value_type, nblocks * br * bc).to(torch.float32)
        tiles = torch.zeros(rb, cb, br, bc, dtype=torch.float32)
        tiles[kept] = vals.view(nblocks, br, bc)
        dense = tiles.permute(0, 2, 1, 3).reshape(rb * br, cb * bc)[:rows, :cols]
        return dequantize(dense.contiguous(), self.value_type, self.scales, self.group_size)

    def options(self) -> dict[str, object]:
        return {"block_shape": self.block_shape, **super().options()}

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return self._stored_tensors(
            prefix, block_mask=self.block_mask, block_row_offsets=self.block_row_offsets, values=self.values
        )

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor], **options) -> BlockWeight:
        check_options(options, _OPTIONS, "block")
        br, bc = parse_block_shape(options.get("block_shape", DEFAULT_BLOCK_SHAPE))
        group_size = group_size_of(options)
        rows, cols = read_shape(tensors, prefix)
        rb, cb = math.ceil(rows / br), math.ceil(cols / bc)
        name = f"{prefix}.block_mask"
        block_mask = require_tensor(tensors, name, torch.uint8, (rb, (cb + 7) // 8), f"{rb} x {cb} blocks of {br}x{bc}")
        block_mask = block_mask.contiguous()
        if cb % 8 and rb and (block_mask[:, -1] >> (cb % 8)).any():
            raise FormatError(f"tensor {name!r} has bits set past block column {cb}")
        counts = unpack_bits(block_mask, cb).sum(dim=1)
        name = f"{prefix}.block_row_offsets"
        offsets = require_tensor(tensors, name, torch.int64, (rb,), "one offset per block row")
        expected = torch.cumsum(counts, 0) - counts
        if not torch.equal(offsets, expected):
            bad = int((offsets != expected).nonzero()[0, 0])
            raise FormatError(
                f"tensor {name!r} is inconsistent with the block mask: block row {bad} starts at "
                f"{int(offsets[bad])} but the blocks above it number {int(expected[bad])}"
            )
        nblocks = int(counts.sum())
        values, value_type = read_values(tensors, f"{prefix}.values", nblocks * br * bc)
        scales = read_scales(tensors, prefix, value_type, rows, cols, group_size)
        out = cls((rows, cols), value_type, (br, bc), values, block_mask, offsets.contiguous(), scales, group_size)
        if (rows % br or cols % bc) and nblocks:
            # Edge blocks pad past the matrix; a value stored there would be silently dropped.
            kept = out.kept_blocks()
            vals = decode(values, value_type, nblocks * br * bc).to(torch.float32)
            tiles = torch.zeros(rb, cb, br, bc)
            tiles[kept] = vals.view(nblocks, br, bc)
            full = tiles.permute(0, 2, 1, 3).reshape(rb * br, cb * bc)
            if full[rows:].any() or full[:, cols:].any():
                raise FormatError(f"tensor '{prefix}.values' holds nonzero values in the padding past the matrix edge")
        return out

    def __repr__(self) -> str:
        br, bc = self.block_shape
        return f"BlockWeight(shape={self.shape}, value_type={self.value_type!r}, block={br}x{bc})"
