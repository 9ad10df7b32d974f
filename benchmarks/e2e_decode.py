"""End-to-end decode throughput: eager PyTorch dense vs sparsec sparse kernels, with a KV cache.

For each model and batch size, every variant decodes the same prompt through the same loop
(:func:`sparsec.runtime.generate.generate`: one prefill, then one call per token with a
``DynamicCache``), so the rows differ only in how the linear layers compute:

* ``torch fp32`` / ``torch bf16``: the eager Hugging Face model, dense weights;
* ``sparsec S% V``: every linear layer but ``lm_head`` pruned to sparsity ``S`` by magnitude,
  packed as ``bitmask`` with ``V`` values (bf16, int8) and run by sparsec's CPU kernels, hosted in
  the eager model as :func:`sparsec.runtime.generate.build_decoder` does; ``lm_head`` stays dense
  fp32 (as ``sparsec.compile`` leaves it by default) or, with ``--lm-head int8``, also rows
  ``sparsec S% V + int8 lm_head``: ``lm_head`` dense int8 per output channel (what
  ``quantize{bits=8,ignore=*embed*}`` gives), run by the int8 kernel.

The sparse variants are built by packing each layer directly (``prune by magnitude -> pack ->
build_linear_kernel``, what ``lower-cpu`` does), not by ``sparsec.compile``: capturing and
compiling a 1B model takes far longer than the measurement. ``--compiled`` adds one row whose
model went through ``sparsec.compile`` and an artifact round trip, and times that compile
against loading the artifact in a fresh process.

On a machine shared with other work, torch's multi-threaded operators can stall: every parallel
region waits for all its threads, and a thread that is not scheduled holds up the whole step
(measured here: ``scaled_dot_product_attention`` of one decode token took 14 ms with two torch
threads on a loaded 2-core machine, 0.08 ms with one). ``--torch-threads 1`` avoids it; the
sparsec kernels run on their own pool either way.

Rows are measured in rounds (each round times every variant once) and the median per variant is
reported, so a burst of load from other processes on a shared machine hits all variants alike;
compare ratios within one run. Timings: wall clock, decode only (the first token, from the
prefill, is excluded).

    python benchmarks/e2e_decode.py --quick                      # SmolLM2, batch 1, few tokens
    python benchmarks/e2e_decode.py                              # SmolLM2 + 1B, batch 1 and 8
    python benchmarks/e2e_decode.py --models smollm2-135m --compiled
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep instead of spinning

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparsec.codegen.cpu import build_linear_kernel  # noqa: E402
from sparsec.formats import pack  # noqa: E402
from sparsec.runtime.compiled import KernelLinear  # noqa: E402
from sparsec.runtime.generate import FusedPart, generate, host_kernels  # noqa: E402

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                tie_word_embeddings=False)  # the TinyLlama-1.1B shape


def load_model(name: str) -> nn.Module:
    if name == "smollm2-135m":
        from sparsec.models import load

        return load("smollm2-135m")[0]
    if name == "llama-1b":
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.initialization import no_init_weights

        with no_init_weights():
            model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name_, p in model.named_parameters():
                if name_.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
        return model.eval()
    raise SystemExit(f"unknown model {name!r}; use smollm2-135m or llama-1b")


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep exactly ``round((1 - sparsity) * numel)`` largest |w| (ties broken by index)."""
    keep = w.numel() - round(sparsity * w.numel())
    flat = torch.zeros(w.numel(), dtype=torch.bool)
    flat[w.abs().flatten().topk(keep, sorted=False).indices] = True
    return flat.view_as(w)


class SparseSwap:
    """The model's linear layers replaced by sparsec kernels while in use, restored afterwards (the
    dense weights are never modified, so the same model serves every variant). The kernels are
    hosted as :func:`sparsec.runtime.generate.host_kernels` hosts a compiled model's: q/k/v and
    gate/up run as one kernel each."""

    def __init__(self, model: nn.Module, sparsity: float, value_type: str, lm_head: str = "fp32") -> None:
        """``lm_head``: ``fp32`` leaves it as it is; ``int8`` packs it dense int8 (per output channel,
        not pruned) for the int8 kernel. ``nbytes`` counts the other layers, ``head_nbytes`` lm_head."""
        self.model = model
        kernels = []
        self.nbytes = 0
        for name, lin in linear_layers(model):
            w = lin.weight.detach()
            packed = pack(w * magnitude_mask(w, sparsity), "bitmask", value_type)
            bias = None if lin.bias is None else lin.bias.detach()
            kernels.append(KernelLinear(name, packed, build_linear_kernel(packed, bias=bias), bias, None, "cpu"))
            self.nbytes += packed.nbytes()
        head = model.get_output_embeddings()
        self.head_nbytes = head.weight.numel() * 4
        if lm_head == "int8":
            packed = pack(head.weight.detach(), "dense", "int8")
            bias = None if head.bias is None else head.bias.detach()
            kernels.append(KernelLinear("lm_head", packed, build_linear_kernel(packed, bias=bias), bias, None, "cpu"))
            self.head_nbytes = packed.nbytes()
        elif lm_head != "fp32":
            raise SystemExit(f"--lm-head: unknown {lm_head!r}; use fp32 or int8")
        swapped = host_kernels(model, kernels, fuse=True)
        self.installed = [(parent, attr, getattr(parent, attr)) for parent, attr, _ in swapped]
        self.originals = swapped
        self.__exit__()

    def __enter__(self) -> nn.Module:
        for parent, attr, module in self.installed:
            setattr(parent, attr, module)
        return self.model

    def __exit__(self, *exc) -> None:
        for parent, attr, original in self.originals:
            setattr(parent, attr, original)
        for _, _, module in self.installed:
            kernel = module.group.fused if isinstance(module, FusedPart) else module
            # a long prefill may have run a half-dense layer through torch on a cached unpacked
            # copy of its weight (4 GB for the 1B model): drop it between measurements
            kernel.kernel._dense = None


class NoLinearWork:
    """Every linear layer (lm_head too) returns zeros: what is left is the loop, the Hugging Face
    modules, attention and norms: the floor under any kernel's decode time."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]

    def __enter__(self) -> nn.Module:
        for name, lin in self.layers:
            parent_name, _, attr = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, attr, _Zeros(lin))
        return self.model

    def __exit__(self, *exc) -> None:
        for name, lin in self.layers:
            parent_name, _, attr = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, attr, lin)


class _Zeros(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.out_features = lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


CLOCK = "wall"


def decode_rate(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """Decode tokens/s (batch rows x decode steps / decode seconds) of one generation, by the wall
    clock or (``--clock cpu``) by the CPU time of this process."""
    r = generate(model, None, ids, new_tokens, stop_at_eos=False)
    seconds = r.decode_cpu_seconds if CLOCK == "cpu" else r.decode_seconds
    return r.batch * (r.steps - 1) / seconds


def compiled_variant(model: nn.Module, ids: torch.Tensor, pipeline: str) -> tuple[nn.Module, dict]:
    """``sparsec.compile`` -> save -> load in a fresh process (timed) -> load here."""
    import sparsec

    t0 = time.perf_counter()
    compiled = sparsec.compile(model, {"input_ids": ids[:1]}, pipeline)
    compile_s = time.perf_counter() - t0
    folder = tempfile.mkdtemp(prefix="sparsec_e2e_")
    path = os.path.join(folder, "artifact")
    t0 = time.perf_counter()
    sparsec.save(compiled, path)
    save_s = time.perf_counter() - t0
    probe = ("import time, sys; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
             "import sparsec; c = sparsec.load(sys.argv[1]); t2 = time.perf_counter(); "
             "print(t1 - t0, t2 - t1, c.load_seconds, c.kernel_load.link_seconds, c.kernel_load.installed)")
    out = subprocess.run([sys.executable, "-c", probe, path], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..")})
    if out.returncode != 0:
        raise SystemExit(f"loading the artifact failed: {out.stderr.strip().splitlines()[-1]}")
    torch_s, load_s, inside_s, link_s, installed = (float(x) for x in out.stdout.split())
    loaded = sparsec.load(path)  # holds everything in memory: the files can go
    shutil.rmtree(folder, ignore_errors=True)
    info = dict(compile_seconds=compile_s, save_seconds=save_s, import_torch_seconds=torch_s,
                load_seconds=load_s, load_inside_seconds=inside_s, link_seconds=link_s,
                kernels_linked=int(installed))
    return loaded, info


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.models:
        print(f"\n== {name}", flush=True)
        model = load_model(name)
        dense_bytes = sum(m.weight.numel() * 4 for _, m in linear_layers(model))
        variants: list[tuple[str, object, int]] = [("torch fp32", model, dense_bytes)]
        if args.floor:
            variants.append(("no linear work (floor)", NoLinearWork(model), 0))
        if "bf16" in args.dense:
            variants.append(("torch bf16", copy.deepcopy(model).to(torch.bfloat16), dense_bytes // 2))
        swaps = {}
        for s in args.sparsity:
            for vt in args.values:
                for head in args.lm_head:
                    label = f"sparsec {s:.0%} {vt}" + ("" if head == "fp32" else f" + {head} lm_head")
                    t0 = time.perf_counter()
                    swap = SparseSwap(model, s, vt, head)
                    print(f"packed {name} at {s:.0%} {vt}, lm_head {head}, in {time.perf_counter() - t0:.0f}s "
                          f"({swap.nbytes / 1e6:.0f} MB vs {dense_bytes / 1e6:.0f} MB dense fp32; "
                          f"lm_head {swap.head_nbytes / 1e6:.0f} MB)", flush=True)
                    swaps[label] = swap
                    variants.append((label, swap, swap.nbytes))
        gen = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        compiled_info = None
        if args.compiled and name == "smollm2-135m":
            ids1 = torch.randint(0, vocab, (1, args.prompt_tokens), generator=gen)
            pipeline = "prune-magnitude{sparsity=0.5},lower-cpu{value_type=bf16}"
            loaded, compiled_info = compiled_variant(model, ids1, pipeline)
            print("compiled:", json.dumps(compiled_info), flush=True)
            variants.append(("sparsec 50% bf16 (compiled, loaded)", loaded,
                             sum(k.packed.nbytes() for k in loaded.kernels() if k.layer != "lm_head")))
        for batch in args.batches:
            ids = torch.randint(0, vocab, (batch, args.prompt_tokens), generator=gen)
            times: dict[str, list[float]] = {v[0]: [] for v in variants}
            for _label, v, _ in variants:  # warm-up (first calls allocate the cache and scratch)
                with (v if isinstance(v, (SparseSwap, NoLinearWork)) else _Same(v)) as m:
                    decode_rate(m, ids, 4)
            for _ in range(args.rounds):
                for label, v, _ in variants:
                    with (v if isinstance(v, (SparseSwap, NoLinearWork)) else _Same(v)) as m:
                        times[label].append(decode_rate(m, ids, args.new_tokens))
            base = statistics.median(times["torch fp32"])
            for label, _, nbytes in variants:
                rate = statistics.median(times[label])
                row = dict(model=name, batch=batch, variant=label, linear_mb=nbytes / 1e6,
                           tokens_per_second=rate, ms_per_step=1e3 * batch / rate, vs_fp32=rate / base,
                           spread=(min(times[label]), max(times[label])))
                rows.append(row)
                print(f"{name:<13} B={batch:<2} {label:<36} {nbytes / 1e6:8.0f} MB  {rate:8.1f} tok/s  "
                      f"{1e3 * batch / rate:8.1f} ms/step  {rate / base:5.2f}x", flush=True)
        if compiled_info is not None:
            rows.append(dict(model=name, compiled=compiled_info))
        del variants, swaps, model
        gc.collect()
    return rows


class _Same:
    def __init__(self, m):
        self.m = m

    def __enter__(self):
        return self.m

    def __exit__(self, *exc):
        return None


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | variant | linear weights (MB) | decode tokens/s | ms per step | vs torch fp32 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "variant" not in r:
            continue
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['linear_mb']:.0f} | "
                     f"{r['tokens_per_second']:.1f} | {r['ms_per_step']:.1f} | {r['vs_fp32']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2-135m,llama-1b", type=lambda s: s.split(","))
    p.add_argument("--batches", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--sparsity", default="0.5,0.7", type=lambda s: [float(x) for x in s.split(",") if x],
                   help="sparsities of the sparsec rows ('' for none)")
    p.add_argument("--values", default="bf16,int8", type=lambda s: s.split(","))
    p.add_argument("--dense", default="fp32,bf16", type=lambda s: s.split(","))
    p.add_argument("--lm-head", default="fp32", type=lambda s: s.split(","),
                   help="lm_head of the sparsec rows: fp32 (dense, as is), int8 (dense int8 per output "
                        "channel, run by the int8 kernel), or both: fp32,int8")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the row whose linear layers do no work (the overhead floor)")
    p.add_argument("--compiled", action="store_true",
                   help="add a SmolLM2 row compiled by sparsec.compile, saved and loaded (times both)")
    p.add_argument("--quick", action="store_true", help="SmolLM2, batch 1, 50%% only, 16 tokens, 2 rounds")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads (attention, norms, dense layers); sparsec kernels use their "
                        "own pool (SPARSEC_NUM_THREADS). Default: torch's choice")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: CPU time of this process (all its threads), which "
                        "leaves out time spent waiting for cores other processes hold")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    global CLOCK
    CLOCK = args.clock
    if args.quick:
        args.models, args.batches, args.sparsity, args.new_tokens, args.rounds = (
            ["smollm2-135m"], [1], [0.5], 16, 2)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, {args.clock} clock, load average {os.getloadavg()[0]:.1f}",
          flush=True)
    rows = run(args)
    print()
    print(table(rows))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
