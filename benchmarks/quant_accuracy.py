"""Held-out perplexity of SmolLM2-135M under weight quantization, alone and fused with sparsity.

    python benchmarks/quant_accuracy.py --threads 1 --calibration 32 --windows 16

Runs the pass pipelines on the captured graph and evaluates the graph eagerly (PyTorch ops on the
dequantized weights), so the numbers measure the formats' accuracy, not the kernels'. Rows:
dense; int8 RTN (per output channel); int4 g128 RTN and GPTQ; 50% SparseGPT; 50% SparseGPT then
int8. Calibration windows come from the train split, evaluation windows from the held-out split
(docs/data.md); GPTQ and SparseGPT share the same calibration windows. ``--extra LABEL=PIPELINE``
adds rows quantizing the dense model with other pass text (e.g. another ``percdamp``), and
``--only-extra`` runs only those and the dense baseline.

Prints a markdown table with the ratio to the relevant baseline (dense for the quantized and the
pruned rows, 50% SparseGPT for the sparse + int8 row) and appends one JSON line per row, plus a
``summary`` line with the wall and CPU time of the whole run, to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import time
from pathlib import Path

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


def cpu_seconds() -> float:
    """User + system CPU time of this process (on a shared machine wall time measures the neighbours too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibration", type=int, default=32, help="calibration windows of 512 tokens")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows of 512 tokens")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=PIPELINE",
                    help="another row: quantize the dense model with this pass text (repeatable)")
    ap.add_argument("--skip-sparse", action="store_true", help="leave out the two SparseGPT rows")
    ap.add_argument("--only-extra", action="store_true",
                    help="only dense and the --extra rows (the others are deterministic: rerun them apart)")
    ap.add_argument("--out", default="benchmarks/results/quant_accuracy.jsonl")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start, c_start = time.perf_counter(), cpu_seconds()
    model, tok = load("smollm2-135m")
    evals = heldout_windows(tok, 512, args.windows)
    calib_ids = token_windows(tok, "train", 512, args.calibration, seed=0)
    example = {"input_ids": evals[:1, :16]}
    base = capture(model, example)
    calibration = [((), {"input_ids": w[None], **base.constant_kwargs}) for w in calib_ids]
    loads: list[float] = []

    def run(gm, text):
        ctx = PassContext(calibration=calibration)
        t0, c0 = time.perf_counter(), cpu_seconds()
        gm, _ = run_passes(gm, list(Pipeline.parse(text).passes), ctx)
        loads.append(os.getloadavg()[0])
        return gm, time.perf_counter() - t0, cpu_seconds() - c0

    def ppl(gm):
        t0, c0 = time.perf_counter(), cpu_seconds()
        p = perplexity(_Graph(base, gm), evals)
        loads.append(os.getloadavg()[0])
        return p, time.perf_counter() - t0, cpu_seconds() - c0

    rows = []  # label, pipeline, perplexity, baseline label, pass s, pass cpu s, eval s, eval cpu s

    def add(label, text, gm, ref, secs=0.0, cpu=0.0):
        p, es, ec = ppl(gm)
        rows.append({"label": label, "pipeline": text, "perplexity": p, "baseline": ref,
                     "pass_s": secs, "pass_cpu_s": cpu, "eval_s": es, "eval_cpu_s": ec})
        print(f"{label}: {p:.3f} (pass {secs:.0f} s, eval {es:.0f} s)", flush=True)
        return p

    add("dense fp32", "-", base.graph_module, None)
    quantized = [("int8 RTN", "quantize{bits=8}"),
                 ("int4 g128 RTN", "quantize{bits=4,group=128}"),
                 ("int4 g128 GPTQ", "quantize{bits=4,group=128,method=gptq}")]
    if args.only_extra:
        quantized = []
    quantized += [tuple(e.split("=", 1)) for e in args.extra]
    for label, text in quantized:
        gm, secs, cpu = run(copy.deepcopy(base.graph_module), text)
        add(label, text, gm, "dense fp32", secs, cpu)
        del gm
    if not (args.skip_sparse or args.only_extra):
        sparse, secs, cpu = run(copy.deepcopy(base.graph_module), "prune-sparsegpt{sparsity=0.5}")
        add("50% SparseGPT", "prune-sparsegpt{sparsity=0.5}", sparse, "dense fp32", secs, cpu)
        gm, secs, cpu = run(copy.deepcopy(sparse), "quantize{bits=8}")
        add("50% SparseGPT + int8 RTN", "prune-sparsegpt{sparsity=0.5},quantize{bits=8}", gm,
            "50% SparseGPT", secs, cpu)

    by_label = {r["label"]: r["perplexity"] for r in rows}
    for r in rows:
        r["vs_baseline"] = None if r["baseline"] is None else r["perplexity"] / by_label[r["baseline"]] - 1
    summary = {"summary": True, "model": "smollm2-135m", "windows": args.windows, "seq_len": 512,
               "calibration": args.calibration, "threads": torch.get_num_threads(),
               "wall_s": time.perf_counter() - t_start, "cpu_s": cpu_seconds() - c_start,
               "peak_rss_mb": peak_rss_mb(), "load_average_min": min(loads), "load_average_max": max(loads),
               "machine": f"{cpu_model()}, {os.cpu_count()} CPUs ({platform.machine()})",
               "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        for r in rows:
            fh.write(json.dumps({**r, "windows": args.windows, "calibration": args.calibration}) + "\n")
        fh.write(json.dumps(summary) + "\n")

    print(f"\nSmolLM2-135M, held-out perplexity on {args.windows} x 512 tokens; calibration "
          f"{args.calibration} x 512 train tokens; threads {torch.get_num_threads()}\n")
    print("| model | pipeline | perplexity | vs baseline | baseline | pass s (CPU s) | eval s |")
    print("|---|---|---:|---:|---|---:|---:|")
    for r in rows:
        rel = "-" if r["baseline"] is None else f"{100 * r['vs_baseline']:+.2f}%"
        print(f"| {r['label']} | `{r['pipeline']}` | {r['perplexity']:.3f} | {rel} | {r['baseline'] or '-'} | "
              f"{r['pass_s']:.0f} ({r['pass_cpu_s']:.0f}) | {r['eval_s']:.0f} |")
    print(f"\nwall {summary['wall_s']:.0f} s, CPU {summary['cpu_s']:.0f} s, peak RSS {summary['peak_rss_mb']:.0f} MB, "
          f"load average {summary['load_average_min']:.1f}-{summary['load_average_max']:.1f}")


if __name__ == "__main__":
    main()
