"""``prune-nm``: N:M magnitude pruning along the input dimension (2:4, 1:4, 4:8, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from sparsec.ir import meta
from sparsec.ir.layers import layer_nodes
from sparsec.passes.base import Pass, PassContext, PassOptionError, PassResult, register_pass
from sparsec.passes.masks import (
    DEFAULT_IGNORE,
    apply_masks,
    check_finite,
    check_nm,
    check_nm_layers,
    masked_fraction,
    nm_keep_mask,
    select_layers,
)


@register_pass
@dataclass
class PruneNM(Pass):
    """Keep the n largest |w| of every m consecutive input columns of each output row (N:M sparsity).

    Options: ``n`` kept weights per group, ``m`` group size (``1 <= n <= m``; 2:4 is 50% sparse,
    1:4 is 75%); ``layers`` / ``ignore`` glob patterns as in ``prune-magnitude``. Every chosen
    layer's input dimension must be a multiple of ``m``; a layer that is not is named in the error
    and nothing is changed. Ties are broken by column index, so each group keeps exactly ``n``.
    """

    name: ClassVar[str] = "prune-nm"
    n: int = 2
    m: int = 4
    layers: str = ""
    ignore: str = DEFAULT_IGNORE

    def validate(self) -> None:
        try:
            check_nm(self.n, self.m, self.name)
        except ValueError as e:
            raise PassOptionError(str(e)) from None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        chosen = select_layers(gm, self.layers, self.ignore)
        check_finite(gm, chosen)
        check_nm_layers(chosen, self.m)
        keeps = {layer.name: nm_keep_mask(layer.matrix(gm).detach().abs(), self.n, self.m)
                 for layer in chosen}
        apply_masks(gm, [(layer, keeps[layer.name]) for layer in chosen])
        nodes = layer_nodes(gm)
        for layer in chosen:
            nodes[layer.name].meta[meta.PRUNE] = {
                "criterion": "magnitude", "pattern": f"{self.n}:{self.m}", "n": self.n, "m": self.m,
                "target": 1.0 - self.n / self.m, "sparsity": masked_fraction(gm, layer),
            }
        return PassResult(gm, modified=bool(chosen))
