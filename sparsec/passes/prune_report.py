"""Per-layer sparsity report: what each pruning pass aimed for and what the weights now hold.

``sparsity_report(gm)`` reads the :data:`~sparsec.ir.meta.PRUNE` record every pruning pass
leaves on a layer's op node and measures the weight itself, so the report cannot disagree with
the model::

    report = sparsity_report(gm)
    report["model.layers.0.mlp.up_proj"]
    # {'shape': (1536, 576), 'target': 0.5, 'achieved': 0.5, 'criterion': 'sparsegpt', 'pattern': None}
    print(format_sparsity_table(report))

Layers no pass pruned are listed with criterion ``"dense"`` and target ``None``.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from sparsec.ir import meta
from sparsec.ir.layers import find_layers
from sparsec.passes.masks import masked_fraction


def sparsity_report(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """``{layer name: {shape, target, achieved, criterion, pattern}}`` (and ``owl_outlier_ratio``,
    the layer's block outlier ratio, where OWL chose the target) for every weighted layer, in
    graph order (a weight shared by several ops is listed once). ``achieved`` is the fraction of
    exact zeros in the weight; ``target`` is what the pass aimed for (for ``prune-block``, the
    fraction of blocks); ``pattern`` is ``"n:m"`` or a block shape where the pass imposed one."""
    records: dict[str, dict[str, Any]] = {}
    prune_of: dict[str, dict] = {}
    for node in gm.graph.nodes:
        if meta.PRUNE in node.meta and meta.LAYER in node.meta:
            prune_of.setdefault(node.meta[meta.LAYER].weight, node.meta[meta.PRUNE])
    seen: set[str] = set()
    for layer in find_layers(gm):
        if layer.weight in seen:
            continue
        seen.add(layer.weight)
        prune = prune_of.get(layer.weight, {})
        records[layer.name] = {
            "shape": tuple(layer.shape),
            "target": prune.get("target"),
            "achieved": masked_fraction(gm, layer),
            "criterion": prune.get("criterion", "dense"),
            "pattern": prune.get("pattern", prune.get("block")),
        }
        if "owl_outlier_ratio" in prune:  # why OWL gave this layer its target
            records[layer.name]["owl_outlier_ratio"] = prune["owl_outlier_ratio"]
    return records


def format_sparsity_table(report: dict[str, dict[str, Any]]) -> str:
    """The report as an aligned text table, with a last row of totals weighted by layer size."""
    owl = any("owl_outlier_ratio" in r for r in report.values())
    header = ("layer", "shape", "criterion", "target", "achieved") + (("outliers",) if owl else ())
    rows = []
    zeros = total = 0.0
    for name, r in report.items():
        numel = r["shape"][0] * r["shape"][1]
        zeros += r["achieved"] * numel
        total += numel
        criterion = r["criterion"] + (f" {r['pattern']}" if r.get("pattern") else "")
        target = "-" if r["target"] is None else f"{r['target']:.4f}"
        row = (name, f"{r['shape'][0]}x{r['shape'][1]}", criterion, target, f"{r['achieved']:.4f}")
        if owl:
            ratio = r.get("owl_outlier_ratio")
            row += ("-" if ratio is None else f"{ratio:.4f}",)
        rows.append(row)
    rows.append(("total", f"{int(total)} weights", "", "", f"{zeros / total:.4f}" if total else "-")
                + (("",) if owl else ()))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    def line(row: tuple) -> str:
        # text columns left-aligned, numbers right-aligned
        cells = zip(row, widths)
        return "  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(cells))

    lines = [line(row) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
