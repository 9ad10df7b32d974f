"""``prune-wanda``: prune by |weight| x input activation norm, compared within each output row.

Wanda (Sun et al., 2023) scores weight ``W_ij`` by ``|W_ij| * ||X_j||_2``, the norm of input
feature ``j`` over every calibration token, and prunes the lowest scores *of each output row*
(or of each group of ``m`` columns for N:M). No weight is updated; the statistics come from the
sequential calibration engine, so each layer is scored on the activations of the already-pruned
layers before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from sparsec.ir.layers import WeightedLayer
from sparsec.passes.base import Pass, PassContext, PassResult, register_pass
from sparsec.passes.calibration import LayerStatistics
from sparsec.passes.masks import DEFAULT_IGNORE, nm_keep_mask, rowwise_keep_mask
from sparsec.passes.prune_calibrated import run_calibrated, validate_sparsity_nm


def wanda_keep_mask(weight: torch.Tensor, column_norms: torch.Tensor, sparsity: float = 0.5,
                    n: int = 0, m: int = 0) -> torch.Tensor:
    """Keep mask of ``weight [out, in]`` by Wanda's score ``|W_ij| * column_norms[j]``: per row
    (exactly ``round(sparsity * numel)`` pruned in all, at most one apart between rows), or N:M."""
    scores = weight.detach().abs().to(torch.float64) * column_norms.to(torch.float64)[None, :]
    return nm_keep_mask(scores, n, m) if m else rowwise_keep_mask(scores, sparsity)


@register_pass
@dataclass
class PruneWanda(Pass):
    """Prune the lowest |w| * ||x_j|| of each output row (Wanda), calibrated on the already-pruned model.

    Options: ``sparsity`` in [0, 1) or ``n``/``m`` for N:M (``n`` kept of every ``m`` input
    columns); ``layers`` / ``ignore`` / ``overrides`` as in ``prune-magnitude``;
    ``owl_lambda`` (e.g. 0.08) / ``owl_m`` (5) spread the sparsity over blocks by their outlier
    ratio (OWL), keeping the overall sparsity exact. Needs ``ctx.calibration``. All or nothing: on
    any error the weights are left bit-identical.
    """

    name: ClassVar[str] = "prune-wanda"
    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    layers: str = ""
    ignore: str = DEFAULT_IGNORE
    overrides: str = ""
    #: OWL: per-block sparsity within +-owl_lambda of the target by outlier ratio (0: uniform)
    owl_lambda: float = 0.0
    owl_m: float = 5.0

    criterion: ClassVar[str] = "wanda"

    def validate(self) -> None:
        validate_sparsity_nm(self)

    def statistics(self) -> tuple[str, ...]:
        return ("norms",)

    def prune_layer(self, layer: WeightedLayer, stats: LayerStatistics, w: torch.Tensor,
                    target: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        keep = wanda_keep_mask(w, stats.column_norms(), target, self.n, self.m)
        return w * keep, keep, {}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return run_calibrated(self, gm, ctx)
