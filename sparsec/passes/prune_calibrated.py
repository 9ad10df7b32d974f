"""Calibrated pruning, all or nothing: the glue between the calibration engine and the
data-driven pruning passes (``prune-wanda``, ``prune-sparsegpt``).

:func:`run_calibrated` is a pass's whole ``run``: choose the layers, validate everything (options,
finite weights, N:M divisibility, calibration present) before touching anything, then prune
layer by layer through :func:`prune_with_calibration`, which replaces each weight as soon as its
criterion has computed it (so later layers calibrate on the pruned model) and restores every
weight bit for bit if anything fails midway. Masks are inserted only after the last layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx

from sparsec.ir import meta
from sparsec.ir.layers import WeightedLayer, layer_nodes
from sparsec.passes.base import PassContext, PassOptionError, PassResult
from sparsec.passes.calibration import (
    CalibrationError,
    LayerStatistics,
    calibrate_layers,
    calibration_from_context,
)
from sparsec.passes.masks import (
    apply_masks,
    check_finite,
    check_nm,
    check_nm_layers,
    check_sparsity,
    layer_targets,
    masked_fraction,
    select_layers,
)
from sparsec.passes.owl import block_of, check_owl, owl_targets

#: ``criterion(layer, stats, w)`` -> ``(new_w, keep, info)``: ``w`` the float64 ``[out, in]``
#: matrix (a copy the criterion may modify), ``new_w`` the updated matrix (forced to zero where
#: ``keep`` is False), ``keep`` the bool mask, ``info`` a dict recorded for the layer (e.g. its
#: reconstruction loss).
Criterion = Callable[[WeightedLayer, LayerStatistics, torch.Tensor],
                     tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]


def prune_with_calibration(gm: fx.GraphModule, layers: list[WeightedLayer],
                           calibration: list[tuple[tuple, dict]], criterion: Criterion,
                           statistics: Iterable[str], progress: bool = False) -> dict[str, dict[str, Any]]:
    """Prune ``layers`` sequentially with ``criterion`` and attach the masks.

    Each layer's weight is replaced by ``new_w`` as soon as it is computed (so later layers are
    calibrated on the pruned model's activations); the masks are inserted after the last layer.
    All or nothing: if anything fails (bad data, a criterion error), every chosen weight is
    restored bit for bit and the graph is left as it was. Returns ``{layer name: info}`` with
    the criterion's ``info`` per layer.
    """
    saved = {layer.weight: gm.get_parameter(layer.weight).detach().clone() for layer in layers}
    keeps: dict[str, torch.Tensor] = {}
    extras: dict[str, dict[str, Any]] = {}

    def on_layer(layer: WeightedLayer, stats: LayerStatistics) -> None:
        weight = gm.get_parameter(layer.weight)
        w = layer.as_matrix(weight.detach()).to(torch.float64).clone()
        new_w, keep, info = criterion(layer, stats, w)
        extras[layer.name] = dict(info)
        if not torch.isfinite(new_w).all():
            raise CalibrationError(f"layer {layer.name!r}: pruning produced NaN/Inf weights")
        new_w = torch.where(keep, new_w, torch.zeros((), dtype=new_w.dtype))
        with torch.no_grad():
            weight.copy_(layer.to_param_layout(new_w.to(weight.dtype), weight.shape))
        keeps[layer.name] = keep

    try:
        calibrate_layers(gm, layers, calibration, on_layer, statistics, progress=progress)
        apply_masks(gm, [(layer, keeps[layer.name]) for layer in layers])
    except BaseException:
        with torch.no_grad():
            for name, value in saved.items():
                gm.get_parameter(name).copy_(value)
        raise
    return extras


def validate_sparsity_nm(p: Any) -> None:
    """Shared option checks of the calibrated pruning passes (``sparsity``, ``n``, ``m``, ``overrides``,
    ``owl_lambda``, ``owl_m``)."""
    try:
        check_sparsity(p.sparsity)
        if p.n or p.m:
            check_nm(p.n, p.m, p.name)
    except ValueError as e:
        raise PassOptionError(f"{p.name}: {e}" if not str(e).startswith(p.name) else str(e)) from None
    if p.m:
        implied = 1.0 - p.n / p.m
        if p.sparsity not in (0.5, implied) and abs(p.sparsity - implied) > 1e-9:
            raise PassOptionError(f"{p.name}: n={p.n}, m={p.m} fixes the sparsity at {implied:g}; "
                                  f"drop sparsity={p.sparsity} or drop n/m")
        if p.overrides:
            raise PassOptionError(f"{p.name}: overrides apply to unstructured sparsity only, not to n:m")
    check_owl(p)


def run_calibrated(p: Any, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Validate everything, then prune ``p``'s chosen layers through the calibration engine.

    ``p`` provides ``layers``, ``ignore``, ``overrides``, ``sparsity``, ``n``, ``m``, ``owl_lambda``,
    ``owl_m``, ``criterion``, ``statistics()`` and ``prune_layer(layer, stats, w, target)``. With
    ``owl_lambda`` the per-layer targets come from OWL (``owl.py``), measured on the dense model.
    """
    chosen = select_layers(gm, p.layers, p.ignore)
    check_finite(gm, chosen)
    targets = layer_targets(chosen, p.sparsity, p.overrides)
    if p.m:
        check_nm_layers(chosen, p.m)
        targets = {name: 1.0 - p.n / p.m for name in targets}
    calibration = calibration_from_context(ctx, p.name)
    if not chosen:
        return PassResult(gm, modified=False)
    ratios: dict[str, float] = {}
    if p.owl_lambda:
        targets, ratios = owl_targets(gm, chosen, p.sparsity, p.owl_lambda, p.owl_m, calibration, ctx.progress)

    def criterion(layer: WeightedLayer, stats: LayerStatistics, w: torch.Tensor):
        return p.prune_layer(layer, stats, w, targets[layer.name])

    info = prune_with_calibration(gm, chosen, calibration, criterion, p.statistics(), progress=ctx.progress)
    nodes = layer_nodes(gm)
    for layer in chosen:
        record = {"criterion": p.criterion, "target": targets[layer.name],
                  "sparsity": masked_fraction(gm, layer), "calibration_samples": len(calibration)}
        if p.m:
            record.update({"pattern": f"{p.n}:{p.m}", "n": p.n, "m": p.m})
        if ratios:
            record["owl_outlier_ratio"] = ratios.get(block_of(layer, list(ratios)) or "", None)
        record.update(info.get(layer.name, {}))
        nodes[layer.name].meta[meta.PRUNE] = record
    return PassResult(gm, modified=True)
