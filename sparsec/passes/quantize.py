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
  ``actorder=true`` visits the columns in order of decreasing Hessian diagonal (the inputs with the
  most energy first, while the most columns are left to absorb their error), with every scale
  fixed from the weight before any update (the reference's "static groups"), so int4 groups stay
  contiguous column ranges as the formats store them.

Scales: ``scales=max`` (default) is the grid above; ``scales=mse`` searches, per row (int8) or per
group (int4), a scale between 0.5 and 1 times the largest one that minimizes the squared rounding
error of the kept values (weighted by the Hessian diagonal under GPTQ), clipping the few largest
values in exchange for a finer grid; for int4 its largest scale also uses level -8 when the
group's extreme is negative. Levels and the dequantized value ``q * scale`` keep their meaning, so
the formats store either choice unchanged.

Example pipeline: ``prune-sparsegpt{sparsity=0.5},quantize{bits=4,group=128,method=gptq},lower-cpu``.
All or nothing: on any error every chosen weight is restored bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
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
SCALES = ("max", "mse")


def value_type_for(bits: int) -> str:
    return {8: "int8", 4: "int4"}[bits]


def search_scales(
    w: torch.Tensor,
    bits: int,
    group: int,
    importance: torch.Tensor | None = None,
    steps: int = 20,
    min_ratio: float = 0.5,
) -> torch.Tensor:
    """Scales minimizing the squared rounding error of ``w`` (float32: ``[rows]`` for int8,
    ``[rows, ceil(cols/group)]`` for int4).

    Tries ``steps`` scales evenly from the largest useful one (int8 ``max|w|/127``; int4
    ``max(max w / 7, -min w / 8)``) down to ``min_ratio`` times it and keeps, per row or group, the
    one with the least ``sum importance_j (q_j - w_j)^2``; ``importance`` (``[cols]``, e.g. the
    Hessian diagonal) defaults to ones. Zeros in ``w`` (pruned weights) quantize to zero at any
    scale, so they never pull the choice. An all-zero row or group gets scale 0.
    """
    w = w.detach().to(torch.float64)
    rows, cols = w.shape
    if bits == 8:
        g, groups, qmin, qmax = max(cols, 1), 1, -127, 127
    else:
        g, groups, qmin, qmax = group, -(-cols // group), -8, 7
    padded = torch.nn.functional.pad(w, (0, groups * g - cols)).view(rows, groups, g)
    imp = torch.ones(cols, dtype=torch.float64) if importance is None else importance.detach().to(torch.float64)
    imp = torch.nn.functional.pad(imp, (0, groups * g - cols)).view(1, groups, g)
    if bits == 8:
        top = padded.abs().amax(-1) / qmax
    else:
        top = torch.maximum(padded.amax(-1).clamp_min(0) / qmax, (-padded.amin(-1)).clamp_min(0) / -qmin)
    best_scale, best_err = top.clone(), None
    for k in range(steps):
        scale = (top * (1 - (1 - min_ratio) * k / max(steps - 1, 1))).to(torch.float32).to(torch.float64)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
        q = torch.clamp(torch.round(padded / safe), qmin, qmax) * scale.unsqueeze(-1)
        err = ((q - padded) ** 2 * imp).sum(-1)
        if best_err is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_err = torch.where(better, err, best_err)
    out = best_scale.to(torch.float32)
    return out[:, 0].contiguous() if bits == 8 else out.contiguous()


def rtn_quantize(
    w: torch.Tensor, keep: torch.Tensor | None, bits: int, group: int, scales: str = "max"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(w_hat float32 [out, in], scales)``; zero wherever ``keep`` is False.

    ``scales="mse"`` picks each scale by :func:`search_scales` instead of the largest value."""
    w = w.detach().to(torch.float32)
    if keep is not None:
        w = w * keep
    vt = value_type_for(bits)
    chosen = search_scales(w, bits, group) if scales == "mse" else None
    levels, out_scales = quantize(w, vt, group, scales=chosen)
    return dequantize(levels, vt, out_scales, group), out_scales


def gptq_sweep(
    W: torch.Tensor,
    keep: torch.Tensor,
    U: torch.Tensor,
    blocksize: int,
    round_column: Callable[[int, torch.Tensor, int], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column sweep with lazy block updates: ``(Q, loss)``, both float64.

    Visits the columns of ``W`` (float64 ``[out, in]``, updated in place) in order, ``blocksize``
    at a time. ``round_column(c, W1, i)`` returns column ``c`` put on the grid, from its current
    values ``W1[:, i]``; ``W1`` is the block being visited, every earlier column's rounding error
    already spread in. Entries where ``keep`` is False are pinned at zero. Each column's error,
    divided by the diagonal of ``U`` (the upper Cholesky factor of the inverse Hessian), is
    spread over the later columns; ``loss`` is the proxy ``sum err^2 / 2`` per row. The grid is
    the caller's: :func:`gptq_quantize` rounds onto sparsec's int8/int4 grids with it.
    """
    rows, cols = W.shape
    Q = torch.zeros_like(W)
    loss = torch.zeros(rows, dtype=torch.float64)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        H1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            wcol = W1[:, i]
            q = torch.where(keep[:, c], round_column(c, W1, i), torch.zeros_like(wcol))
            Q[:, c] = q
            err = (wcol - q) / H1[i, i]
            loss += err**2 / 2
            W1[:, i:] -= err.unsqueeze(1) * H1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q, loss


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    keep: torch.Tensor | None,
    bits: int,
    group: int,
    blocksize: int = 128,
    percdamp: float = 0.01,
    layer: str = "",
    actorder: bool = False,
    scales: str = "max",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """GPTQ on one ``[out, in]`` weight: ``(w_hat float32, scales float32, loss)``.

    ``loss`` is GPTQ's proxy ``sum err^2 / 2`` of the scaled column errors. ``keep`` (bool, True =
    kept) pins pruned weights at zero. ``actorder`` visits columns by decreasing Hessian diagonal
    with every scale fixed up front; ``scales="mse"`` chooses scales by :func:`search_scales`
    (weighted by the Hessian diagonal). Works in float64; ``w`` and ``hessian`` are not modified.
    """
    rows, cols = w.shape
    W = w.detach().to(torch.float64).clone()
    K = torch.ones_like(W, dtype=torch.bool) if keep is None else keep.to(torch.bool)
    W = W * K
    qmax = 127 if bits == 8 else 7
    qmin = -127 if bits == 8 else -8
    groups = -(-cols // group)
    diag = torch.diagonal(hessian).detach().to(torch.float64)
    static = bits == 8 or actorder
    if scales == "mse" and static:
        fixed = search_scales(W, bits, group, diag).to(torch.float64)
        scale_of = fixed.unsqueeze(1) if bits == 8 else fixed
    elif bits == 8:
        fixed = W.abs().amax(dim=1, keepdim=True) / qmax if cols else torch.zeros(rows, 1, dtype=torch.float64)
        # The float32 scale is what gets stored: round with it, not with the float64 one.
        scale_of = fixed.to(torch.float32).to(torch.float64)
    elif actorder:
        _, fixed = quantize(W.to(torch.float32), "int4", group)
        scale_of = fixed.to(torch.float64)
    else:
        scale_of = torch.zeros(rows, groups, dtype=torch.float64)
        # Whole groups per batch, so a group's current values all sit in the batch being updated.
        blocksize = max(1, round(blocksize / group)) * group
    # Column c of the permuted problem is original column order[c]; its scale column is col_group.
    order = torch.argsort(diag, descending=True, stable=True) if actorder else torch.arange(cols)
    col_group = torch.zeros(cols, dtype=torch.long) if bits == 8 else order // group
    if actorder:
        W, K = W[:, order], K[:, order]
        hessian = hessian.detach()[order][:, order]
    U, _dead = inverse_hessian_cholesky(hessian, percdamp, layer)

    def round_column(c: int, W1: torch.Tensor, i: int) -> torch.Tensor:
        if not static and c % group == 0:
            # The group's current values, every earlier column's error already spread in.
            g_end = min(c + group, cols)
            vals = W1[:, i : i + g_end - c] * K[:, c:g_end]
            if scales == "mse":
                s = search_scales(vals, 4, group, diag[c:g_end])[:, 0].to(torch.float64)
            else:
                s = (vals.abs().amax(dim=1) / qmax).to(torch.float32).to(torch.float64)
            scale_of[:, c // group] = s
        s = scale_of[:, col_group[c]]
        safe = torch.where(s > 0, s, torch.ones_like(s))
        return torch.clamp(torch.round(W1[:, i] / safe), qmin, qmax) * s

    Q, loss = gptq_sweep(W, K, U, blocksize, round_column)
    if actorder:
        Q = Q[:, torch.argsort(order)]
    if not torch.isfinite(Q).all():
        raise CalibrationError(f"layer {layer!r}: GPTQ produced NaN/Inf weights; increase percdamp")
    out_scales = scale_of[:, 0] if bits == 8 else scale_of
    return Q.to(torch.float32), out_scales.to(torch.float32).contiguous(), float(loss.sum())


@register_pass
@dataclass
class Quantize(Pass):
    """Quantize linear weights to int8 (per output channel) or int4 (per group); pruned weights stay exactly zero.

    Options: ``bits`` 8|4; ``group`` input columns per int4 scale; ``method`` rtn|gptq;
    ``blocksize`` and ``percdamp`` (GPTQ's lazy-update width and Hessian damping); ``actorder``
    (GPTQ: columns by decreasing Hessian diagonal, scales fixed up front); ``scales`` max|mse (the
    largest value's scale, or a searched one that clips); ``layers`` / ``ignore`` glob patterns as
    in the pruning passes (default: skip lm_head and embeddings).
    """

    name: ClassVar[str] = "quantize"
    bits: int = 8
    group: int = 128
    method: str = "rtn"
    blocksize: int = 128
    percdamp: float = 0.01
    actorder: bool = False
    scales: str = "max"
    layers: str = ""
    ignore: str = DEFAULT_IGNORE

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise PassOptionError(f"{self.name}: bits must be 8 or 4, got {self.bits}")
        if self.group < 1:
            raise PassOptionError(f"{self.name}: group must be a positive number of columns, got {self.group}")
        if self.method not in METHODS:
            raise PassOptionError(f"{self.name}: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.scales not in SCALES:
            raise PassOptionError(f"{self.name}: scales must be one of {', '.join(SCALES)}, got {self.scales!r}")
        if self.actorder and self.method != "gptq":
            raise PassOptionError(f"{self.name}: actorder applies to method=gptq only")
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
                    w_hat, scales = rtn_quantize(
                        layer.matrix(gm), current_mask(gm, layer), self.bits, self.group, self.scales
                    )
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
                        self.actorder,
                        self.scales,
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
