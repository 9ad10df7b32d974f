"""``lower-cpu`` / ``lower-cuda``: pack every weighted linear op for its kernel.

Lowering is the last pass of a pipeline. For each linear (and GPT-2 style transposed ``addmm``)
op it decides the storage format and value type, packs the effective weight (``weight * mask``,
already dequantized by a quantization pass if one ran) with ``sparsec.formats``, and records
``meta.LOWERING`` and ``meta.PACKED`` on the node. The graph itself is unchanged: the runtime
replaces every lowered node with a call of its kernel (passes never import the runtime).

Format and value type come from ``select-format`` (``meta.FORMAT``) and ``quantize``
(``meta.QUANT``) when those ran; otherwise a masked layer is stored as a bitmask and an unmasked
one stays dense, with the values in ``value_type`` (default fp32). ``lower-cuda`` may also
name the bitmask kernel design (``design=runs``), and the rows from which a call runs cuBLAS on
the dense weight instead (``dense_from``); the runtime builds the kernel so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from sparsec.formats import VALUE_TYPES, pack, registered_formats
from sparsec.formats.base import all_finite
from sparsec.ir import meta
from sparsec.passes.base import Pass, PassContext, PassError, PassOptionError, PassResult, register_pass


class _Lower(Pass):
    target: ClassVar[str] = ""
    preserves_numerics: ClassVar[bool] = False  # value types may round (bf16, int8)

    format: str = "auto"
    value_type: str = "auto"
    group: int = 128

    def validate(self) -> None:
        if self.format != "auto" and self.format not in registered_formats():
            raise PassOptionError(f"{self.name}: unknown format {self.format!r}; "
                                  f"use auto or one of {', '.join(registered_formats())}")
        if self.value_type != "auto" and self.value_type not in VALUE_TYPES:
            raise PassOptionError(f"{self.name}: unknown value_type {self.value_type!r}; "
                                  f"use auto or one of {', '.join(VALUE_TYPES)}")
        if self.group < 1:
            raise PassOptionError(f"{self.name}: group must be positive, got {self.group}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        lowered = 0
        for node in gm.graph.nodes:
            layer = node.meta.get(meta.LAYER)
            if layer is None or layer.kind not in ("linear", "addmm_t"):
                continue
            fmt, vt, group = self._choose(node)
            weight = layer.matrix(gm).detach()
            _check_finite(layer.name, "weight", weight)
            if layer.bias:
                _check_finite(layer.name, "bias", gm.get_parameter(layer.bias).detach())
            if meta.MASK in node.meta:
                weight = weight * layer.as_matrix(gm.get_buffer(node.meta[meta.MASK]))
            options = {"group_size": group} if vt == "int4" else {}
            options.update(self._pack_options(node, fmt, vt, group))
            packed = pack(weight.float().contiguous(), fmt, value_type=vt, **options)
            node.meta[meta.LOWERING] = {"target": self.target, "format": fmt, "value_type": vt,
                                        "group_size": group if vt == "int4" else None,
                                        **self._kernel_options(fmt)}
            node.meta[meta.PACKED] = packed
            lowered += 1
        return PassResult(gm, modified=lowered > 0)

    def _kernel_options(self, fmt: str) -> dict:
        """Options for the kernel builder that the packed weight does not carry."""
        return {}

    @staticmethod
    def _pack_options(node: fx.Node, fmt: str, vt: str, group: int) -> dict:
        """Format options chosen by select-format (n/m, block_shape) and the scales quantize used,
        so a GPTQ weight packs back to exactly its levels; only where they apply to this choice."""
        out = {}
        decided = node.meta.get(meta.FORMAT, {})
        if decided.get("format") == fmt:
            out.update(decided.get("options", {}))
        quant = node.meta.get(meta.QUANT, {})
        bits = {"int8": 8, "int4": 4}.get(vt)
        if quant.get("scales") is not None and quant.get("bits") == bits and (bits == 8 or quant.get("group") == group):
            out["scales"] = quant["scales"]
        return out

    def _choose(self, node: fx.Node) -> tuple[str, str, int]:
        decided = node.meta.get(meta.FORMAT, {})
        quant = node.meta.get(meta.QUANT, {})
        fmt = self.format if self.format != "auto" else decided.get(
            "format", "bitmask" if meta.MASK in node.meta else "dense")
        if self.value_type != "auto":
            vt = self.value_type
        elif "value_type" in decided:
            vt = decided["value_type"]
        elif quant.get("bits") == 8:
            vt = "int8"
        elif quant.get("bits") == 4:
            vt = "int4"
        else:
            vt = "fp32"
        group = int(quant.get("group") or self.group)
        return fmt, vt, group


def _check_finite(layer: str, what: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise PassError(f"layer {layer!r} has {bad} NaN/Inf {what} value(s); fix these values in the model "
                        f"before compiling")


@register_pass
@dataclass
class LowerCpu(_Lower):
    """Pack each linear layer's weight for its CPU kernel (Numba/LLVM) and mark it for the runtime."""

    name: ClassVar[str] = "lower-cpu"
    target: ClassVar[str] = "cpu"
    format: str = "auto"
    value_type: str = "auto"
    group: int = 128


#: The CUDA bitmask kernel designs ``lower-cuda{design=...}`` accepts; the same names as
#: ``sparsec.codegen.cuda.BITMASK_DESIGNS`` (a test keeps them equal: passes do not import codegen).
CUDA_BITMASK_DESIGNS: tuple[str, ...] = ("lanes", "runs", "tiles", "mma")
#: Value types the ``mma`` design runs (``sparsec.codegen.cuda.bitmask_mma.VALUE_TYPES``).
MMA_VALUE_TYPES: tuple[str, ...] = ("fp16", "int8")
#: ``lower-cuda``'s default ``dense_from`` (``sparsec.codegen.cuda.DENSE_FROM_ROWS``; a test keeps
#: them equal).
CUDA_DENSE_FROM_ROWS = 64


@register_pass
@dataclass
class LowerCuda(_Lower):
    """Pack each linear layer's weight for its CUDA kernel (numba-cuda) and mark it for the runtime.

    ``design``: the bitmask kernel (``auto``: the code generator's default; see
    ``sparsec.codegen.cuda.build_linear_kernel``); other formats ignore it.

    ``dense_from``: from this many rows of ``x`` on (a prompt's prefill), a sparse layer's call
    runs one cuBLAS product on its dense weight, unpacked on the first such call and kept on the
    GPU; ``0``: never, every call stays sparse and no dense copy is made (for a server that
    cannot hold one). Dense layers run cuBLAS at any batch and ignore it.
    """

    name: ClassVar[str] = "lower-cuda"
    target: ClassVar[str] = "cuda"
    format: str = "auto"
    value_type: str = "auto"
    group: int = 128
    design: str = "auto"
    dense_from: int = CUDA_DENSE_FROM_ROWS

    def validate(self) -> None:
        super().validate()
        if isinstance(self.dense_from, bool) or not isinstance(self.dense_from, int) or self.dense_from < 0:
            raise PassOptionError(f"{self.name}: dense_from must be a whole number of rows (0: never run the "
                                  f"dense weight), got {self.dense_from!r}")
        if self.design != "auto" and self.design not in CUDA_BITMASK_DESIGNS:
            raise PassOptionError(f"{self.name}: unknown design {self.design!r}; "
                                  f"use auto or one of {', '.join(CUDA_BITMASK_DESIGNS)}")
        if self.design == "mma" and self.value_type not in ("auto",) + MMA_VALUE_TYPES:
            raise PassOptionError(f"{self.name}: design mma runs {' or '.join(MMA_VALUE_TYPES)} values, "
                                  f"not {self.value_type}; set value_type to one of those or choose another design")

    def _choose(self, node: fx.Node) -> tuple[str, str, int]:
        fmt, vt, group = super()._choose(node)
        if self.design == "mma" and fmt == "bitmask" and vt not in MMA_VALUE_TYPES:
            raise PassOptionError(f"{self.name}: design mma runs {' or '.join(MMA_VALUE_TYPES)} values, but layer "
                                  f"{node.meta[meta.LAYER].name} would get {vt}; add value_type=fp16 (or quantize "
                                  "to 8 bits)")
        return fmt, vt, group

    def _kernel_options(self, fmt: str) -> dict:
        options: dict = {"design": self.design} if self.design != "auto" and fmt == "bitmask" else {}
        if self.dense_from != CUDA_DENSE_FROM_ROWS and fmt != "dense":
            options["dense_from"] = self.dense_from or None  # None: never
        return options


