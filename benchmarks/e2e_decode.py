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

With ``--llamacpp-python PY`` (a Python that has ``llama-cpp-python`` installed, kept out of
sparsec's environment), SmolLM2's batch-1 table gets rows for llama.cpp decoding the bundled
GGUF (Q4_1, dense, the weights every other row starts from): ``benchmarks/llamacpp_worker.py``
runs in that Python, loads the model once and is asked for one generation per round, with the
same prompt ids and number of new tokens as the other rows, greedy, decode steps only timed, by
the same clock (the CPU time of the worker process with ``--clock cpu``). Its thread counts come
from ``--llamacpp-threads``. Without the option these rows are skipped with a note.

At batch 1 :func:`generate` runs each decode step of these Llama-family models as one compiled
call over all layers (``sparsec/runtime/decode_step.py``) unless told otherwise; ``--steps``
picks the fused step, the Hugging Face modules, or both (a row each, same packed layers).

Rows are measured in rounds (each round times every variant once) and the median per variant is
reported, so a burst of load from other processes on a shared machine hits all variants alike;
compare ratios within one run. Timings: wall clock, decode only (the first token, from the
prefill, is excluded).

    python benchmarks/e2e_decode.py --quick                      # SmolLM2, batch 1, few tokens
    python benchmarks/e2e_decode.py                              # SmolLM2 + 1B, batch 1 and 8
    python benchmarks/e2e_decode.py --models smollm2-135m --compiled
    python benchmarks/e2e_decode.py --models smollm2-135m --batches 1 --torch-threads 1 --clock cpu \
        --llamacpp-python ~/.cache/sparsec/llamacpp-venv/bin/python --llamacpp-threads 2,1
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

    def __init__(self, model: nn.Module, sparsity: float, value_type: str, lm_head: str = "fp32",
                 same_layers: SparseSwap | None = None) -> None:
        """``lm_head``: ``fp32`` leaves it as it is; ``int8`` packs it dense int8 (per output channel,
        not pruned) for the int8 kernel. ``nbytes`` counts the other layers, ``head_nbytes`` lm_head.
        ``same_layers``: a swap of the same sparsity and value type whose packed layers (but
        lm_head) to reuse instead of packing them again (minutes for the 1B model)."""
        self.model = model
        if same_layers is not None:
            self.layers, self.nbytes = same_layers.layers, same_layers.nbytes
        else:
            self.layers, self.nbytes = [], 0
            for name, lin in linear_layers(model):
                w = lin.weight.detach()
                packed = pack(w * magnitude_mask(w, sparsity), "bitmask", value_type)
                bias = None if lin.bias is None else lin.bias.detach()
                self.layers.append(KernelLinear(name, packed, build_linear_kernel(packed, bias=bias), bias, None,
                                                "cpu"))
                self.nbytes += packed.nbytes()
        kernels = list(self.layers)
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


def decode_rate(model, ids: torch.Tensor, new_tokens: int, step: str = "auto") -> tuple[float, float, list[int]]:
    """Decode tokens/s (batch rows x decode steps / decode seconds) of one generation, by the wall
    clock and by the CPU time of the process that decoded (this one, or llama.cpp's worker), and
    the greedy tokens of the first row. ``step``: how :func:`generate` runs the decode steps."""
    if isinstance(model, LlamaCpp):
        r = model.decode(ids, new_tokens)
        return r["tokens_per_second"], r["cpu_tokens_per_second"], r["tokens"]
    r = generate(model, None, ids, new_tokens, stop_at_eos=False, step=step)
    if step == "fused" and r.step != "fused":
        raise SystemExit(f"the fused decode step did not run: {r.step_reason}")
    steps = r.batch * (r.steps - 1)
    return steps / r.decode_seconds, steps / r.decode_cpu_seconds, r.tokens[0].tolist()


class LlamaCpp:
    """``benchmarks/llamacpp_worker.py --serve`` in another Python: llama.cpp decoding a GGUF file,
    one generation per :meth:`decode`, timed inside the worker exactly as :func:`generate` times
    sparsec (decode steps only, greedy, wall and process CPU time)."""

    def __init__(self, python: str, model: str, threads: int, prefill: str) -> None:
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llamacpp_worker.py")
        self.log = tempfile.NamedTemporaryFile("w+", prefix="llamacpp_", suffix=".log", delete=False)
        cmd = [os.path.expanduser(python), worker, "--serve", "--model", model, "--threads", str(threads),
               "--prefill", prefill]
        # OMP_WAIT_POLICY is set for torch in this process: llama.cpp gets its own default
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1, env=env)
        self.info = self._read()
        self.threads = threads

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = "\n".join(self.log.read().strip().splitlines()[-15:])
            raise SystemExit(f"llama.cpp worker exited ({self.proc.returncode}); its log ({self.log.name}) "
                             f"ends with:\n{tail}")
        return json.loads(line)

    def decode(self, ids: torch.Tensor, new_tokens: int) -> dict:
        if ids.shape[0] != 1:
            raise ValueError("the llama.cpp rows are batch 1")
        self.proc.stdin.write(json.dumps({"ids": ids[0].tolist(), "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        self.log.close()
        os.unlink(self.log.name)


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
        steps_of: dict[str, str] = {}  # label -> how generate runs its decode steps
        for s in args.sparsity:
            for vt in args.values:
                first = None
                for head in args.lm_head:
                    label = f"sparsec {s:.0%} {vt}" + ("" if head == "fp32" else f" + {head} lm_head")
                    t0 = time.perf_counter()
                    swap = first = SparseSwap(model, s, vt, head, same_layers=first)
                    print(f"packed {name} at {s:.0%} {vt}, lm_head {head}, in {time.perf_counter() - t0:.0f}s "
                          f"({swap.nbytes / 1e6:.0f} MB vs {dense_bytes / 1e6:.0f} MB dense fp32; "
                          f"lm_head {swap.head_nbytes / 1e6:.0f} MB)", flush=True)
                    swaps[label] = swap
                    for step in args.steps:
                        suffix = "" if len(args.steps) == 1 else f" ({step} step)"
                        variants.append((label + suffix, swap, swap.nbytes))
                        steps_of[label + suffix] = step
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
        llama = []
        if args.llamacpp_python and name == "smollm2-135m" and 1 in args.batches:
            from sparsec.models import bundled_gguf

            gguf = args.llamacpp_model or str(bundled_gguf(name))
            for threads in args.llamacpp_threads:
                w = LlamaCpp(args.llamacpp_python, gguf, threads, args.llamacpp_prefill)
                if w.info["n_vocab"] != vocab:
                    raise SystemExit(f"{gguf} has {w.info['n_vocab']} tokens, {name} {vocab}: not the same model")
                print(f"llama.cpp: llama-cpp-python {w.info['llama_cpp_python']}, threads {threads}, "
                      f"{w.info['system_info']}", flush=True)
                label = f"llama.cpp Q4_1 dense, {threads} thread" + ("s" if threads > 1 else "")
                llama.append((label, w, os.path.getsize(gguf)))
        elif name == "smollm2-135m":
            print("llama.cpp: not measured (give --llamacpp-python PY, a Python with llama-cpp-python "
                  "installed, and include batch 1; see benchmarks/llamacpp_worker.py)", flush=True)
        for batch in args.batches:
            ids = torch.randint(0, vocab, (batch, args.prompt_tokens), generator=gen)
            batch_variants = variants + (llama if batch == 1 else [])
            wall: dict[str, list[float]] = {v[0]: [] for v in batch_variants}
            cpu: dict[str, list[float]] = {v[0]: [] for v in batch_variants}
            for _label, v, _ in batch_variants:  # warm-up (first calls allocate the cache and scratch)
                with (v if isinstance(v, (SparseSwap, NoLinearWork)) else _Same(v)) as m:
                    decode_rate(m, ids, 4, steps_of.get(_label, "auto") if batch == 1 else "auto")
            loads = [os.getloadavg()[0]]
            tokens: dict[str, list[int]] = {}
            for _ in range(args.rounds):
                for label, v, _ in batch_variants:
                    with (v if isinstance(v, (SparseSwap, NoLinearWork)) else _Same(v)) as m:
                        step = steps_of.get(label, "auto") if batch == 1 else "auto"
                        w_rate, c_rate, tokens[label] = decode_rate(m, ids, args.new_tokens, step)
                    wall[label].append(w_rate)
                    cpu[label].append(c_rate)
                loads.append(os.getloadavg()[0])
            times = cpu if CLOCK == "cpu" else wall
            base = statistics.median(times["torch fp32"])
            for label, _, nbytes in batch_variants:
                rate = statistics.median(times[label])
                row = dict(model=name, batch=batch, variant=label, linear_mb=nbytes / 1e6,
                           tokens_per_second=rate, ms_per_step=1e3 * batch / rate, vs_fp32=rate / base,
                           spread=(min(times[label]), max(times[label])),
                           wall_tokens_per_second=statistics.median(wall[label]),
                           cpu_tokens_per_second=statistics.median(cpu[label]),
                           load_average=(min(loads), max(loads)),
                           same_tokens_as_fp32=_common_prefix(tokens[label], tokens["torch fp32"]))
                rows.append(row)
                print(f"{name:<13} B={batch:<2} {label:<36} {nbytes / 1e6:8.0f} MB  {rate:8.1f} tok/s  "
                      f"{1e3 * batch / rate:8.1f} ms/step  {rate / base:5.2f}x", flush=True)
        if compiled_info is not None:
            rows.append(dict(model=name, compiled=compiled_info))
        for _, w, _ in llama:
            w.close()
        del variants, swaps, model
        gc.collect()
    return rows


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many greedy tokens two generations share before they first differ."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


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


def llamacpp_table(rows: list[dict]) -> str:
    """Batch-1 SmolLM2 rows against the fastest llama.cpp row (by the run's clock), both clocks."""
    rows = [r for r in rows if r.get("batch") == 1 and r.get("model") == "smollm2-135m"]
    llama = [r for r in rows if r["variant"].startswith("llama.cpp")]
    if not llama:
        return ""
    ref = max(llama, key=lambda r: r["tokens_per_second"])
    lines = [f"| variant | weights (MB) | decode tokens/s, {CLOCK} clock | ms per step | vs {ref['variant']} "
             f"| tokens/s, wall | tokens/s, CPU time | greedy tokens as torch fp32 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['linear_mb']:.0f} | {r['tokens_per_second']:.1f} | "
                     f"{r['ms_per_step']:.1f} | {r['tokens_per_second'] / ref['tokens_per_second']:.2f}x | "
                     f"{r['wall_tokens_per_second']:.1f} | {r['cpu_tokens_per_second']:.1f} | "
                     f"first {r['same_tokens_as_fp32']} |")
    lo, hi = min(r["load_average"][0] for r in rows), max(r["load_average"][1] for r in rows)
    lines.append(f"\n(load average {lo:.1f}-{hi:.1f} during these rounds; llama.cpp's weights: the whole GGUF, "
                 "embeddings and output included; the others: linear layers but lm_head; last column: how many of "
                 "the greedy tokens equal torch fp32's before the first difference)")
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
    p.add_argument("--steps", default="auto", type=lambda s: s.split(","),
                   help="how the sparsec rows run their batch-1 decode steps: auto, fused (one compiled "
                        "call a token), modules (the Hugging Face layers); several give a row each")
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
    p.add_argument("--llamacpp-python", metavar="PY",
                   help="a Python with llama-cpp-python installed: adds llama.cpp rows to SmolLM2 batch 1")
    p.add_argument("--llamacpp-model", metavar="GGUF", help="GGUF for those rows (default: the bundled SmolLM2)")
    p.add_argument("--llamacpp-threads", default="2", type=lambda s: [int(x) for x in s.split(",")],
                   help="llama.cpp thread counts, one row each (default 2)")
    p.add_argument("--llamacpp-prefill", choices=("token", "batch"), default="token",
                   help="how the worker evaluates the prompt (not timed): one token at a time (default; "
                        "0.3.36 was reported to crash on multi-token batches on this CPU) or one batch")
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
    side = llamacpp_table(rows)
    if side:
        print("\nagainst llama.cpp (SmolLM2-135M, batch 1):\n")
        print(side)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
