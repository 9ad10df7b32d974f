"""Where one batch-1 decode step of SmolLM2-135M goes, sparsec sparse int8 (or bf16).

Times, on the same loaded model and in one process (torch 1 thread, as in ``e2e_decode.py``):

* the fused decode step (``step="fused"``: every layer in one compiled call, then ``lm_head``;
  on ``SPARSEC_NUM_THREADS`` threads) whole and its layers alone;
* the whole decode step on the module path (``sparsec.runtime.generate.generate`` with
  ``step="modules"``, prefill excluded) with the sparse kernels hosted in the Hugging Face model,
  and the same loop with every linear layer returning zeros (the floor: the loop, the Hugging
  Face modules, attention, norms);
* ``lm_head`` (dense fp32) on a decode-shaped input, alone and after that pass of kernels;
* every kernel module of the step (q/k/v and gate/up fused, as hosted) called once in model
  order on decode-shaped inputs, the weights streaming from memory as in a step, split into: the
  Python around the kernel (argument checks, quantizing x, allocating the output, building the
  argument tuple), the Numba dispatch of the kernel (the same calls on empty row ranges:
  type-checking ~30 arguments) and the kernels' own work (the rest); and each kernel alone,
  called repeatedly so that its weights stay in cache;
* the glue of the fused groups: every q/k/v and gate/up part slicing its rows out of the
  group's output and copying them;
* the floor's torch operator calls per step (``torch.profiler``) and what one small torch
  operator costs from Python here, so the floor can be read as "calls x cost per call".

Every time is the median of blocks of calls, by the CPU clock of this process (``--clock cpu``,
the default, as the shared machine's wall clock includes time spent waiting for a core) or the
wall clock.

    python benchmarks/decode_breakdown.py                 # 50% int8
    python benchmarks/decode_breakdown.py --sparsity 0.7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import e2e_decode  # noqa: E402  (sets OMP_WAIT_POLICY and sys.path before importing torch)
import torch  # noqa: E402

from sparsec.codegen.cpu import kernel as cpu_kernel  # noqa: E402
from sparsec.runtime.compiled import KernelLinear  # noqa: E402
from sparsec.runtime.decode_step import fused_step_for  # noqa: E402
from sparsec.runtime.generate import FusedPart, generate  # noqa: E402

CLOCK = time.process_time


def per_call(fn, calls: int, blocks: int = 7) -> float:
    """Median seconds per call of ``fn()`` over ``blocks`` blocks of ``calls`` calls."""
    fn()
    out = []
    for _ in range(blocks):
        t0 = CLOCK()
        for _ in range(calls):
            fn()
        out.append((CLOCK() - t0) / calls)
    return statistics.median(out)


def step_ms(model, ids, new_tokens: int, rounds: int, step: str = "modules") -> float:
    generate(model, None, ids, 4, stop_at_eos=False, step=step)
    out = []
    for _ in range(rounds):
        r = generate(model, None, ids, new_tokens, stop_at_eos=False, step=step)
        seconds = r.decode_cpu_seconds if CLOCK is time.process_time else r.decode_seconds
        out.append(1e3 * seconds / (r.steps - 1))
    return statistics.median(out)


def kernel_modules(model) -> list[KernelLinear]:
    """The kernel modules one decode step calls, each once (a fused group once, not per part)."""
    seen, out = set(), []
    for m in model.modules():
        k = m.group.fused if isinstance(m, FusedPart) else m
        if isinstance(k, KernelLinear) and id(k) not in seen:
            seen.add(id(k))
            out.append(k)
    return out


def main() -> None:
    global CLOCK
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--values", default="int8")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args()
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 torch thread, {args.clock} clock, load average {os.getloadavg()[0]:.1f}",
          flush=True)

    model = e2e_decode.load_model("smollm2-135m")
    swap = e2e_decode.SparseSwap(model, args.sparsity, args.values)
    floor = e2e_decode.NoLinearWork(model)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    res: dict[str, float] = {}

    with torch.inference_mode():
        # whole steps, alternating so that load bursts hit both
        full, flo = [], []
        for _ in range(args.rounds):
            with swap as m:
                full.append(step_ms(m, ids, args.new_tokens, 1))
            with floor as m:
                flo.append(step_ms(m, ids, args.new_tokens, 1))
        res["step_ms"] = statistics.median(full)
        res["floor_ms"] = statistics.median(flo)

        # the same steps as one compiled call over all layers, then lm_head
        with swap as m:
            res["fused_step_ms"] = step_ms(m, ids, args.new_tokens, args.rounds, step="fused")
            fused = fused_step_for(m)
            res["fused_threads"] = fused.threads
            res["fused_layers_ms"] = 1e3 * per_call(lambda: fused.hidden_state(1, args.prompt_tokens), 50)

        h = torch.randn(1, 1, model.config.hidden_size)
        res["lm_head_ms"] = 1e3 * per_call(lambda: model.lm_head(h), 50)

        with swap as m:
            mods = kernel_modules(m)
            # record each module's (fn, parts, args) by wrapping run_ranges for one call
            captured: list[tuple] = []
            real = cpu_kernel.run_ranges
            cpu_kernel.run_ranges = lambda fn, parts, a: (captured.append((fn, parts, a)), real(fn, parts, a))[1]
            try:
                xs = [torch.randn(1, 1, k.in_features) for k in mods]
                for k, x in zip(mods, xs):
                    k(x)
            finally:
                cpu_kernel.run_ranges = real
            assert len(captured) == len(mods), (len(captured), len(mods))
            # One pass calls every kernel once in model order, as a step does: 68 MB of packed
            # weights (50% int8) do not stay in a 32 MB cache between passes, so a pass reads them
            # from memory as a step does. The same pass in three forms splits the cost.
            calls = list(zip(mods, xs, captured))

            def pass_modules():
                for k, x, _ in calls:
                    k(x)

            def pass_kernels():
                for _, _, (fn, parts, a) in calls:
                    real(fn, parts, a)

            empties = [(fn, int(parts[0]), a) for _, _, (fn, parts, a) in calls]

            def pass_empty():
                for fn, lo, a in empties:
                    fn(lo, lo, 0, *a)

            module_s = per_call(pass_modules, 5)
            run_s = per_call(pass_kernels, 5)
            dispatch_s = per_call(pass_empty, 5)
            kernel_s = run_s - dispatch_s
            hot = {}
            for k, x in zip(mods, xs):  # each alone, called repeatedly: its weights stay in cache
                t = per_call(lambda k=k, x=x: k(x), 20, 3)
                hot.setdefault(f"{k.out_features}x{k.in_features}", []).append(1e6 * t)

            def pass_all_linear():
                pass_modules()
                m.lm_head(h)

            res["all_linear_pass_ms"] = 1e3 * per_call(pass_all_linear, 5)

            # the glue of fused groups: each part of q/k/v and gate/up is a module that slices its
            # rows out of the group's output and copies them (the group's kernel already ran for x)
            parts = [mod for mod in m.modules() if isinstance(mod, FusedPart)]
            px = {}
            for part in parts:
                px.setdefault(id(part.group), torch.randn(1, 1, part.in_features))
                part(px[id(part.group)])

            def pass_parts():
                for part in parts:
                    part(px[id(part.group)])

            res["fused_parts"] = len(parts)
            res["fused_glue_ms"] = 1e3 * per_call(pass_parts, 20)
        res["kernel_calls"] = len(mods)
        res["kernel_modules_ms"] = 1e3 * module_s
        res["kernel_work_ms"] = 1e3 * kernel_s
        res["numba_dispatch_ms"] = 1e3 * dispatch_s
        res["kernel_python_ms"] = 1e3 * (module_s - kernel_s - dispatch_s)
        res["rest_ms"] = res["step_ms"] - res["floor_ms"] - res["all_linear_pass_ms"]

        # the floor as torch operator calls
        from torch.profiler import ProfilerActivity, profile

        steps = 8
        with floor as m:
            generate(m, None, ids, 2, stop_at_eos=False)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                generate(m, None, ids, steps + 1, stop_at_eos=False)
        # ops of the prefill call are counted too: subtract one prefill's worth
        with floor as m, profile(activities=[ProfilerActivity.CPU]) as prof1:
            generate(m, None, ids, 1, stop_at_eos=False)

        def top_level_ops(pr) -> int:
            # operators called from Python: events with no parent event (children are internal)
            return sum(1 for e in pr.events() if e.cpu_parent is None and e.name.startswith("aten::"))

        res["floor_torch_ops_per_step"] = (top_level_ops(prof) - top_level_ops(prof1)) / steps
        a, b = torch.randn(model.config.hidden_size), torch.randn(model.config.hidden_size)
        res["small_torch_op_us"] = 1e6 * per_call(lambda: torch.add(a, b), 2000)
        res["python_module_call_us"] = 1e6 * per_call(lambda: model.model.norm(h), 2000)

    res["load_average_end"] = os.getloadavg()[0]
    print(f"\nSmolLM2-135M, sparsec {args.sparsity:.0%} {args.values}, batch 1 decode step ({args.clock} clock)")
    print(f"  fused step, whole                          {res['fused_step_ms']:7.2f} ms "
          f"({res['fused_threads']} thread{'s' if res['fused_threads'] > 1 else ''})")
    print(f"    its 30 layers in one call                {res['fused_layers_ms']:7.2f} ms")
    print("module step (the Hugging Face layers, kernel by kernel):")
    print(f"  whole step                                 {res['step_ms']:7.2f} ms")
    print(f"  floor (every linear layer -> zeros)        {res['floor_ms']:7.2f} ms, "
          f"~{res['floor_torch_ops_per_step']:.0f} torch ops from Python")
    print(f"  every kernel + lm_head, one pass           {res['all_linear_pass_ms']:7.2f} ms")
    print(f"    lm_head (dense fp32 576x49152) alone     {res['lm_head_ms']:7.2f} ms")
    print(f"    {res['kernel_calls']} sparse kernel calls, one pass     {res['kernel_modules_ms']:7.2f} ms, of which")
    print(f"      kernel work                            {res['kernel_work_ms']:7.2f} ms")
    print(f"      Numba dispatch (empty-range calls)     {res['numba_dispatch_ms']:7.2f} ms")
    print(f"      Python around the kernels              {res['kernel_python_ms']:7.2f} ms")
    print(f"  rest (step - floor - that pass)            {res['rest_ms']:7.2f} ms, of which")
    print(f"    {res['fused_parts']} fused-part slices + copies           {res['fused_glue_ms']:7.2f} ms")
    print(f"  one small torch op from Python             {res['small_torch_op_us']:7.2f} us")
    print(f"  one RMSNorm module call                    {res['python_module_call_us']:7.2f} us")
    for shape, ts in hot.items():
        print(f"  kernel {shape:>9} alone, cache-hot: {len(ts)} layers, median {statistics.median(ts):.0f} us a call")
    print(f"load average at the end {res['load_average_end']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
