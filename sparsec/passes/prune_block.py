"""``prune-block``: remove whole blocks of weights (``1x16``, ``4x4``...) with the lowest norm."""

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
    block_keep_mask,
    check_finite,
    check_sparsity,
    layer_targets,
    masked_fraction,
    parse_block,
    select_layers,
)


@register_pass
@dataclass
class PruneBlock(Pass):
    """Zero the lowest-norm blocks (``block="ROWSxCOLS"`` of the [out, in] matrix) of each chosen layer.

    Options: ``sparsity`` in [0, 1) is the fraction of *blocks* pruned, exactly
    ``round(sparsity * blocks)`` per layer; ``block`` the tile shape (default ``1x16``: 16
    consecutive input columns of one output row, the shape the ``block`` format stores best);
    ``norm`` ``l2`` or ``l1`` scores each block; ``layers`` / ``ignore`` / ``overrides`` as in
    ``prune-magnitude``. Edge blocks of a matrix that is not a multiple of the block are scored by
    their norm per element, so they neither win nor lose for being short.
    """

    name: ClassVar[str] = "prune-block"
    sparsity: float = 0.5
    block: str = "1x16"
    norm: str = "l2"
    layers: str = ""
    ignore: str = DEFAULT_IGNORE
    overrides: str = ""

    def validate(self) -> None:
        try:
            check_sparsity(self.sparsity)
            parse_block(self.block)
        except ValueError as e:
            raise PassOptionError(f"{self.name}: {e}") from None
        if self.norm not in ("l1", "l2"):
            raise PassOptionError(f"{self.name}: norm must be 'l1' or 'l2', got {self.norm!r}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        chosen = select_layers(gm, self.layers, self.ignore)
        check_finite(gm, chosen)
        targets = layer_targets(chosen, self.sparsity, self.overrides)
        block = parse_block(self.block)
        keeps = {layer.name: block_keep_mask(layer.matrix(gm), targets[layer.name], block, self.norm)
                 for layer in chosen}
        apply_masks(gm, [(layer, keeps[layer.name]) for layer in chosen])
        nodes = layer_nodes(gm)
        for layer in chosen:
            nodes[layer.name].meta[meta.PRUNE] = {
                "criterion": f"block-{self.norm}", "block": f"{block[0]}x{block[1]}",
                "target": targets[layer.name], "sparsity": masked_fraction(gm, layer),
            }
        return PassResult(gm, modified=bool(chosen))
