"""SmolLM2-135M, 50% sparse + int8, compiled for the CPU: same greedy text as eager PyTorch?

One run does what issue 6 asks of the CPU kernels on a real model:

1. loads the bundled SmolLM2-135M-Instruct (``sparsec.models.load``, fp32);
2. compiles it with ``sparsec.compile`` through
   ``prune-magnitude{sparsity=0.5},quantize{bits=8},lower-cpu`` (every linear layer but
   ``lm_head`` pruned to 50% by magnitude, then int8 per output channel on the kept values,
   packed as ``bitmask`` int8; ``lm_head``, tied to the embedding, stays dense fp32), timing the
   compile and reporting each layer's kernel compile time;
3. checks the packed weights: the quantized layers hold 50% zeros and every kept value is an
   integer level in [-127, 127] times its row's scale;
4. builds the eager reference: a copy of the Hugging Face model whose linear weights are the
   compiled model's packed weights unpacked (the same masked, dequantized int8 values);
5. generates greedily ``--new-tokens`` tokens from fixed prompts with ``sparsec.generate`` on
   the compiled model and with Hugging Face's own ``generate`` on the eager reference, prints both
   texts and whether the tokens are equal, and the smallest gap between the two best logits
   along the way (how far kernel rounding is from flipping a token).

Exit status 1 when the tokens differ (or a packed weight check fails), 0 otherwise.

Kernel code is compiled by Numba and cached on disk; by default the run uses a fresh, empty
kernel cache (``$SPARSEC_CACHE_DIR`` set to a temporary folder) so that the compile time is the
cold one. ``--warm-cache`` uses the usual cache instead.

    python benchmarks/smollm2_greedy_check.py
    python benchmarks/smollm2_greedy_check.py --warm-cache --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

PIPELINE = "prune-magnitude{sparsity=0.5},quantize{bits=8},lower-cpu"
#: prompts whose greedy continuations (on these weights) are not a single repeated token
PROMPTS = ["My favorite food is", "def fibonacci(n):"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--prompt", action="append", help=f"repeatable; default {PROMPTS}")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--pipeline", default=PIPELINE)
    p.add_argument("--warm-cache", action="store_true",
                   help="use the usual kernel cache instead of a fresh one (compile time then is a warm one)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads while generating (default 1)")
    p.add_argument("--json", help="also write the numbers to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.prompt = args.prompt or PROMPTS
    load_start = os.getloadavg()
    fresh_cache = None
    if not args.warm_cache:  # before sparsec's kernel code generator reads it
        fresh_cache = tempfile.mkdtemp(prefix="sparsec_kernels_")
        os.environ["SPARSEC_CACHE_DIR"] = fresh_cache
    try:
        return run(args, load_start)
    finally:
        if fresh_cache:
            shutil.rmtree(fresh_cache, ignore_errors=True)


def run(args: argparse.Namespace, load_start: tuple[float, float, float]) -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import torch

    import sparsec
    from sparsec.models import load

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; load average at start "
          f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    print(f"# kernel cache: {'usual (warm)' if args.warm_cache else 'fresh, empty (cold)'}")
    model, tokenizer = load("smollm2-135m")
    ids = tokenizer(args.prompt[0], return_tensors="pt").input_ids  # the example input of the compile
    print(f"# pipeline: {args.pipeline}")

    t0, c0 = time.perf_counter(), time.process_time()
    compiled = sparsec.compile(model, {"input_ids": ids}, args.pipeline)
    compile_wall, compile_cpu = time.perf_counter() - t0, time.process_time() - c0
    report = compiled.report
    load_after_compile = os.getloadavg()

    per_layer = [r.compile_seconds for r in report.layers]
    compiling = sorted(report.layers, key=lambda r: -r.compile_seconds)
    kinds: dict[str, int] = {}
    for r in report.layers:
        key = f"{r.format}/{r.value_type}"
        kinds[key] = kinds.get(key, 0) + 1
    print(f"\ncompile: {compile_wall:.1f} s wall, {compile_cpu:.1f} s CPU (all threads); load average after "
          f"{load_after_compile[0]:.2f}")
    print(f"  capture ({report.capture_method}) {report.capture_seconds:.1f} s, passes "
          + ", ".join(f"{n} {s:.1f} s" for n, s in report.pass_seconds)
          + f", kernels {report.kernel_seconds:.1f} s, report total {report.total_seconds:.1f} s")
    print(f"  {len(per_layer)} layers ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}); kernel compile "
          f"per layer: min {min(per_layer):.3f} s, median {statistics.median(per_layer):.3f} s, "
          f"max {max(per_layer):.2f} s, sum {sum(per_layer):.1f} s")
    slow = [r for r in compiling if r.compile_seconds >= 0.1]
    print(f"  layers that compiled (or loaded) kernel code, >= 0.1 s: {len(slow)}: "
          + ", ".join(f"{r.name} ({r.format}/{r.value_type}) {r.compile_seconds:.1f} s" for r in slow[:8]))
    print(f"  output max rel error vs eager on the same weights (compile's own check): {report.max_rel_error:.2e}")

    # --- the packed weights are what the issue says: 50% sparse, int8 levels times a row scale
    problems = []
    kernels = compiled.kernels()
    quantized = [k for k in kernels if k.packed.value_type == "int8"]
    zeros = total = 0
    for k in quantized:
        w = k.packed.unpack()
        scales = k.packed.scales
        # integers up to the float32 rounding of level * scale (a row with no kept weight: all 0)
        levels = w / torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
        if (levels - levels.round()).abs().max() > 1e-3 or levels.round().abs().max() > 127:
            problems.append(f"{k.layer}: values are not int8 levels times the row scale")
        zeros += int((w == 0).sum())
        total += w.numel()
    sparsity = zeros / max(1, total)
    print(f"  int8 layers: {len(quantized)} of {len(kernels)}, sparsity of their weights {sparsity:.4f}")
    if not quantized or abs(sparsity - 0.5) > 0.01:
        problems.append(f"expected 50% sparse int8 layers, got {len(quantized)} layers at {sparsity:.4f}")

    # --- the eager reference on the same weights
    eager = copy.deepcopy(model)
    for k in kernels:
        # a new parameter: lm_head is tied to the embedding, which stays as it was
        eager.get_submodule(k.layer).weight = torch.nn.Parameter(k.packed.unpack(), requires_grad=False)

    # One torch thread for generating: on a machine whose cores are busy with other work, a
    # two-thread attention call waits for a core each token (docs/performance.md, End-to-end decode).
    torch.set_num_threads(args.torch_threads)
    n = args.new_tokens
    outcomes = []
    for prompt in args.prompt:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        t0 = time.perf_counter()
        result = sparsec.generate(compiled, tokenizer, prompt, n, stop_at_eos=False)
        sparse_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            out = eager.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id or 0)
        eager_s = time.perf_counter() - t0
        expected = out[:, ids.shape[1]:]
        got = result.tokens
        equal = torch.equal(got, expected)
        with torch.no_grad():  # how close kernel rounding came to flipping a token
            full = torch.cat([ids, expected], 1)
            top2 = eager(full).logits[0, ids.shape[1] - 1:-1].topk(2).values
        margin = (top2[:, 0] - top2[:, 1]).min().item()
        eager_text = tokenizer.decode(expected[0], skip_special_tokens=True)
        distinct = len(set(expected[0].tolist()))
        print(f"\nprompt: {prompt!r}")
        print(f"  sparsec.generate  ({n} tokens, {sparse_s:.1f} s, {result.step} decode step): {result.text!r}")
        if result.step_reason:
            print(f"    ({result.step_reason})")
        print(f"  eager HF generate ({n} tokens, {eager_s:.1f} s): {eager_text!r}")
        if equal:
            print(f"  greedy tokens equal: yes ({got.shape[1]} of {n}, {distinct} distinct); "
                  f"smallest top-2 logit gap along the way {margin:.4f}")
        else:
            diff = (got[0] != expected[0]).nonzero() if got.shape == expected.shape else torch.zeros(1, 1)
            print(f"  greedy tokens equal: NO, first difference at new token {int(diff[0])}; "
                  f"smallest top-2 logit gap {margin:.4f}")
            problems.append(f"greedy tokens differ for {prompt!r}")
        outcomes.append(dict(prompt=prompt, sparsec_text=result.text, eager_text=eager_text, tokens_equal=equal,
                             decode_step=result.step,
                             sparsec_tokens=got[0].tolist(), eager_tokens=expected[0].tolist(),
                             distinct_tokens=distinct, top2_margin=margin, sparsec_seconds=sparse_s,
                             eager_seconds=eager_s))
    load_end = os.getloadavg()
    print(f"# load average at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(pipeline=args.pipeline, new_tokens=n, warm_cache=args.warm_cache,
                           compile_wall_seconds=compile_wall, compile_cpu_seconds=compile_cpu,
                           capture_seconds=report.capture_seconds, pass_seconds=report.pass_seconds,
                           kernel_seconds=report.kernel_seconds, report_total_seconds=report.total_seconds,
                           per_layer_compile_seconds={r.name: r.compile_seconds for r in report.layers},
                           int8_layers=len(quantized), sparsity=sparsity, max_rel_error=report.max_rel_error,
                           generations=outcomes, load_average_start=load_start,
                           load_average_after_compile=load_after_compile, load_average_end=load_end), f, indent=1)
    for p in problems:
        print(f"FAIL: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
