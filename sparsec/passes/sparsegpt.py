"""``prune-sparsegpt``: one-shot pruning with weight reconstruction (Frantar & Alistarh, 2023).

For each layer, in graph order and on the activations of the already-pruned layers before it
(``sparsec/passes/calibration.py``), SparseGPT solves the layer-wise problem
``min ||W X - W' X||`` with ``W'`` sparse, approximately and column by column (OBS): with the
inverse Hessian ``H^{-1}`` (``H = 2 X^T X / n``, damped, dead inputs removed) factored as
``U^T U``, it walks the input columns left to right; pruning weight ``w_q`` of a row costs
``w_q^2 / U_qq^2`` and its error is pushed onto the columns not yet visited
(``W[:, q:] -= (w_q / U_qq) * U[q, q:]``). Updates are applied lazily in blocks of ``blocksize``
columns (one matrix product per block for the columns to its right), and the mask is chosen
adaptively, per block, from the *updated* weights: the lowest ``w^2 / U_qq^2`` of the block for
unstructured sparsity, or the lowest ``m - n`` of each group of ``m`` columns for N:M.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from sparsec.ir.layers import WeightedLayer
from sparsec.passes.base import Pass, PassContext, PassOptionError, PassResult, register_pass
from sparsec.passes.calibration import LayerStatistics, inverse_hessian_cholesky
from sparsec.passes.masks import DEFAULT_IGNORE, prune_count
from sparsec.passes.prune_calibrated import run_calibrated, validate_sparsity_nm


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5,
                    n: int = 0, m: int = 0, blocksize: int = 128, percdamp: float = 0.01,
                    layer: str = "") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune ``weight`` (``[out, in]``) given the input Hessian ``hessian`` (``[in, in]``).

    Unstructured (``n == m == 0``): exactly ``round(sparsity * numel)`` weights are pruned,
    spread over the column blocks in proportion to their size. N:M (``n`` kept of every ``m``
    columns; ``blocksize`` must be a multiple of ``m``): each group keeps exactly ``n``.
    Returns ``(new_weight, keep, loss)`` in float64: ``new_weight`` is zero where ``keep`` is
    False and the kept weights are updated to compensate; ``loss`` is SparseGPT's estimate of
    the added error ``sum (w_q - q)^2 / U_qq^2 / 2``. Inputs that never fired (zero Hessian
    diagonal) get zero weights, as nothing observed them.
    """
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"layer {layer!r}: Hessian shape {tuple(hessian.shape)} does not match {cols} "
                         f"input columns")
    if m and blocksize % m:
        raise ValueError(f"blocksize={blocksize} must be a multiple of m={m}")
    upper, dead = inverse_hessian_cholesky(hessian, percdamp, layer)
    w = weight.detach().to(torch.float64).clone()
    w[:, dead] = 0.0
    keep = torch.ones(rows, cols, dtype=torch.bool)
    losses = torch.zeros(rows, dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        prune1 = torch.zeros_like(w1, dtype=torch.bool)
        if not n:
            # Adaptive mask: this block's share of the layer's exact prune count, lowest OBS cost first.
            k = prune_count(sparsity, rows * i2) - prune_count(sparsity, rows * i1)
            if k > 0:
                cost = (w1 * w1) / (d * d)[None, :]
                # topk selects exactly k without sorting the whole block (ties: any k of them)
                prune1.view(-1)[torch.topk(cost.reshape(-1), k, largest=False, sorted=False).indices] = True
        for i in range(i2 - i1):
            if n and i % m == 0:
                # The N:M choice is made on the weights as updated by the columns to the left.
                cost = w1[:, i:i + m] ** 2 / (d[i:i + m] ** 2)[None, :]
                order = torch.argsort(cost, dim=1, stable=True)[:, : m - n]
                prune1.scatter_(1, i + order, True)
            col = w1[:, i]
            q = torch.where(prune1[:, i], zero, col)
            q1[:, i] = q
            err = (col - q) / d[i]
            losses += err * err
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, i1:i2] = q1
        keep[:, i1:i2] = ~prune1
        # lazy batch update: the whole block's error reaches the columns to its right at once
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    return w, keep, float(losses.sum()) / 2


@register_pass
@dataclass
class PruneSparseGPT(Pass):
    """One-shot SparseGPT pruning with weight reconstruction, calibrated layer by layer on the pruned model.

    Options: ``sparsity`` in [0, 1) (unstructured, exact count per layer) or ``n``/``m`` for N:M
    (``n`` kept of every ``m`` input columns; then sparsity is ``1 - n/m``); ``blocksize`` columns
    per lazy update and mask-selection block (a multiple of ``m``); ``percdamp`` the Hessian
    damping as a fraction of its mean diagonal; ``layers`` / ``ignore`` / ``overrides`` as in
    ``prune-magnitude``; ``owl_lambda`` (e.g. 0.08) / ``owl_m`` (5) spread the sparsity over blocks
    by their outlier ratio (OWL), keeping the overall sparsity exact. Needs ``ctx.calibration``.
    All or nothing: on any error (NaN/Inf weights or activations, a bad option) the weights are
    left bit-identical.
    """

    name: ClassVar[str] = "prune-sparsegpt"
    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    blocksize: int = 128
    percdamp: float = 0.01
    layers: str = ""
    ignore: str = DEFAULT_IGNORE
    overrides: str = ""
    #: OWL: per-block sparsity within +-owl_lambda of the target by outlier ratio (0: uniform)
    owl_lambda: float = 0.0
    owl_m: float = 5.0

    criterion: ClassVar[str] = "sparsegpt"

    def validate(self) -> None:
        validate_sparsity_nm(self)
        if self.blocksize < 1:
            raise PassOptionError(f"{self.name}: blocksize must be positive, got {self.blocksize}")
        if self.m and self.blocksize % self.m:
            raise PassOptionError(f"{self.name}: blocksize={self.blocksize} must be a multiple of m={self.m}")
        if not (0.0 <= self.percdamp < 1e3):
            raise PassOptionError(f"{self.name}: percdamp must be >= 0 (typically 0.01), got {self.percdamp}")

    def statistics(self) -> tuple[str, ...]:
        return ("hessian",)

    def prune_layer(self, layer: WeightedLayer, stats: LayerStatistics, w: torch.Tensor,
                    target: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        new_w, keep, loss = sparsegpt_prune(w, stats.hessian, target, self.n, self.m, self.blocksize,
                                            self.percdamp, layer.name)
        return new_w, keep, {"loss": loss}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return run_calibrated(self, gm, ctx)
