"""What each stage of the recovery recipe buys, on the bundled SmolLM2-135M.

    python benchmarks/recovery_recipe.py --targets 0.5,0.7,2:4
    python benchmarks/recovery_recipe.py --targets 0.7 --seed 1        # the second seed of a row

For every target (an unstructured sparsity, or an N:M pattern) it runs ``sparsec.recipe.recover``
twice on the same calibration windows:

* the uniform baseline: ``prune-sparsegpt`` without OWL and nothing after it (the "one-shot" column);
* the whole recipe: SparseGPT with OWL (unstructured targets), block-wise recovery, global
  distillation, int8 values.

and appends one JSON line per run to ``benchmarks/results/recipe/<date>-<machine>.jsonl``
(settings, every stage's held-out perplexity on Wikipedia and news windows, each stage's wall and
CPU seconds, the load average), then prints the table of every row in that file. Each stage's
seconds exclude its evaluation. ``--table`` only prints the table of an existing file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "recipe"


def default_path() -> Path:
    cpu = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip().split()[-1].lower().replace("-", "")
                break
    except OSError:
        pass
    return RESULTS / f"{datetime.date.today().isoformat()}-{os.cpu_count()}core-{cpu}.jsonl"


def run(target: str, args: argparse.Namespace, full: bool) -> dict:
    from sparsec.recipe import RecipeConfig, recover

    shape = {"pattern": target} if ":" in target else {"sparsity": float(target)}
    budget = dict(calibration=args.calibration, seq_len=args.seq_len, eval_windows=args.eval_windows,
                  eval_len=args.eval_len, seed=args.seed, progress=not args.quiet)
    if full:
        config = RecipeConfig(**shape, **budget, values="int8", blockwise_epochs=args.blockwise_epochs,
                              blockwise_lr=args.blockwise_lr, global_steps=args.global_steps,
                              global_lr=args.global_lr, kl=args.kl, squarehead=args.squarehead,
                              generated=args.generated)
    else:
        config = RecipeConfig(**shape, **budget, values="fp32", owl_lambda=0.0, blockwise_epochs=0, global_steps=0)
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    result = recover("smollm2-135m", config, None, log=lambda line: print(line, flush=True))
    return {"target": target, "kind": "recipe" if full else "uniform one-shot", "config": dataclasses.asdict(config),
            "stages": [dataclasses.asdict(s) for s in result.stages], "sparsity": result.sparsity,
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "load_start": load,
            "load_end": os.getloadavg()[0], "threads": __import__("torch").get_num_threads(),
            "machine": platform.processor() or platform.machine(), "command": " ".join(sys.argv)}


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    uniform = {(r["target"], r["config"]["seed"]): r for r in rows if r["kind"] == "uniform one-shot"}
    lines = ["| target | seed | global steps | dense | one-shot | + OWL | + block-wise | + global | + int8 | "
             "int8 / dense | news: dense | news: + int8 | recipe wall min | recipe CPU min |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] != "recipe":
            continue
        stage = {s["stage"]: s for s in r["stages"]}
        base = uniform.get((r["target"], r["config"]["seed"]))

        def ppl(name: str, key: str = "wiki_ppl", stage: dict = stage) -> str:
            return f"{stage[name][key]:.2f}" if name in stage else "-"

        final = next(s for s in r["stages"] if s["stage"].startswith("compiled"))
        owl = ppl("one-shot") if r["config"]["owl_lambda"] and ":" not in r["target"] else "-"
        oneshot = f"{base['stages'][1]['wiki_ppl']:.2f}" if base else (ppl("one-shot") if owl == "-" else "-")
        train = sum(s["wall_s"] for s in r["stages"] if s["stage"] != "dense")
        cpu = sum(s["cpu_s"] for s in r["stages"] if s["stage"] != "dense")
        lines.append(f"| {r['target']} | {r['config']['seed']} | {r['config']['global_steps']} | {ppl('dense')} | "
                     f"{oneshot} | {owl} | "
                     f"{ppl('block-wise')} | {ppl('global')} | {final['wiki_ppl']:.2f} | "
                     f"{final['wiki_ppl'] / stage['dense']['wiki_ppl']:.2f}x | {ppl('dense', 'news_ppl')} | "
                     f"{final['news_ppl']:.2f} | {train / 60:.1f} | {cpu / 60:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.5,0.7,2:4", help="comma-separated sparsities or N:M patterns")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--blockwise-epochs", type=int, default=4)
    ap.add_argument("--blockwise-lr", type=float, default=1e-3)
    ap.add_argument("--global-steps", type=int, default=80)
    ap.add_argument("--global-lr", type=float, default=3e-4)
    ap.add_argument("--kl", type=float, default=1.0)
    ap.add_argument("--squarehead", type=float, default=0.0)
    ap.add_argument("--generated", type=float, default=0.0)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--no-baseline", action="store_true", help="skip the uniform one-shot run")
    ap.add_argument("--out", type=Path, default=None, help="JSON-lines file (default: dated, by machine)")
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    out = args.out or default_path()
    if not args.table:
        out.parent.mkdir(parents=True, exist_ok=True)
        for target in [t.strip() for t in args.targets.split(",") if t.strip()]:
            for full in ([False, True] if not args.no_baseline else [True]):
                record = run(target, args, full)
                with open(out, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
    print(f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}:\n{table(out)}")


if __name__ == "__main__":
    main()
