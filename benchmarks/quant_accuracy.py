"""Held-out perplexity of SmolLM2-135M under weight quantization, alone and fused with sparsity.

    python benchmarks/quant_accuracy.py [--calibration 32] [--windows 16]

Runs the pass pipelines on the captured graph and evaluates the graph eagerly (PyTorch ops on the
dequantized weights), so the numbers measure the formats' accuracy, not the kernels'. Rows:
dense; int8 RTN (per output channel); int4 g128 RTN and GPTQ; 50% SparseGPT; 50% SparseGPT then
int8. Calibration windows come from the train split, evaluation windows from the held-out split
(docs/data.md). Prints a markdown table with the ratio to the relevant baseline.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from sparsec.capture import bind_inputs, capture
from sparsec.data import heldout_windows, perplexity, token_windows
from sparsec.models import load
from sparsec.passes import PassContext, Pipeline, run_passes


class _Graph(torch.nn.Module):
    def __init__(self, cap, gm) -> None:
        super().__init__()
        self.cap, self.gm = cap, gm

    def forward(self, input_ids):
        _, kwargs = bind_inputs(self.cap.method, self.cap.input_names, self.cap.constant_kwargs, (),
                                {"input_ids": input_ids})
        return self.gm(**kwargs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibration", type=int, default=32, help="calibration windows of 512 tokens")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows of 512 tokens")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load("smollm2-135m")
    evals = heldout_windows(tok, 512, args.windows)
    calib_ids = token_windows(tok, "train", 512, args.calibration, seed=0)
    example = {"input_ids": evals[:1, :16]}
    base = capture(model, example)
    calibration = [((), {"input_ids": w[None], **base.constant_kwargs}) for w in calib_ids]

    def run(gm, text):
        ctx = PassContext(calibration=calibration)
        t0 = time.perf_counter()
        gm, _ = run_passes(gm, list(Pipeline.parse(text).passes), ctx)
        return gm, time.perf_counter() - t0

    def ppl(gm):
        return perplexity(_Graph(base, gm), evals)

    rows = []
    dense = ppl(base.graph_module)
    rows.append(("dense fp32", "-", dense, None, 0.0))
    for label, text in [("int8 RTN", "quantize{bits=8}"),
                        ("int4 g128 RTN", "quantize{bits=4,group=128}"),
                        ("int4 g128 GPTQ", "quantize{bits=4,group=128,method=gptq}")]:
        gm, secs = run(copy.deepcopy(base.graph_module), text)
        rows.append((label, text, ppl(gm), dense, secs))
    sparse, secs = run(copy.deepcopy(base.graph_module), "prune-sparsegpt{sparsity=0.5}")
    sparse_ppl = ppl(sparse)
    rows.append(("50% SparseGPT", "prune-sparsegpt{sparsity=0.5}", sparse_ppl, dense, secs))
    gm, secs = run(copy.deepcopy(sparse), "quantize{bits=8}")
    rows.append(("50% SparseGPT + int8 RTN", "... then quantize{bits=8}", ppl(gm), sparse_ppl, secs))
    print(f"SmolLM2-135M, held-out perplexity on {args.windows} x 512 tokens; calibration "
          f"{args.calibration} x 512 train tokens; threads {torch.get_num_threads()}\n")
    print("| model | pipeline | perplexity | vs baseline | pass seconds |")
    print("|---|---|---:|---:|---:|")
    for label, text, p, ref, secs in rows:
        rel = "-" if ref is None else f"{100 * (p / ref - 1):+.2f}%"
        print(f"| {label} | `{text}` | {p:.3f} | {rel} | {secs:.0f} |")


if __name__ == "__main__":
    main()
