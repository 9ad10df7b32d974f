"""``prune-magnitude``: zero the smallest-magnitude weights, per layer or over all layers at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from sparsec.ir import meta
from sparsec.ir.layers import layer_nodes
from sparsec.passes.base import Pass, PassContext, PassOptionError, PassResult, register_pass
from sparsec.passes.masks import (
    DEFAULT_IGNORE,
    apply_masks,
    check_finite,
    check_sparsity,
    layer_targets,
    masked_fraction,
    select_layers,
    topk_keep_mask,
)
from sparsec.passes.owl import block_of, check_owl, owl_targets


@register_pass
@dataclass
class PruneMagnitude(Pass):
    """Zero the smallest |w| of each chosen layer (scope=layer) or of all of them together (scope=global).

    Options: ``sparsity`` in [0, 1); ``scope`` layer|global; ``layers`` comma-separated glob
    patterns (empty = every weighted layer); ``ignore`` patterns skipped (default: lm_head and
    embeddings); ``overrides`` per-layer targets ``"q_proj=0.6;down_proj=0.4"`` (scope=layer only);
    ``owl_lambda`` / ``owl_m`` per-block targets by outlier ratio (OWL, scope=layer; scores by
    ``|w| * ||x||`` when the context has calibration data, else by ``|w|``).
    Ties are broken by index so the achieved sparsity is exactly ``round(sparsity * numel)``.
    """

    name: ClassVar[str] = "prune-magnitude"
    sparsity: float = 0.5
    scope: str = "layer"
    layers: str = ""
    ignore: str = DEFAULT_IGNORE
    overrides: str = ""
    #: OWL: per-block sparsity within +-owl_lambda of the target by outlier ratio (0: uniform)
    owl_lambda: float = 0.0
    owl_m: float = 5.0

    def validate(self) -> None:
        try:
            check_sparsity(self.sparsity)
        except ValueError as e:
            raise PassOptionError(f"{self.name}: {e}") from None
        if self.scope not in ("layer", "global"):
            raise PassOptionError(f"{self.name}: scope must be 'layer' or 'global', got {self.scope!r}")
        if self.scope == "global" and (self.overrides or self.owl_lambda):
            raise PassOptionError(f"{self.name}: overrides and owl_lambda apply to scope=layer only")
        check_owl(self)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        chosen = select_layers(gm, self.layers, self.ignore)
        check_finite(gm, chosen)
        targets = layer_targets(chosen, self.sparsity, self.overrides)
        ratios: dict[str, float] = {}
        if self.owl_lambda and chosen:
            targets, ratios = owl_targets(gm, chosen, self.sparsity, self.owl_lambda, self.owl_m,
                                          getattr(ctx, "calibration", None) or None, ctx.progress)
        if self.scope == "global":
            keeps = self._global_masks(gm, chosen)
        else:
            keeps = {layer.name: topk_keep_mask(layer.matrix(gm).detach().abs(), targets[layer.name])
                     for layer in chosen}
        apply_masks(gm, [(layer, keeps[layer.name]) for layer in chosen])
        nodes = layer_nodes(gm)
        for layer in chosen:
            nodes[layer.name].meta[meta.PRUNE] = {
                "criterion": "magnitude", "scope": self.scope,
                "target": targets[layer.name] if self.scope == "layer" else self.sparsity,
                "sparsity": masked_fraction(gm, layer),
            }
            if ratios:
                nodes[layer.name].meta[meta.PRUNE]["owl_outlier_ratio"] = ratios.get(
                    block_of(layer, list(ratios)) or "")
        return PassResult(gm, modified=bool(chosen))

    def _global_masks(self, gm, chosen) -> dict[str, torch.Tensor]:
        scores = torch.cat([layer.matrix(gm).detach().abs().reshape(-1).float() for layer in chosen])
        flat = topk_keep_mask(scores, self.sparsity)
        keeps, start = {}, 0
        for layer in chosen:
            n = layer.shape[0] * layer.shape[1]
            keeps[layer.name] = flat[start:start + n].reshape(layer.shape)
            start += n
        return keeps
