"""Bits per weight of every storage format x value type on real SmolLM2-135M layers.

Prunes each chosen linear layer (q/k/v/o and gate/up/down of the chosen decoder blocks) in the
way each format is meant for, packs it, and reports ``8 * stored bytes / weights`` summed over
the layers (so bigger layers weigh more):

* bitmask, csr, dense: unstructured magnitude pruning, exactly ``k`` weights kept per row
  (chosen by index, since the dequantized Q4_1 weights repeat values on the grid);
* nm: magnitude N:M pruning within each group of M columns (2:4 at 50%, 1:4 at 75%);
* block: whole ``BR x BC`` blocks kept by largest L2 norm, per block row.

Run (prints a markdown table; a few minutes on 2 cores with the default four blocks)::

    python benchmarks/format_sizes.py --blocks 0 10 20 29
"""

from __future__ import annotations

import argparse
import time

import torch

from sparsec.formats import VALUE_TYPES, pack

SPARSITIES = (0.5, 0.7, 0.75, 0.9)
NM_PATTERNS = {0.5: (2, 4), 0.75: (1, 4)}
BLOCKS = ((1, 16), (4, 4))
GROUP_SIZE = 128
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def prune_rows(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep exactly ``round(cols * (1 - sparsity))`` largest-magnitude weights in every row."""
    keep = round(w.shape[1] * (1 - sparsity))
    idx = w.abs().topk(keep, dim=1).indices
    mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)
    return w * mask


def prune_nm(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest-magnitude weights of every group of ``m`` consecutive columns."""
    rows, cols = w.shape
    groups = w.view(rows, cols // m, m)
    idx = groups.abs().topk(n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return (groups * mask).view(rows, cols)


def prune_blocks(w: torch.Tensor, sparsity: float, br: int, bc: int) -> torch.Tensor:
    """Keep the largest-L2-norm ``br x bc`` blocks, the same number in every block row."""
    rows, cols = w.shape
    rb, cb = rows // br, cols // bc
    tiles = w.view(rb, br, cb, bc)
    norms = tiles.pow(2).sum(dim=(1, 3))
    keep = round(cb * (1 - sparsity))
    idx = norms.topk(keep, dim=1).indices
    kept = torch.zeros(rb, cb, dtype=torch.bool).scatter_(1, idx, True)
    return (tiles * kept[:, None, :, None]).reshape(rows, cols)


def layer_weights(blocks: list[int]) -> list[tuple[str, torch.Tensor]]:
    from sparsec.models import load

    model, _ = load("smollm2-135m")
    params = dict(model.named_parameters())
    out = []
    for b in blocks:
        for proj in PROJECTIONS:
            name = f"model.layers.{b}.{proj}.weight"
            out.append((name, params[name].detach().float().clone()))
    return out


def measure(weights: list[tuple[str, torch.Tensor]]) -> dict[tuple[str, str, float], float]:
    """(format label, value type, sparsity) -> bits per weight over all the layers."""
    total = sum(w.numel() for _, w in weights)
    sizes: dict[tuple[str, str, float], int] = {}

    def add(label: str, vt: str, s: float, pruned: torch.Tensor, fmt: str, **options) -> None:
        if vt == "int4":
            options["group_size"] = GROUP_SIZE
        p = pack(pruned, fmt, vt, **options)
        sizes[(label, vt, s)] = sizes.get((label, vt, s), 0) + p.nbytes()

    for _, w in weights:
        for s in SPARSITIES:
            unstructured = prune_rows(w, s)
            nm = NM_PATTERNS.get(s)
            nm_pruned = prune_nm(w, *nm) if nm else None
            blocked = {blk: prune_blocks(w, s, *blk) for blk in BLOCKS}
            for vt in VALUE_TYPES:
                add("dense", vt, s, unstructured, "dense")
                add("bitmask", vt, s, unstructured, "bitmask")
                add("csr", vt, s, unstructured, "csr")
                if nm_pruned is not None:
                    add("nm", vt, s, nm_pruned, "nm", n=nm[0], m=nm[1])
                for blk, pruned in blocked.items():
                    add(f"block {blk[0]}x{blk[1]}", vt, s, pruned, "block", block_shape=blk)
    return {key: 8.0 * nbytes / total for key, nbytes in sizes.items()}


def table(bits: dict[tuple[str, str, float], float]) -> str:
    labels = ["dense", "bitmask", "csr", "nm"] + [f"block {br}x{bc}" for br, bc in BLOCKS]
    head = "| format | values | " + " | ".join(f"{round(s * 100)}%" for s in SPARSITIES) + " |"
    lines = [head, "|" + "---|" * (2 + len(SPARSITIES))]
    for label in labels:
        for vt in VALUE_TYPES:
            cells = []
            for s in SPARSITIES:
                v = bits.get((label, vt, s))
                if v is None:
                    cells.append("n/a")
                elif label == "nm":
                    n, m = NM_PATTERNS[s]
                    cells.append(f"{v:.2f} ({n}:{m})")
                else:
                    cells.append(f"{v:.2f}")
            lines.append(f"| {label} | {vt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29], help="decoder blocks to measure")
    args = parser.parse_args()
    t0 = time.perf_counter()
    weights = layer_weights(args.blocks)
    count = sum(w.numel() for _, w in weights)
    print(f"{len(weights)} layers from blocks {args.blocks}, {count:,} weights; int4 group size {GROUP_SIZE}\n")
    print(table(measure(weights)))
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
