"""Outlier-weighted layer-wise sparsity (OWL, Yin et al., 2024): fewer pruned weights where outliers live.

Uniform sparsity treats every block alike, but a few blocks of a language model hold most of
its outlier features, and pruning them costs more accuracy. OWL scores each weight as Wanda
does, ``|W_ij| * ||X_j||``, and measures each block's *outlier ratio*: the fraction of its
weights (all its layers together) whose score exceeds ``M`` times the block's mean score. The
ratios are mapped linearly onto ``[-lambda, +lambda]`` and subtracted from the target, so the
block with the most outliers is pruned up to ``lambda`` less and the one with the fewest up to
``lambda`` more. The ratios are measured on the dense model (one calibration pass, before any pruning);
without calibration data, as ``prune-magnitude`` may run, the score is ``|W_ij|`` alone.

Every block stays within ``lambda`` of the target and the overall sparsity is exactly the
requested one: the blocks' sparsities are shifted together (weighted by each block's weight
count, blocks of unequal size included) and clipped to ``target +- lambda``, and per-layer prune
counts are rounded so that their sum is ``round(sparsity * total)``. Layers outside every block
keep the uniform target.

Example::

    targets, ratios = owl_targets(gm, layers, 0.7, lam=0.08, m=5.0, calibration=samples)
    targets["model.layers.3.mlp.up_proj"]   # e.g. 0.6618
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from sparsec.ir.layers import WeightedLayer
from sparsec.passes.base import PassOptionError
from sparsec.passes.calibration import LayerStatistics, calibrate_layers
from sparsec.passes.masks import prune_count
from sparsec.passes.taps import auto_blocks


def check_owl(p: Any) -> None:
    """Option checks shared by the pruning passes that take ``owl_lambda`` / ``owl_m``."""
    if not p.owl_lambda:
        return
    if not (0 < p.owl_lambda < 0.5) or not math.isfinite(p.owl_lambda):
        raise PassOptionError(f"{p.name}: owl_lambda must be in (0, 0.5) (OWL uses about 0.08), got {p.owl_lambda}")
    if not (p.owl_m > 1) or not math.isfinite(p.owl_m):
        raise PassOptionError(f"{p.name}: owl_m must be a number > 1 (OWL uses 5), got {p.owl_m}")
    if getattr(p, "m", 0):
        raise PassOptionError(f"{p.name}: owl_lambda sets unstructured per-block sparsity; drop it for n:m")
    if p.overrides:
        raise PassOptionError(f"{p.name}: owl_lambda chooses every layer's sparsity; drop overrides or owl_lambda")
    if p.sparsity + p.owl_lambda >= 1 or p.sparsity - p.owl_lambda < 0:
        raise PassOptionError(f"{p.name}: sparsity {p.sparsity} +- owl_lambda {p.owl_lambda} leaves [0, 1); "
                              f"lower owl_lambda")


def block_of(layer: WeightedLayer, blocks: list[str]) -> str | None:
    """The block (module name) ``layer`` lives in, or None."""
    return next((b for b in blocks if layer.name == b or layer.name.startswith(b + ".")), None)


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of ``scores`` (all tensors together) above ``m`` times their mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum()) for s in scores) / total
    return sum(int((s > m * mean).sum()) for s in scores) / total


def owl_targets(gm: fx.GraphModule, layers: list[WeightedLayer], sparsity: float, lam: float, m: float,
                calibration: list[tuple[tuple, dict]] | None = None,
                progress: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """Per-layer sparsity targets by OWL, and each block's outlier ratio (see the module docstring).

    ``calibration`` (``(args, kwargs)`` samples) gives the activation norms; None scores by
    ``|W|``. The model is not changed. Every returned target is ``k / numel`` for an integer
    prune count ``k``, and the counts add up to ``round(sparsity * total)``.
    """
    norms: dict[str, torch.Tensor] = {}
    if calibration:
        def record(layer: WeightedLayer, stats: LayerStatistics) -> None:
            norms[layer.name] = stats.column_norms().to(torch.float32)

        calibrate_layers(gm, layers, calibration, record, ("norms",), progress=progress)
    blocks = auto_blocks(gm)
    members: dict[str, list[WeightedLayer]] = {}
    for layer in layers:
        block = block_of(layer, blocks)
        if block is not None:
            members.setdefault(block, []).append(layer)
    ratios: dict[str, float] = {}
    for block, group in members.items():
        scores = []
        for layer in group:
            s = layer.matrix(gm).detach().abs().float()
            if layer.name in norms:
                s = s * norms[layer.name][None, :]
            scores.append(s)
        ratios[block] = outlier_ratio(scores, m)
    targets = {layer.name: sparsity for layer in layers}
    if len(ratios) >= 2:
        lo, hi = min(ratios.values()), max(ratios.values())
        # the block with the most outliers +lambda, the fewest -lambda, linearly between
        delta = {b: lam * (2 * (r - lo) / (hi - lo) - 1) if hi > lo else 0.0 for b, r in ratios.items()}
        sizes = {b: sum(layer.shape[0] * layer.shape[1] for layer in g) for b, g in members.items()}
        block_sparsity = _centered(delta, sizes, sparsity, lam)
        for block, group in members.items():
            for layer in group:
                targets[layer.name] = block_sparsity[block]
    return _exact_counts(layers, targets, sparsity), ratios


def _centered(delta: dict[str, float], sizes: dict[str, int], sparsity: float, lam: float) -> dict[str, float]:
    """``sparsity - delta + shift`` per block, clipped to ``sparsity +- lam``, with the one shift
    (found by bisection; the clipped mean grows with it) that makes the size-weighted mean equal
    ``sparsity``. Skewed ratios (one outlier block among many) would otherwise push the others
    past lambda when the mean is restored."""
    total = sum(sizes.values())

    def at(shift: float) -> dict[str, float]:
        return {b: min(max(sparsity - d + shift, sparsity - lam), sparsity + lam) for b, d in delta.items()}

    lo, hi = -2 * lam, 2 * lam
    for _ in range(100):
        mid = (lo + hi) / 2
        mean = sum(v * sizes[b] for b, v in at(mid).items()) / total
        lo, hi = (mid, hi) if mean < sparsity else (lo, mid)
    return at((lo + hi) / 2)


def _exact_counts(layers: list[WeightedLayer], targets: dict[str, float], sparsity: float) -> dict[str, float]:
    """Round each layer's prune count, then move single weights between layers (those rounded
    furthest) until the counts add up to the uniform target's total exactly."""
    numel = {layer.name: layer.shape[0] * layer.shape[1] for layer in layers}
    want = {n: min(max(targets[n], 0.0), 1.0) * numel[n] for n in numel}
    counts = {n: int(round(w)) for n, w in want.items()}
    residual = prune_count(sparsity, sum(numel.values())) - sum(counts.values())
    order = sorted(numel, key=lambda n: (counts[n] - want[n]) * (1 if residual > 0 else -1))
    step = 1 if residual > 0 else -1
    i, limit = 0, len(order) * (abs(residual) + 1)
    while residual and i < limit:
        n = order[i % len(order)]
        if 0 <= counts[n] + step < numel[n]:
            counts[n] += step
            residual -= step
        i += 1
    return {n: counts[n] / numel[n] for n in numel}
