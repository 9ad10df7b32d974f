"""``mask-zeros``: a model pruned before capture keeps its sparsity as masks.

A model can arrive pruned: fine-tuned with fixed masks in eager PyTorch (the graph's masks do not
travel with ``state_dict`` into a fresh model), written by ``sparsec finetune``, or pruned by
another tool. Its sparsity is then only exact zeros in the weights, and lowering stores a layer
without a mask densely. This pass gives each chosen layer whose fraction of exact zeros is at
least ``min_sparsity`` the mask that keeps its nonzero weights, so ``select-format``,
``quantize`` (pruned weights stay zero) and ``lower-cpu`` treat it as the pruning passes' output:

    sparsec.compile(finetuned, example, pipeline="mask-zeros,quantize{bits=8},lower-cpu")

A dense weight may hold a few exact zeros by chance (the bundled SmolLM2's weights, dequantized
from 4 bits, hold 0.03%): ``min_sparsity`` (default 5%) keeps such layers dense. The mask
changes no weight, so the model computes exactly what it did before the pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from sparsec.ir import meta
from sparsec.ir.layers import layer_nodes
from sparsec.passes.base import Pass, PassContext, PassOptionError, PassResult, register_pass
from sparsec.passes.masks import DEFAULT_IGNORE, apply_masks, check_finite, masked_fraction, select_layers


@register_pass
@dataclass
class MaskZeros(Pass):
    """Mask the exact zeros of each chosen layer with at least min_sparsity of them (a model pruned before capture).

    Options: ``min_sparsity`` in [0, 1], layers with fewer zeros stay unmasked; ``layers``
    comma-separated glob patterns (empty = every weighted layer); ``ignore`` patterns skipped
    (default: lm_head and embeddings). A layer that already has a mask keeps it, narrowed to its
    nonzero weights.
    """

    name: ClassVar[str] = "mask-zeros"
    preserves_numerics: ClassVar[bool] = True
    min_sparsity: float = 0.05
    layers: str = ""
    ignore: str = DEFAULT_IGNORE

    def validate(self) -> None:
        if not 0.0 <= self.min_sparsity <= 1.0:
            raise PassOptionError(f"{self.name}: min_sparsity must be in [0, 1], got {self.min_sparsity}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        chosen = select_layers(gm, self.layers, self.ignore)
        check_finite(gm, chosen)
        masks = []
        for layer in chosen:
            keep = layer.matrix(gm).detach() != 0
            zeros = 1.0 - float(keep.sum().item()) / max(1, keep.numel())
            if zeros > 0 and zeros >= self.min_sparsity:
                masks.append((layer, keep))
        if not masks:
            return PassResult(gm, modified=False)
        apply_masks(gm, masks)
        nodes = layer_nodes(gm)
        for layer, _ in masks:
            sparsity = masked_fraction(gm, layer)
            nodes[layer.name].meta[meta.PRUNE] = {"criterion": "zeros", "target": sparsity, "sparsity": sparsity}
        return PassResult(gm, modified=True)
