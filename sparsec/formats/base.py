"""The contract every storage format keeps, and the registry that names them.

A *format* is how one weight matrix ``W`` of shape ``[rows, cols]`` (``rows`` = output features,
``cols`` = input features, the ``nn.Linear`` layout) is stored for a kernel to read. A
:class:`PackedWeight` is one such stored matrix: it can rebuild the dense matrix exactly
(``unpack``), says exactly how many bytes it occupies (``nbytes``, the quantity memory-bound
kernels are judged by), and hands out its tensors for safetensors under a name prefix.

Value types (``value_type``) are shared by every sparse format; the kept values are stored as:

===========  ===============================================================================
``fp32``     ``torch.float32``
``bf16``     ``torch.bfloat16``
``fp16``     ``torch.float16``
``int8``     ``torch.int8``, symmetric, one float32 scale per output row (``scales[rows]``)
``int4``     two signed 4-bit values a byte (``torch.uint8``; element ``2k`` in the low nibble,
             ``2k+1`` in the high nibble), symmetric in ``[-8, 7]``, one float32 scale per row
             and group of ``group_size`` dense columns (``scales[rows, ceil(cols/group_size)]``)
===========  ===============================================================================

Quantization is applied to the *kept* values only, so a pruned weight stays exactly zero.

This module knows nothing of graphs, passes or kernels (see DESIGN.md: ``formats`` is a leaf).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar

import torch

VALUE_TYPES: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8", "int4")

#: torch dtype that holds the stored values of each value type.
STORAGE_DTYPE: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": torch.int8,
    "int4": torch.uint8,
}


class FormatError(ValueError):
    """A weight cannot be packed, or stored tensors do not describe a valid packed weight."""


def all_finite(t: torch.Tensor) -> bool:
    """True iff a float tensor holds no NaN or Inf.

    One min/max reduction (NaN and Inf propagate into it): several times faster than
    ``torch.isfinite(t).all()`` on a large weight, which materializes a bool tensor.
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


class PackedWeight(abc.ABC):
    """One weight matrix in one storage format.

    Subclasses are registered with :func:`register_format` under ``format_name``. Every
    subclass guarantees ``unpack(pack(w)) == w`` bit for bit for float value types whose dtype
    represents ``w`` exactly, and up to the quantization grid for ``int8``/``int4``.
    """

    format_name: ClassVar[str]

    shape: tuple[int, int]
    value_type: str

    @classmethod
    @abc.abstractmethod
    def pack(cls, weight: torch.Tensor, value_type: str = "fp32", **options) -> PackedWeight:
        """Store a dense (already masked) ``[rows, cols]`` weight; zeros are the pruned entries."""

    @abc.abstractmethod
    def unpack(self) -> torch.Tensor:
        """The dense ``[rows, cols]`` float32 matrix this packed weight stands for."""

    @abc.abstractmethod
    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every stored tensor, keyed ``f"{prefix}.{field}"``, ready for safetensors."""

    @classmethod
    @abc.abstractmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor], **options) -> PackedWeight:
        """Inverse of :meth:`tensors`; raises :class:`FormatError` naming the bad tensor."""

    def options(self) -> dict[str, object]:
        """The keyword options :meth:`from_tensors` needs to rebuild this weight.

        E.g. ``{"group_size": 128}`` for int4 values, ``{"n": 2, "m": 4}`` for N:M. An artifact
        records them beside the tensors so ``from_tensors(prefix, t, **w.options())`` round-trips.
        """
        return {}

    def clone(self) -> PackedWeight:
        """An independent copy: its own tensors, the same format and options (benchmarks rotate
        over such copies so that each call reads its weight from memory, not cache)."""
        tensors = {k: v.clone() for k, v in self.tensors("w").items()}
        return type(self).from_tensors("w", tensors, **self.options())

    def nbytes(self) -> int:
        """Exact bytes of every stored tensor (values, masks, indices, scales, shape)."""
        return sum(t.numel() * t.element_size() for t in self.tensors("w").values())

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    def bits_per_weight(self) -> float:
        """Stored bits per dense weight position: the quantity that decides decode speed."""
        return 8.0 * self.nbytes() / max(1, self.rows * self.cols)


_FORMATS: dict[str, type[PackedWeight]] = {}


def register_format(name: str) -> Callable[[type[PackedWeight]], type[PackedWeight]]:
    """Class decorator: register a :class:`PackedWeight` subclass under ``name`` (unique)."""

    def decorate(cls: type[PackedWeight]) -> type[PackedWeight]:
        if name in _FORMATS:
            raise ValueError(f"format {name!r} is already registered by {_FORMATS[name].__qualname__}")
        cls.format_name = name
        _FORMATS[name] = cls
        return cls

    return decorate


def format_class(name: str) -> type[PackedWeight]:
    """The registered class for ``name``; a clear error listing the known names otherwise."""
    try:
        return _FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(_FORMATS)) or "(none)"
        raise FormatError(f"unknown format {name!r}; known formats: {known}") from None


def registered_formats() -> list[str]:
    return sorted(_FORMATS)


def pack(weight: torch.Tensor, format: str, value_type: str = "fp32", **options) -> PackedWeight:
    """Pack ``weight`` into the registered ``format`` with ``value_type`` values."""
    if value_type not in VALUE_TYPES:
        raise FormatError(f"unknown value type {value_type!r}; choose one of {', '.join(VALUE_TYPES)}")
    if weight.dim() != 2:
        raise FormatError(f"formats store 2-D [rows, cols] weights, got shape {tuple(weight.shape)}")
    if weight.is_floating_point() and not all_finite(weight):
        raise FormatError("weight holds NaN or Inf values; fix the model before packing")
    return format_class(format).pack(weight, value_type=value_type, **options)
