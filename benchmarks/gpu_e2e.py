"""SmolLM2-135M compiled for ``target="cuda"``: greedy tokens against eager PyTorch, and tokens/s.

For each value type (fp16 and int8 by default) this script

1. compiles the real SmolLM2-135M with ``prune-magnitude{sparsity=S}`` (+ ``quantize{bits=8}``
   for int8) and ``lower-cuda``: every pruned Linear becomes a sparsec bitmask kernel on the
   GPU, ``lm_head`` (kept dense) runs on cuBLAS;
2. builds the eager reference: the same Hugging Face model on the GPU whose Linear weights are
   the compiled model's packed weights unpacked (the same masked, rounded or quantized values);
3. generates greedily from fixed prompts with ``sparsec.generate`` (KV cache, kernels hosted
   in the eager model) and with Hugging Face's ``generate`` on the reference, and compares the
   tokens one by one; the smallest gap between the two best logits along the reference's path
   says how close a tie was;
4. reports tokens/s at batch 1: sparsec's decode steps, and Hugging Face ``generate`` (whole
   call) on the reference (eager fp32, same sparse weights) and on the dense model in fp32 and
   fp16. At this model size a GPU decode step is bound by per-layer launch overhead, not bytes.

    python benchmarks/gpu_e2e.py [--gguf FILE] [--sparsity 0.5] [--value-types fp16,int8]

Exits 1 when any compiled generation differs from eager, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

PROMPTS = ["The capital of France is", "Sparse neural networks are useful because"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", help="SmolLM2-135M GGUF file (default: the bundled package's)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--value-types", default="fp16,int8")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per prompt")
    p.add_argument("--design", default="auto", help="bitmask kernel design for lower-cuda (default: %(default)s)")
    p.add_argument("--json", help="write the results to this JSON file")
    return p.parse_args(argv)


def hf_greedy(torch, model, ids, n: int):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def decode_rate(torch, fn, n: int) -> float:
    """Tokens/s of ``fn()`` generating ``n`` tokens (after one warm-up call), synchronised."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_e2e: no CUDA GPU is visible to torch; run this on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    import sparsec
    from sparsec.models import load
    from sparsec.runtime.generate import generate

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is plain fp32
    model, tok = load("smollm2-135m", gguf=args.gguf)
    dev = torch.device("cuda")
    results: dict = {"device": torch.cuda.get_device_name(0), "sparsity": args.sparsity, "runs": []}
    print(f"device: {results['device']}; torch {torch.__version__}", flush=True)
    ids0 = tok(PROMPTS[0], return_tensors="pt").input_ids
    failures = 0
    for vt in args.value_types.split(","):
        # int8 values come from quantize (lowering follows its record); float types are asked of lower-cuda
        options = [] if vt == "int8" else [f"value_type={vt}"]
        if args.design != "auto":
            options.append(f"design={args.design}")
        lower = "lower-cuda" + ("{" + ",".join(options) + "}" if options else "")
        quantize = "quantize{bits=8}," if vt == "int8" else ""
        pipeline = f"prune-magnitude{{sparsity={args.sparsity}}},{quantize}{lower}"
        t0 = time.perf_counter()
        compiled = sparsec.compile(model, {"input_ids": ids0}, pipeline, target="cuda")
        compile_s = time.perf_counter() - t0
        rep = compiled.report
        print(f"\n[{vt}] {pipeline}: compiled in {compile_s:.1f} s; {len(rep.layers)} layers; output max rel "
              f"error {rep.max_rel_error:.2e} vs eager on the same weights", flush=True)
        formats = sorted({(r.format, r.value_type) for r in rep.layers})
        reference = copy.deepcopy(model)
        for k in compiled.kernels():
            reference.get_submodule(k.layer).weight = torch.nn.Parameter(k.packed.unpack(), requires_grad=False)
        reference.to(dev).eval()
        run = {"value_type": vt, "pipeline": pipeline, "compile_seconds": round(compile_s, 1),
               "layers": len(rep.layers), "formats": formats, "max_rel_error": rep.max_rel_error, "prompts": []}
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids.to(dev)
            ours = generate(compiled, tok, prompt, args.tokens, stop_at_eos=False)
            with torch.no_grad():
                ref = hf_greedy(torch, reference, ids, args.tokens).cpu()
                full = torch.cat([ids, ref.to(dev)], 1)
                top2 = reference(full).logits[0, ids.shape[1] - 1:-1].float().topk(2).values
            margin = float((top2[:, 0] - top2[:, 1]).min())
            same = torch.equal(ours.tokens, ref)
            first_diff = None
            if not same:
                diff = (ours.tokens[0] != ref[0]).nonzero()
                first_diff = int(diff[0]) if len(diff) else None
                failures += 1
            print(f"  {'SAME' if same else 'DIFFERENT'} tokens for {prompt!r} (min top-2 logit gap {margin:.3g}"
                  f"{'' if same else f', first difference at token {first_diff}'})\n    sparsec: "
                  f"{ours.text!r}\n    eager:   {tok.decode(ref[0], skip_special_tokens=True)!r}", flush=True)
            run["prompts"].append({"prompt": prompt, "same": same, "first_difference": first_diff,
                                   "min_top2_gap": margin, "text": ours.text})
        n = args.tokens
        generate(compiled, tok, PROMPTS[0], n, stop_at_eos=False)  # warm
        run["tokens_per_second"] = {
            "sparsec_decode": generate(compiled, tok, PROMPTS[0], n, stop_at_eos=False).tokens_per_second,
            "eager_fp32_same_weights_generate": decode_rate(
                torch, lambda m=reference, k=n: hf_greedy(torch, m, ids0.to(dev), k), n),
        }
        print(f"  tokens/s at batch 1 ({n} tokens; sparsec: decode steps only, eager: whole generate call): "
              + ", ".join(f"{k} {v:.1f}" for k, v in run["tokens_per_second"].items()), flush=True)
        results["runs"].append(run)
        del compiled, reference
        torch.cuda.empty_cache()
    dense = copy.deepcopy(model).to(dev).eval()
    results["dense_eager_fp32_tokens_per_second"] = decode_rate(
        torch, lambda: hf_greedy(torch, dense, ids0.to(dev), args.tokens), args.tokens)
    dense.half()
    results["dense_eager_fp16_tokens_per_second"] = decode_rate(
        torch, lambda: hf_greedy(torch, dense, ids0.to(dev), args.tokens), args.tokens)
    print(f"\ndense eager tokens/s: fp32 {results['dense_eager_fp32_tokens_per_second']:.1f}, "
          f"fp16 {results['dense_eager_fp16_tokens_per_second']:.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    print("all compiled generations equal eager" if not failures else f"{failures} generation(s) differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
