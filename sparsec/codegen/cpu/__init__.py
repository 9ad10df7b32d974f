"""CPU kernels: packed sparse (and quantized) weights run as ``y = act(x @ W^T + bias)``.

The contract the runtime calls::

    from sparsec.codegen.cpu import build_linear_kernel, available_kernels
    kernel = build_linear_kernel(packed, bias=None, activation="gelu")
    y = kernel(x)                  # x float32 [..., cols] -> float32 [..., rows]
    kernel.compile_seconds         # compile time this kernel caused (0 if its variants existed)
    kernel.format_name, kernel.value_type

Kernels are Numba-compiled from generated source per (format, value type) and shared by every
layer of that value type (shapes, batch and activation are run-time arguments). The bitmask
kernels use AVX-512 expand instructions, VNNI (int8/int4) and AVX512-BF16 dot products through
LLVM intrinsics (:mod:`.simd`) when the CPU has them, and a portable loop otherwise; see
docs/performance.md for what they measure and why.
"""

from __future__ import annotations

import torch

from sparsec.codegen.cpu.kernel import ACTIVATIONS, CpuLinearKernel, KernelError
from sparsec.formats.base import VALUE_TYPES, PackedWeight

#: formats with a dedicated kernel here (others run through torch on the unpacked weight).
KERNEL_FORMATS: tuple[str, ...] = ("bitmask", "csr", "nm", "dense")


def build_linear_kernel(
    packed: PackedWeight, bias: torch.Tensor | None = None, activation: str | None = None
) -> CpuLinearKernel:
    """Bind ``packed`` (any registered format and value type) to a CPU kernel.

    ``bias``: float ``[rows]`` or ``None``. ``activation``: ``None``, ``"relu"``, ``"gelu"``
    (exact erf form, torch's default) or ``"silu"``. Raises :class:`KernelError` naming what to
    change for a bad argument; ``packed`` and ``bias`` are never modified.
    """
    return CpuLinearKernel(packed, bias, activation)


def available_kernels() -> list[tuple[str, str]]:
    """``(format, value_type)`` pairs that run a kernel written for that format."""
    return [(f, vt) for f in KERNEL_FORMATS for vt in VALUE_TYPES]


__all__ = ["ACTIVATIONS", "CpuLinearKernel", "KernelError", "available_kernels", "build_linear_kernel"]
