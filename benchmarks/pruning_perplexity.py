"""Held-out perplexity of SmolLM2-135M after one-shot pruning: magnitude, Wanda and SparseGPT.

Every Linear except ``lm_head`` is pruned (50%, 60%, 70% unstructured and 2:4) through the
sparsec passes on the captured graph; the captured graph shares its parameters with the eager
model, which then runs the evaluation (``sparsec.data.perplexity`` on held-out windows spread
over all 20 held-out Wikipedia articles). Each configuration runs in its own process so that its
wall time and peak resident memory are its own; ``--threads`` sets torch's thread count (on a
machine shared with other work, 1 thread per process wins over 2 contending ones).

    python benchmarks/pruning_perplexity.py                       # the full table (long)
    python benchmarks/pruning_perplexity.py --runs sparsegpt:0.5 --calibration 16   # one cell

Writes one JSON line per run to ``--out`` (default ``benchmarks/results/pruning_perplexity.jsonl``)
and prints a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSITIES = ("0.5", "0.6", "0.7", "2:4")


def pipeline_for(method: str, sparsity: str) -> str:
    """The pass text that prunes every Linear but lm_head with ``method`` at ``sparsity``."""
    if ":" in sparsity:
        n, m = sparsity.split(":")
        if method == "magnitude":
            return f"prune-nm{{n={n},m={m}}}"
        return f"prune-{method}{{n={n},m={m}}}"
    return f"prune-{method}{{sparsity={float(sparsity)}}}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def cpu_seconds() -> float:
    """User + system CPU time of this process: on a machine shared with other work, wall time
    measures the neighbours too, CPU time measures the work."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(args: argparse.Namespace, method: str, sparsity: str) -> dict:
    """Prune a fresh copy of the model with one configuration and measure it (in this process)."""
    import torch

    from sparsec.capture import capture
    from sparsec.data import heldout_windows, perplexity, token_windows
    from sparsec.models import load
    from sparsec.passes import PassContext, Pipeline, run_passes
    from sparsec.passes.masks import select_layers

    warnings.simplefilter("ignore")
    if args.threads:
        # On a shared machine, one thread per process beats two contending ones by a wide margin.
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load("smollm2-135m")
    windows = heldout_windows(tok, seq_len=args.eval_seq_len, windows=args.eval_windows)
    record: dict = {"method": method, "sparsity": sparsity, "eval_windows": args.eval_windows,
                    "eval_seq_len": args.eval_seq_len, "threads": torch.get_num_threads()}
    if method != "dense":
        t0 = time.perf_counter()
        example = token_windows(tok, "train", 16, 1, seed=1)
        gm = capture(model, {"input_ids": example}).graph_module
        record["capture_s"] = time.perf_counter() - t0
        ctx = PassContext(progress=args.progress)
        if method in ("wanda", "sparsegpt"):
            count = args.calibration if method == "sparsegpt" else args.wanda_calibration
            calib = token_windows(tok, "train", args.seq_len, count, seed=0)
            # exported decoders take use_cache as an input; each sample is one call of the graph
            ctx.calibration = [((), {"input_ids": calib[i:i + 1], "use_cache": False}) for i in range(count)]
            record.update(calibration_samples=count, calibration_seq_len=args.seq_len)
        pipeline = Pipeline.parse(pipeline_for(method, sparsity))
        record["pipeline"] = pipeline.to_text()
        rss_before = peak_rss_mb()
        t0, c0 = time.perf_counter(), cpu_seconds()
        gm, _ = run_passes(gm, pipeline.passes, ctx)
        record["prune_s"] = time.perf_counter() - t0
        record["prune_cpu_s"] = cpu_seconds() - c0
        record["load_average"] = os.getloadavg()
        record["peak_rss_mb_before_prune"] = rss_before
        record["peak_rss_mb_prune"] = peak_rss_mb()
        layers = select_layers(gm)
        zeros = sum(int((gm.get_parameter(layer.weight) == 0).sum()) for layer in layers)
        total = sum(gm.get_parameter(layer.weight).numel() for layer in layers)
        record["achieved_sparsity"] = zeros / total
        # the eager model shares the pruned parameters: check it before trusting the evaluation
        first = layers[0].weight
        if not torch.equal(model.get_parameter(first), gm.get_parameter(first)):
            raise RuntimeError("the captured graph does not share the model's weights")
        del gm, ctx
    t0 = time.perf_counter()
    record["perplexity"] = perplexity(model, windows, batch_size=4, progress=args.progress)
    record["eval_s"] = time.perf_counter() - t0
    record["peak_rss_mb"] = peak_rss_mb()
    return record


def table(records: list[dict]) -> str:
    cells: dict[tuple[str, str], dict] = {(r["method"], r["sparsity"]): r for r in records}
    lines = ["| method | " + " | ".join(SPARSITIES) + " |", "|---|" + "---|" * len(SPARSITIES)]
    if ("dense", "0") in cells:
        dense = cells[("dense", "0")]["perplexity"]
        lines.append(f"| dense | {dense:.2f} |" + " |" * (len(SPARSITIES) - 1))
    for method in METHODS:
        row = []
        for s in SPARSITIES:
            r = cells.get((method, s))
            row.append(f"{r['perplexity']:,.1f}" if r else "-")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines += ["", "| run | prune wall s | peak RSS MB (through pruning) | achieved sparsity |",
              "|---|---|---|---|"]
    for r in records:
        if r["method"] != "dense":
            lines.append(f"| {r['method']} {r['sparsity']} | {r['prune_s']:.1f} | "
                         f"{r['peak_rss_mb_prune']:.0f} | {r['achieved_sparsity']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="", help="comma-separated METHOD:SPARSITY (e.g. "
                                               "sparsegpt:0.5,wanda:2:4); default: dense and every method x "
                                               "0.5,0.6,0.7,2:4")
    ap.add_argument("--calibration", type=int, default=128, help="SparseGPT calibration sequences")
    ap.add_argument("--wanda-calibration", type=int, default=128, help="Wanda calibration sequences")
    ap.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results/pruning_perplexity.jsonl")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one cell in this process
    args = ap.parse_args(argv)

    if args.one:
        method, sparsity = args.one.split(":", 1)
        print("RESULT " + json.dumps(run_one(args, method, sparsity)), flush=True)
        return 0

    if args.runs:
        runs = [tuple(r.split(":", 1)) for r in args.runs.split(",")]
    else:
        runs = [("dense", "0")] + [(m, s) for m in METHODS for s in SPARSITIES]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    forward = [a for a in (argv if argv is not None else sys.argv[1:])]
    forward = [a for i, a in enumerate(forward) if a != "--runs" and (i == 0 or forward[i - 1] != "--runs")]
    for method, sparsity in runs:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *forward, "--one", f"{method}:{sparsity}"],
                              capture_output=True, text=True, env=dict(os.environ))
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{method} {sparsity} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        record = json.loads(lines[-1][len("RESULT "):])
        record["total_s"] = time.perf_counter() - t0
        records.append(record)
        with out.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"{method:>9} {sparsity:>4}  ppl {record['perplexity']:10.2f}  "
              f"prune {record.get('prune_s', 0):6.1f}s  peak {record['peak_rss_mb']:6.0f} MB", flush=True)
    print(table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
