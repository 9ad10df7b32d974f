"""Where the energy of SmolLM2-135M's block outputs sits: first token, top channel.

SquareHead (``sparsec/finetune/losses.py``) divides each layer's squared error by the teacher's
mean square over all real tokens. This script measures, for every decoder block's output over
training windows, the share of that sum of squares held by the first token of each window and
by the single largest channel, and the largest magnitudes. Llama-family models put "massive
activations" on the first token (an attention sink); where that token holds most of the energy
the per-layer normalizer is its energy, not the other tokens'.

    python benchmarks/block_energy.py [--windows 8] [--seq-len 128]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args()

    from sparsec.data import token_windows
    from sparsec.models import load

    model, tok = load("smollm2-135m")
    windows = token_windows(tok, "train", seq_len=args.seq_len, count=args.windows, seed=args.seed)
    outputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append((o[0] if isinstance(o, tuple) else o).detach()))
             for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=windows)
    for h in hooks:
        h.remove()
    print(f"SmolLM2-135M, {args.windows} training windows of {args.seq_len} tokens; raw block outputs "
          f"(the residual stream, as the SquareHead taps see it)")
    print("| block | first token's share of sum of squares | top channel's share | max abs, first token | "
          "max abs, other tokens |")
    print("|---|---|---|---|---|")
    for index, h in enumerate(outputs):
        sq = h.double() ** 2
        total = sq.sum()
        first = (sq[:, 0].sum() / total).item()
        channel = (sq.sum((0, 1)).max() / total).item()
        print(f"| {index} | {first:.3f} | {channel:.3f} | {h[:, 0].abs().max().item():.1f} | "
              f"{h[:, 1:].abs().max().item():.1f} |")


if __name__ == "__main__":
    main()
