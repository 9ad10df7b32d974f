"""Which 4-bit grid SmolLM2-135M's weights tolerate: round-to-nearest, fake-quantized, no kernels.

The bundled model is a dequantized Q4_1 GGUF: every Linear weight already sits on an asymmetric
4-bit grid, ``q * d + m`` with a float scale ``d`` and a float minimum ``m`` per 32 inputs. This
script re-quantizes every Linear but ``lm_head`` with round-to-nearest onto several grids and
measures held-out perplexity (16 windows of 512 tokens, the quantization accuracy benchmark's
setting), so the loss of each grid is separated from the quantizer (RTN vs GPTQ):

* ``sym``: ``q * s``, q in [-8, 7], s = max|w| / 7 (sparsec's int4);
* ``zero``: ``(q - z) * s``, q in [0, 15], integer zero point z (compressed-tensors' asymmetric);
* ``min``: ``q * s + m``, q in [0, 15], float minimum m (Q4_1's grid).

    python benchmarks/int4_grids.py [--groups 32,128] [--grids sym,zero,min]
"""

from __future__ import annotations

import argparse
import time

import torch


def fake_quantize(w: torch.Tensor, group: int, grid: str) -> torch.Tensor:
    """``w`` rounded onto a 4-bit ``grid`` per ``group`` consecutive inputs (the last group of a
    row padded with zeros), back in float32."""
    rows, cols = w.shape
    pad = (-cols) % group
    g = torch.nn.functional.pad(w, (0, pad)).reshape(rows, -1, group)
    if grid == "sym":
        scale = (g.abs().amax(-1, keepdim=True) / 7).clamp(min=1e-12)
        out = torch.clamp(torch.round(g / scale), -8, 7) * scale
    else:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        if grid == "zero":
            zero = torch.round(-lo / scale)
            out = (torch.clamp(torch.round(g / scale) + zero, 0, 15) - zero) * scale
        elif grid == "min":
            out = torch.clamp(torch.round((g - lo) / scale), 0, 15) * scale + lo
        else:
            raise ValueError(f"unknown grid {grid!r}; use sym, zero or min")
    return out.reshape(rows, -1)[:, :cols]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", default="32,128")
    p.add_argument("--grids", default="sym,zero,min")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sparsec.data import heldout_windows, perplexity
    from sparsec.models import load

    model, tok = load("smollm2-135m")
    windows = heldout_windows(tok, seq_len=512, windows=args.windows)
    originals = {name: m.weight.detach().clone() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}
    dense = perplexity(model, windows)
    print(f"| grid | group | held-out perplexity | vs dense ({dense:.3f}) |")
    print("|---|---|---|---|")
    for group in (int(g) for g in args.groups.split(",")):
        for grid in args.grids.split(","):
            t0 = time.perf_counter()
            with torch.no_grad():
                for name, w in originals.items():
                    model.get_submodule(name).weight.copy_(fake_quantize(w, group, grid))
            ppl = perplexity(model, windows)
            seconds = time.perf_counter() - t0
            print(f"| {grid} | {group} | {ppl:.3f} | {100 * (ppl / dense - 1):+.1f}% |  ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
