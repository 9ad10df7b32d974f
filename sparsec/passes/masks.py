"""Mask machinery shared by every pruning pass: choosing layers, and attaching masks to them.

A mask lives in three places that agree (``sparsec/ir/meta.py``, invariant 2):

* a float buffer of the weight's shape on the GraphModule (1 = kept, 0 = pruned), named after
  the weight (``model.layers.0.mlp.up_proj.weight`` -> ``model_layers_0_mlp_up_proj_weight_mask``);
* a ``mul`` node in the graph, ``weight * mask``, feeding the weighted op, so gradients of
  pruned weights are exactly zero and no optimizer step (AdamW with weight decay included) can
  revive them;
* the weight itself, zeroed where the mask is zero.

Pruning criteria compute masks on the ``[out, in]`` matrix view and call :func:`apply_mask`.
"""

from __future__ import annotations

import fnmatch
import operator

import numpy as np
import torch
import torch.fx as fx

from sparsec.ir import meta
from sparsec.ir.layers import MASK_INPUT, WeightedLayer, find_layers, weight_source

#: layers no pruning pass touches unless asked: embeddings (not a weighted op here anyway) and
#: the output projection, whose pruning costs far more accuracy than it saves bytes.
DEFAULT_IGNORE = "lm_head,*embed*"


class LayerSelectionError(ValueError):
    """Layer patterns that match nothing, or options that contradict the chosen layers."""


def split_patterns(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def _matches(name: str, pattern: str) -> bool:
    # A bare name matches the layer itself or, as a suffix, any layer ending in it
    # (`q_proj` selects every `...self_attn.q_proj`).
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


def select_layers(gm: fx.GraphModule, layers: str | None = None, ignore: str | None = DEFAULT_IGNORE,
                  kinds: str = "linear,addmm_t,conv") -> list[WeightedLayer]:
    """The weighted layers chosen by comma-separated glob ``layers`` (all when empty), minus
    ``ignore`` patterns, restricted to op ``kinds``. Every include pattern must match a layer."""
    allowed = set(split_patterns(kinds))
    unknown = allowed - {"linear", "addmm_t", "conv"}
    if unknown:
        raise LayerSelectionError(f"unknown layer kind(s) {sorted(unknown)}; use linear, addmm_t or conv")
    found = [layer for layer in find_layers(gm) if layer.kind in allowed]
    include = split_patterns(layers)
    for pattern in include:
        if not any(_matches(layer.name, pattern) for layer in found):
            example = found[0].name if found else "(the model has no weighted layers)"
            raise LayerSelectionError(f"layer pattern {pattern!r} matches no layer; names look like "
                                      f"{example!r}")
    chosen = [layer for layer in found if not include or any(_matches(layer.name, p) for p in include)]
    skip = split_patterns(ignore)
    chosen = [layer for layer in chosen if not any(_matches(layer.name, p) for p in skip)]
    seen: set[str] = set()
    unique = []
    for layer in chosen:  # a tied weight is pruned once
        if layer.weight not in seen:
            seen.add(layer.weight)
            unique.append(layer)
    return unique


def parse_overrides(text: str | None) -> list[tuple[str, float]]:
    """``"*.q_proj=0.6;down_proj=0.4"`` -> ``[("*.q_proj", 0.6), ("down_proj", 0.4)]``."""
    out = []
    for item in (text or "").replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        pattern, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out.append((pattern.strip(), float(value)))
        except ValueError:
            raise LayerSelectionError(
                f"bad override {item!r}; write PATTERN=SPARSITY pairs, e.g. \"q_proj=0.6;down_proj=0.4\""
            ) from None
    return out


def layer_targets(layers: list[WeightedLayer], default: float, overrides: str | None) -> dict[str, float]:
    """Per-layer sparsity target: the last matching override wins, else ``default``."""
    rules = parse_overrides(overrides)
    for pattern, value in rules:
        check_sparsity(value, f"override {pattern!r}")
        if not any(_matches(layer.name, pattern) for layer in layers):
            raise LayerSelectionError(f"override pattern {pattern!r} matches no selected layer")
    targets = {}
    for layer in layers:
        target = default
        for pattern, value in rules:
            if _matches(layer.name, pattern):
                target = value
        targets[layer.name] = target
    return targets


def check_sparsity(value: float, option: str = "sparsity") -> None:
    if not (0.0 <= value < 1.0):
        raise LayerSelectionError(f"{option} must be in [0, 1), got {value}")


def check_finite(gm: fx.GraphModule, layers: list[WeightedLayer]) -> None:
    """Refuse NaN/Inf weights before anything is changed, naming the first bad layer."""
    for layer in layers:
        w = gm.get_parameter(layer.weight)
        if not torch.isfinite(w).all():
            bad = (~torch.isfinite(w)).sum().item()
            raise LayerSelectionError(f"layer {layer.name!r} has {bad} NaN/Inf weight(s); "
                                      f"fix its weights, or leave it out with the pass's ignore=... option")


def mask_buffer_name(layer: WeightedLayer) -> str:
    return layer.weight.replace(".", "_") + "_mask"


def current_mask(gm: fx.GraphModule, layer: WeightedLayer) -> torch.Tensor | None:
    """The layer's mask as an ``[out, in]`` bool matrix, or None when it has none."""
    name = mask_buffer_name(layer)
    if name not in dict(gm.named_buffers()):
        return None
    return layer.as_matrix(gm.get_buffer(name)) != 0


def apply_mask(gm: fx.GraphModule, layer: WeightedLayer, keep: torch.Tensor) -> None:
    """Attach ``keep`` (bool ``[out, in]`` matrix, True = kept) to ``layer``: zero the weight,
    store the mask buffer, and make sure every op using the weight multiplies it by the mask."""
    apply_masks(gm, [(layer, keep)])


def apply_masks(gm: fx.GraphModule, masks: list[tuple[WeightedLayer, torch.Tensor]]) -> None:
    """:func:`apply_mask` for many layers at once, recompiling the graph once (recompiling a
    large graph per layer costs more than the pruning itself). Every shape is checked before
    anything changes."""
    for layer, keep in masks:
        if tuple(keep.shape) != layer.shape:
            raise ValueError(f"mask shape {tuple(keep.shape)} != layer {layer.name} shape {layer.shape}")
    buffers = dict(gm.named_buffers())
    for layer, keep in masks:
        _attach_mask(gm, layer, keep, buffers)
    gm.recompile()


def _attach_mask(gm: fx.GraphModule, layer: WeightedLayer, keep: torch.Tensor, buffers: dict) -> None:
    weight = gm.get_parameter(layer.weight)
    mask = layer.to_param_layout(keep.to(weight.dtype), weight.shape).to(weight.device)
    with torch.no_grad():
        weight.mul_(mask)
    name = mask_buffer_name(layer)
    if name in buffers:
        buffers[name].copy_(mask)
    else:
        gm.register_buffer(name, mask)
        buffers[name] = gm.get_buffer(name)
    graph = gm.graph
    for node in list(graph.nodes):
        if meta.LAYER not in node.meta or node.meta[meta.LAYER].weight != layer.weight:
            continue
        position = 2 if layer.kind == "addmm_t" else 1
        src = node.args[position]
        if isinstance(src, fx.Node) and MASK_INPUT in src.meta:
            node.meta[meta.MASK] = name
            continue
        wnode = weight_source(node, position)
        with graph.inserting_before(node):
            mnode = graph.get_attr(name)
            mul = graph.call_function(operator.mul, (wnode, mnode))
        mul.meta[MASK_INPUT] = True
        args = list(node.args)
        args[position] = mul
        node.args = tuple(args)
        node.meta[meta.MASK] = name


def masked_fraction(gm: fx.GraphModule, layer: WeightedLayer) -> float:
    """Fraction of exact zeros in the layer's weight (its achieved sparsity)."""
    w = gm.get_parameter(layer.weight)
    return float((w == 0).sum().item()) / max(1, w.numel())


def prune_count(sparsity: float, numel: int) -> int:
    """How many of ``numel`` weights a target ``sparsity`` prunes: ``round(sparsity * numel)``.

    Every criterion counts through this one function so that splitting a layer into groups
    (rows, column blocks) and summing the groups' counts gives the layer's count exactly.
    """
    return int(round(sparsity * numel))


def topk_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``numel - round(sparsity * numel)`` highest scores, selected by index so ties
    (quantized weights repeat values) never prune more or fewer than asked."""
    n = scores.numel()
    k_prune = prune_count(sparsity, n)
    flat = scores.detach().reshape(-1).float()
    if 0 < k_prune < n and flat.device.type == "cpu":
        # The same mask as the stable sort below, by selection instead of a full sort (linear
        # time; a 576x1536 layer: ~10 ms instead of ~180 ms): prune everything below the
        # k-th smallest score, then the first of the scores equal to it, in index order.
        a = flat.numpy()
        threshold = np.partition(a, k_prune - 1)[k_prune - 1]
        if not np.isnan(threshold):
            below = a < threshold
            ties = np.flatnonzero(a == threshold)[: k_prune - int(below.sum())]
            keep_np = ~below
            keep_np[ties] = False
            return torch.from_numpy(keep_np).reshape(scores.shape)
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if k_prune > 0:
        idx = torch.argsort(flat, stable=True)[:k_prune]
        keep[idx] = False
    return keep.reshape(scores.shape)


def group_prune_counts(sparsity: float, groups: int, group_size: int) -> torch.Tensor:
    """Prune counts for ``groups`` equal groups of ``group_size`` weights whose sum is exactly
    ``prune_count(sparsity, groups * group_size)``: group ``g`` prunes
    ``round(s * (g+1) * size) - round(s * g * size)``, so counts differ by at most one."""
    cumulative = [prune_count(sparsity, g * group_size) for g in range(groups + 1)]
    return torch.tensor([b - a for a, b in zip(cumulative, cumulative[1:])], dtype=torch.long)


def rowwise_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask comparing scores within each row only (the Wanda comparison group).

    Row ``r`` prunes its ``group_prune_counts(...)[r]`` lowest scores (ties broken by index), so
    the whole matrix prunes exactly ``round(sparsity * numel)`` weights.
    """
    rows, cols = scores.shape
    counts = group_prune_counts(sparsity, rows, cols).to(scores.device)
    order = torch.argsort(scores.float(), dim=1, stable=True)
    pruned = torch.arange(cols, device=scores.device)[None, :] < counts[:, None]
    keep = torch.empty_like(pruned)
    keep.scatter_(1, order, ~pruned)
    return keep


def check_nm(n: int, m: int, option: str = "n:m") -> None:
    """N:M keeps ``n`` of every ``m`` consecutive input columns: needs ``1 <= n <= m``."""
    if m < 1:
        raise LayerSelectionError(f"{option}: m must be a positive group size, got m={m}")
    if n > m:
        raise LayerSelectionError(f"{option}: n={n} > m={m}; N:M keeps n of every m weights, so n must be "
                                  f"<= m")
    if n < 1:
        raise LayerSelectionError(f"{option}: n must be at least 1 (n=0 would prune every weight), got n={n}")


def check_nm_layers(layers: list[WeightedLayer], m: int) -> None:
    """Refuse, before anything changes, a layer whose input dimension is not a multiple of ``m``."""
    for layer in layers:
        if layer.shape[1] % m:
            raise LayerSelectionError(
                f"layer {layer.name!r} has {layer.shape[1]} input columns, not divisible by m={m}; "
                f"exclude it (ignore=...) or choose an m that divides it")


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive columns of each row (N:M along
    the input dimension); ties are broken by index. ``scores.shape[1]`` must be a multiple of ``m``."""
    rows, cols = scores.shape
    if cols % m:
        raise LayerSelectionError(f"{cols} columns are not divisible by m={m}")
    groups = scores.float().reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=2, stable=True)
    pruned = torch.arange(m, device=scores.device) < (m - n)
    keep = torch.empty(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(2, order, pruned.expand_as(order).logical_not())
    return keep.reshape(rows, cols)


def parse_block(text: str) -> tuple[int, int]:
    """``"1x16"`` -> ``(1, 16)``: a block of rows x columns of the ``[out, in]`` matrix."""
    parts = text.lower().replace(" ", "").split("x")
    try:
        if len(parts) != 2:
            raise ValueError
        br, bc = int(parts[0]), int(parts[1])
        if br < 1 or bc < 1:
            raise ValueError
    except ValueError:
        raise LayerSelectionError(f"block must be ROWSxCOLS with positive integers, e.g. \"1x16\" or "
                                  f"\"4x4\"; got {text!r}") from None
    return br, bc


def block_keep_mask(matrix: torch.Tensor, sparsity: float, block: tuple[int, int],
                    norm: str = "l2") -> torch.Tensor:
    """Prune whole ``block = (rows, cols)`` tiles of ``matrix``: exactly
    ``round(sparsity * number_of_blocks)`` blocks, those of lowest norm.

    A block's score is its L2 norm (``norm="l2"``) or L1 norm (``"l1"``) divided by the norm of
    an all-ones block of the same element count, so edge blocks cut short by a matrix size that
    is not a multiple of the block compete fairly with full blocks (for full blocks this is the
    plain norm up to a constant). Ties are broken by block index.
    """
    if norm not in ("l1", "l2"):
        raise LayerSelectionError(f"norm must be 'l1' or 'l2', got {norm!r}")
    br, bc = block
    rows, cols = matrix.shape
    rb, cb = -(-rows // br), -(-cols // bc)
    w = matrix.detach().double()
    padded = torch.zeros(rb * br, cb * bc, dtype=torch.float64, device=w.device)
    counts = torch.zeros_like(padded)
    padded[:rows, :cols] = w.abs() if norm == "l1" else w * w
    counts[:rows, :cols] = 1.0
    tiles = padded.reshape(rb, br, cb, bc).sum(dim=(1, 3))
    sizes = counts.reshape(rb, br, cb, bc).sum(dim=(1, 3))
    scores = tiles / sizes if norm == "l1" else (tiles / sizes).sqrt()
    keep_blocks = topk_keep_mask(scores, sparsity)
    keep = keep_blocks.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)
    return keep[:rows, :cols].contiguous()
