"""``quantize``: put each chosen linear weight on an int8 or int4 grid; pruned weights stay zero.

The pass changes the weight parameter to its quantized value (``q * scale``, still a float
tensor, so the graph keeps computing with what the kernels will compute) and records under
``meta.QUANT`` how: ``{"bits", "group", "method", "scales"}``. ``lower-cpu``/``lower-cuda`` then
pack the weight with those scales, which gives back exactly the levels chosen here.

Grids (the same as :mod:`sparsec.formats.values`): ``bits=8`` is symmetric per output channel,
``scale = max|w_row| / 127``; ``bits=4`` is symmetric per group of ``group`` input columns,
``scale = max|w_group| / 7``, levels in ``[-8, 7]``. Only kept weights set a scale, and a pruned
weight (mask 0) is quantized to exactly zero.

Methods:

* ``rtn``: round to nearest. No data needed.
* ``gptq``: GPTQ (Frantar et al., 2022): columns are quantized left to right and each column's
  rounding error is spread over the columns not yet quantized, weighted by the inverse Hessian
  ``H = 2 X^T X / n`` of the layer's calibration inputs. Pruned weights count as quantized to
  zero, so their error is compensated too while they stay zero. int8 scales come from the
  weight before any update; an int4 group's scale from the group's values when its first column
  is reached, as in the reference implementation. Needs ``ctx.calibration``; the calibration
  engine and damped inverse Hessian are the ones SparseGPT uses (``passes/calibration.py``).

Example pipeline: ``prune-sparsegpt{sparsity=0.5},quantize{bits=4,group=128,method=gptq},lower-cpu``.
All or nothing: on any error every chosen weight is restored bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from sparsec.formats.values import dequantize, quantize
from sparsec.ir import meta
from sparsec.ir.layers import WeightedLayer
from sparsec.passes.base import Pass, PassContext, PassOptionError, PassResult, register_pass
from sparsec.passes.calibration import (
    CalibrationError,
    LayerStatistics,
    calibrate_layers,
    calibration_from_context,
    inverse_hessian_cholesky,
)
from sparsec.passes.masks import DEFAULT_IGNORE, check_finite, current_mask, select_layers

METHODS = ("rtn", "gptq")


def value_type_for(bits: int) -> str:
    return {8: "int8", 4: "int4"}[bits]


def rtn_quantize(
    w: torch.Tensor, keep: torch.Tensor | None, bits: int, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(w_hat float32 [out, in], scales)``; zero wherever ``keep`` is False."""
    w = w.detach().to(torch.float32)
    if keep is not None:
        w = w * keep
    vt = value_type_for(bits)
    levels, scales = quantize(w, vt, group)
    return dequantize(levels, vt, scales, group), scales


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    keep: torch.Tensor | None,
    bits: int,
    group: int,
    blocksize: int = 128,
    percdamp: float = 0.01,
    layer: str = "",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """GPTQ on one ``[out, in]`` weight: ``(w_hat float32, scales float32, loss)``.

    ``loss`` is GPTQ's proxy ``sum err^2 / 2`` of the scaled column errors. ``keep`` (bool, True =
    kept) pins pruned weights at zero. Works in float64; ``w`` and ``hessian`` are not modified.
    """
    rows, cols = w.shape
    W = w.detach().to(torch.float64).clone()
    K = torch.ones_like(W, dtype=torch.bool) if keep is None else keep.to(torch.bool)
    W = W * K
    U, _dead = inverse_hessian_cholesky(hessian, percdamp, layer)
    qmax = 127 if bits == 8 else 7
    qmin = -127 if bits == 8 else -8
    groups = -(-cols // group)
    if bits == 8:
        scales = W.abs().amax(dim=1, keepdim=True) / qmax if cols else torch.zeros(rows, 1, dtype=torch.float64)
        # The float32 scale is what gets stored: round with it, not with the float64 one.
        scales = scales.to(torch.float32).to(torch.float64)
    else:
        scales = torch.zeros(rows, groups, dtype=torch.float64)
        # Whole groups per batch, so a group's current values all sit in the batch being updated.
        blocksize = max(1, round(blocksize / group)) * group
    Q = torch.zeros_like(W)
    loss = torch.zeros(rows, dtype=torch.float64)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        H1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if bits == 4 and c % group == 0:
                # The group's current values, every earlier column's error already spread in.
                g_end = min(c + group, cols)
                vals = W1[:, i : g_end - i1] * K[:, c:g_end]
                s = vals.abs().amax(dim=1) / qmax
                scales[:, c // group] = s.to(torch.float32).to(torch.float64)
            s = scales[:, 0] if bits == 8 else scales[:, c // group]
            safe = torch.where(s > 0, s, torch.ones_like(s))
            wcol = W1[:, i]
            q = torch.clamp(torch.round(wcol / safe), qmin, qmax) * s
            q = torch.where(K[:, c], q, torch.zeros_like(q))
            Q[:, c] = q
            d = H1[i, i]
            err = (wcol - q) / d
            loss += err**2 / 2
            W1[:, i:] -= err.unsqueeze(1) * H1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if not torch.isfinite(Q).all():
        raise CalibrationError(f"layer {layer!r}: GPTQ produced NaN/Inf weights; increase percdamp")
    out_scales = scales[:, 0] if bits == 8 else scales
    return Q.to(torch.float32), out_scales.to(torch.float32).contiguous(), float(loss.sum())


@register_pass
@dataclass
class Quantize(Pass):
    """Quantize linear weights to int8 (per output channel) or int4 (per group); pruned weights stay exactly zero.

    Options: ``bits`` 8|4; ``group`` input columns per int4 scale; ``method`` rtn|gptq;
    ``blocksize`` and ``percdamp`` (GPTQ's lazy-update width and Hessian damping); ``layers`` /
    ``ignore`` glob patterns as in the pruning passes (default: skip lm_head and embeddings).
    """

    name: ClassVar[str] = "quantize"
    bits: int = 8
    group: int = 128
    method: str = "rtn"
    blocksize: int = 128
    percdamp: float = 0.01
    layers: str = ""
    ignore: str = DEFAULT_IGNORE

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise PassOptionError(f"{self.name}: bits must be 8 or 4, got {self.bits}")
        if self.group < 1:
            raise PassOptionError(f"{self.name}: group must be a positive number of columns, got {self.group}")
        if self.method not in METHODS:
            raise PassOptionError(f"{self.name}: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.blocksize < 1:
            raise PassOptionError(f"{self.name}: blocksize must be positive, got {self.blocksize}")
        if not (0.0 <= self.percdamp < 1e3):
            raise PassOptionError(f"{self.name}: percdamp must be >= 0 (typically 0.01), got {self.percdamp}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        chosen = select_layers(gm, self.layers, self.ignore, kinds="linear,addmm_t")
        check_finite(gm, chosen)
        if not chosen:
            return PassResult(gm, modified=False)
        calibration = calibration_from_context(ctx, f"{self.name}{{method=gptq}}") if self.method == "gptq" else None
        saved = {layer.weight: gm.get_parameter(layer.weight).detach().clone() for layer in chosen}
        records: dict[str, dict] = {}

        def store(layer: WeightedLayer, w_hat: torch.Tensor, scales: torch.Tensor, extra: dict) -> None:
            weight = gm.get_parameter(layer.weight)
            with torch.no_grad():
                weight.copy_(layer.to_param_layout(w_hat.to(weight.dtype), weight.shape))
            records[layer.weight] = {
                "bits": self.bits,
                "group": self.group if self.bits == 4 else None,
                "method": self.method,
                "scales": scales,
                **extra,
            }

        try:
            if self.method == "rtn":
                for layer in chosen:
                    w_hat, scales = rtn_quantize(layer.matrix(gm), current_mask(gm, layer), self.bits, self.group)
                    store(layer, w_hat, scales, {})
            else:

                def on_layer(layer: WeightedLayer, stats: LayerStatistics) -> None:
                    w_hat, scales, loss = gptq_quantize(
                        layer.matrix(gm),
                        stats.hessian,
                        current_mask(gm, layer),
                        self.bits,
                        self.group,
                        self.blocksize,
                        self.percdamp,
                        layer.name,
                    )
                    store(layer, w_hat, scales, {"loss": loss, "calibration_samples": len(calibration)})

                calibrate_layers(gm, chosen, calibration, on_layer, ("hessian",), progress=ctx.progress)
        except BaseException:
            with torch.no_grad():
                for name, value in saved.items():
                    gm.get_parameter(name).copy_(value)
            raise
        for node in gm.graph.nodes:
            layer = node.meta.get(meta.LAYER)
            if layer is not None and layer.weight in records:
                node.meta[meta.QUANT] = dict(records[layer.weight])
        return PassResult(gm, modified=True)
