"""Dense layers on the CUDA target: cuBLAS through ``torch.nn.functional.linear``.

A layer that stays dense (``lm_head``, an unpruned model, a layer where sparsity does not pay)
gains nothing from a hand-written GEMV: cuBLAS already streams a dense weight at close to the
memory bandwidth. ``DenseCudaLinear`` keeps the weight on the device in the value type's own
dtype (fp32, fp16 or bf16; int8 and int4 weights are dequantized once to fp32, exactly, since
cuBLAS has no weight-only integer GEMV: a dense layer gains nothing from them here) and has the call contract of
:class:`~sparsec.codegen.cuda.kernel.CudaLinearKernel`. Under the CUDA simulator it runs the
same torch code on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsec.formats.base import PackedWeight

_STORE_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                "int8": torch.float32, "int4": torch.float32}

_ACTIVATIONS = {
    None: lambda y: y,
    "relu": torch.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
}


class DenseCudaLinear:
    """``y = act(x @ W^T + bias)`` with the dense weight on the device (cuBLAS).

    ``x`` float32 or float16 ``[..., cols]`` on the weight's device; ``y`` has x's dtype.
    Products run in the weight's dtype with float32 accumulation (cuBLAS' default for fp16/bf16).
    """

    format_name = "dense"

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, activation: str | None,
                 device: torch.device) -> None:
        self.value_type = packed.value_type
        self.rows, self.cols = packed.shape
        self.activation = activation
        self.has_bias = bias is not None
        dtype = _STORE_DTYPE[packed.value_type]
        self.weight = packed.unpack().to(device=device, dtype=dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(device=device, dtype=torch.float32).clone()
        self.device_index = device.index if device.type == "cuda" else None

    def __repr__(self) -> str:
        act = f", activation={self.activation!r}" if self.activation else ""
        return (f"DenseCudaLinear({self.value_type}, rows={self.rows}, cols={self.cols}{act}, "
                f"bias={self.has_bias})")

    def nbytes(self) -> int:
        """Bytes this layer holds on the device (weight and bias)."""
        return self.weight.numel() * self.weight.element_size() + (0 if self.bias is None else self.bias.numel() * 4)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float32, torch.float16):
            raise TypeError(f"x must be float32 or float16, got {x.dtype}; convert it with x.float() or x.half()")
        if x.dim() == 0 or x.shape[-1] != self.cols:
            raise ValueError(f"x has shape {tuple(x.shape)} but this layer takes [..., {self.cols}] (its weight is "
                             f"{self.rows} x {self.cols}); pass inputs whose last dimension is {self.cols}")
        if x.device != self.weight.device:
            raise ValueError(f"x is on {x.device} but this layer's weight is on {self.weight.device}; "
                             f"move x there with x.to('{self.weight.device}')")
        return cublas_linear(x.detach(), self.weight, self.bias, self.activation)


def cublas_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  activation: str | None) -> torch.Tensor:
    """``act(x @ weight^T + bias)`` by ``torch.nn.functional.linear`` in ``weight``'s dtype (cuBLAS
    accumulates fp16 and bf16 in float32), then the bias and activation in float32, as the
    kernels' epilogue does; returned in ``x``'s dtype."""
    y = F.linear(x.to(weight.dtype), weight).float()
    if bias is not None:
        y = y + bias
    return _ACTIVATIONS[activation](y).to(x.dtype)
