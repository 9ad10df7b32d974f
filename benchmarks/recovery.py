"""Accuracy recovery after pruning: CE vs CE + KL vs CE + SquareHead fine-tuning (SmolLM2-135M).

The experiment of Kurtic et al. (2023), scaled to what a CPU finishes in about an hour:

1. teacher: the bundled SmolLM2-135M, fine-tuned densely (CE) for ``--teacher-steps`` steps on
   the train split of the bundled Wikipedia text;
2. students: the teacher pruned one-shot with SparseGPT (every Linear but ``lm_head``) to each
   of ``--sparsities``, calibrated on ``--calibration`` train windows;
3. each student fine-tuned with fixed masks for the same ``--steps`` under (a) CE only,
   (b) CE + KL(teacher || student) and (c) CE + SquareHead (the authors' a=1, c=1), same data
   order, learning rate and schedule;
4. held-out perplexity (``sparsec.data.heldout_windows``, spread over all 20 held-out articles)
   of the dense teacher, every one-shot student and every fine-tuned student.

    python benchmarks/recovery.py                          # the whole table, ~1 h on 2 cores
    python benchmarks/recovery.py --steps 4 --teacher-steps 2 --sparsities 0.5 --eval-windows 4
    python benchmarks/recovery.py --train-windows 64 --steps 160   # 5 epochs over 8,192 tokens

Results go to ``--out`` (default ``benchmarks/results/recovery``): ``results.jsonl`` (one line per
measurement, appended as it completes, so an interrupted run keeps what it finished and a rerun
with the same settings skips it) and ``table.md``. The tuned teacher and the pruned students are
cached under ``$SPARSEC_CACHE/recovery/<hash of the settings they depend on>``, so a rerun (or a
run with another fine-tuning budget) does not redo them.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

LOSSES = {
    "ce": {"ce": 1.0, "kl": 0.0, "squarehead": 0.0},
    "ce+kl": {"ce": 1.0, "kl": 1.0, "squarehead": 0.0},
    "ce+squarehead": {"ce": 1.0, "kl": 0.0, "squarehead": 1.0},
    # each token normalized by its own teacher energy (see sparsec/finetune/losses.py)
    "ce+squarehead-token": {"ce": 1.0, "kl": 0.0, "squarehead": 1.0, "squarehead_normalize": "token"},
    # both distillation terms: does matching hidden states add anything on top of the logits?
    "ce+kl+squarehead": {"ce": 1.0, "kl": 1.0, "squarehead": 1.0},
}
#: losses run unless --losses says otherwise (the paper's three)
DEFAULT_LOSSES = ("ce", "ce+kl", "ce+squarehead")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", default="0.5,0.7,0.8", help="comma-separated (default: %(default)s)")
    p.add_argument("--pruner", default="sparsegpt", choices=("sparsegpt", "magnitude"),
                   help="one-shot pruning pass (default: %(default)s)")
    p.add_argument("--losses", default=",".join(DEFAULT_LOSSES),
                   help="comma-separated subset of " + ", ".join(LOSSES))
    p.add_argument("--seq-len", type=int, default=128,
                   help="training and evaluation window (default: %(default)s)")
    p.add_argument("--batch", type=int, default=2, help="sequences per optimizer step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=40,
                   help="fine-tuning steps per student (default: %(default)s)")
    p.add_argument("--teacher-steps", type=int, default=20, help="dense teacher steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--teacher-lr", type=float, default=3e-5,
                   help="teacher learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=0.1,
                   help="warmup fraction of the steps (default: %(default)s)")
    p.add_argument("--calibration", type=int, default=16,
                   help="SparseGPT calibration windows (default: %(default)s)")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows (default: %(default)s)")
    p.add_argument("--train-windows", type=int, default=None, metavar="N",
                   help="fine-tune the students on only the first N train windows of --seq-len tokens, "
                        "cycled for as many epochs as --steps x --batch needs (default: every window; "
                        "the teacher always uses every window)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for training (evaluation is fp32)")
    # On a CPU shared with other work, one thread per process ran a training step 3-5x faster than
    # two contending threads (measured here: 10 s vs 35-50 s for 2 x 128 tokens with a teacher).
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: %(default)s; 0: torch's default)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where training and evaluation run; pruning runs on the CPU (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/recovery",
                   help="results directory (default: %(default)s)")
    return p.parse_args(argv)


def settings_key(args: argparse.Namespace, only: tuple[str, ...] | None = None) -> str:
    """Hash of the settings that change a number (``only`` those named), so cached models and rows
    are never mixed up."""
    skip = ("out", "threads", "sparsities", "losses")
    keep = {k: v for k, v in vars(args).items() if k not in skip and (only is None or k in only)}
    if keep.get("device") == "cpu":  # runs from before the option existed were all on the CPU
        del keep["device"]
    if keep.get("train_windows") is None:  # every window, as before the option existed
        keep.pop("train_windows", None)
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


#: what the tuned teacher depends on; the pruned students add the pruner and its calibration
#: (neither depends on --train-windows, which limits only the students' fine-tuning data)
TEACHER_SETTINGS = ("seq_len", "batch", "teacher_steps", "teacher_lr", "warmup", "bf16", "seed")
PRUNED_SETTINGS = TEACHER_SETTINGS + ("pruner", "calibration")


def hardware() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu": gpu, "loadavg_start": os.getloadavg()[0]}


class Results:
    """``results.jsonl`` rows for this settings key; appending writes through at once."""

    def __init__(self, out: Path, key: str) -> None:
        self.path = out / "results.jsonl"
        self.key = key
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                if row.get("settings") == key:
                    self.rows[row["name"]] = row

    def has(self, name: str) -> bool:
        return name in self.rows

    def add(self, name: str, **row) -> dict:
        row = {"name": name, "settings": self.key, **row, "loadavg": round(os.getloadavg()[0], 1)}
        self.rows[name] = row
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        shown = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("name", "settings"))
        print(f"[recovery] {name}: {shown}", flush=True)
        return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from sparsec.capture import capture
    from sparsec.data import heldout_windows, perplexity, token_windows
    from sparsec.finetune import FinetuneConfig, finetune
    from sparsec.finetune.model import DistillModel
    from sparsec.ir.device import move_module
    from sparsec.models import cache_dir, load
    from sparsec.passes import PassContext, make_pass, run_passes

    if args.threads:
        torch.set_num_threads(args.threads)
    sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    unknown = [x for x in losses if x not in LOSSES]
    if unknown:
        print(f"recovery: unknown loss {unknown}; choose from {', '.join(LOSSES)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key = settings_key(args)
    # The teacher and the pruned students are cached by what they depend on, so a run with more
    # fine-tuning steps reuses them.
    teacher_cache = cache_dir() / "recovery" / settings_key(args, TEACHER_SETTINGS)
    pruned_cache = cache_dir() / "recovery" / settings_key(args, PRUNED_SETTINGS)
    for folder in (teacher_cache, pruned_cache):
        folder.mkdir(parents=True, exist_ok=True)
    results = Results(out, key)
    hw = hardware()
    print(f"[recovery] settings {key}: {json.dumps(vars(args))}", flush=True)
    print(f"[recovery] hardware {json.dumps(hw)}", flush=True)
    t_all = time.perf_counter()

    model, tok = load("smollm2-135m")
    train = token_windows(tok, "train", seq_len=args.seq_len)  # every non-overlapping train window
    calib = token_windows(tok, "train", seq_len=args.seq_len, count=args.calibration, seed=args.seed + 1)
    heldout = heldout_windows(tok, seq_len=args.seq_len, windows=args.eval_windows)
    # the students' fine-tuning data: the first --train-windows windows (in order), or all of them;
    # the trainer reads it as an endless stream of epochs, each a fresh permutation
    if args.train_windows is not None and not 1 <= args.train_windows <= len(train):
        print(f"recovery: --train-windows must be 1..{len(train)}, got {args.train_windows}", file=sys.stderr)
        return 2
    student_train = train if args.train_windows is None else train[: args.train_windows]
    epochs = args.steps * args.batch / len(student_train)
    print(f"[recovery] students fine-tune on {len(student_train)} windows x {args.seq_len} tokens "
          f"({student_train.numel():,} tokens): {args.steps} steps x {args.batch} = {epochs:.3g} epochs",
          flush=True)
    example = train[:2].clone()
    base = capture(model, {"input_ids": example})
    teacher = DistillModel(base.graph_module, base.constant_kwargs)

    def ppl(dm: DistillModel) -> float:
        move_module(dm, args.device)
        return perplexity(lambda input_ids: dm(input_ids)[0], heldout, batch_size=4, device=args.device)

    def config(steps: int, lr: float, seed: int = args.seed, **weights) -> FinetuneConfig:
        return FinetuneConfig(steps=steps, micro_batch_size=args.batch, lr=lr,
                              warmup_steps=int(args.warmup * steps), bf16=args.bf16, seed=seed,
                              device=args.device, strategy="none", progress=True, **weights)

    # 1. the dense teacher
    teacher_file = teacher_cache / "teacher.pt"
    if not results.has("dense-base"):
        results.add("dense-base", kind="dense", sparsity=0.0, loss="none", steps=0, ppl=ppl(teacher))
    if teacher_file.exists():
        teacher.load_state_dict(torch.load(teacher_file, weights_only=True))
    else:
        t0 = time.perf_counter()
        # the teacher draws its windows in another order than the students do
        teacher_config = config(args.teacher_steps, args.teacher_lr, args.seed + 1000, **LOSSES["ce"])
        finetune(teacher, None, train, teacher_config)
        torch.save(teacher.state_dict(), teacher_file)
        results.add("dense-teacher", kind="teacher", sparsity=0.0, loss="ce", steps=args.teacher_steps,
                    ppl=ppl(teacher), seconds=round(time.perf_counter() - t0, 1))
    if not results.has("dense-teacher"):
        results.add("dense-teacher", kind="teacher", sparsity=0.0, loss="ce", steps=args.teacher_steps,
                    ppl=ppl(teacher))

    for sparsity in sparsities:
        # 2. one-shot pruned student
        pruned_file = pruned_cache / f"pruned-{args.pruner}-{sparsity}.pt"
        pruned = move_module(copy.deepcopy(teacher), "cpu")  # calibration runs on the CPU
        if pruned_file.exists():
            _load_pruned(pruned, torch.load(pruned_file, weights_only=True))
        else:
            t0 = time.perf_counter()
            pass_ = make_pass(f"prune-{args.pruner}", sparsity=sparsity)
            samples = [((), {"input_ids": w[None].clone(), **base.constant_kwargs}) for w in calib]
            run_passes(pruned.graph_module, [pass_], PassContext(calibration=samples, progress=True))
            torch.save(pruned.state_dict(), pruned_file)
            results.add(f"oneshot-{sparsity}", kind="oneshot", sparsity=sparsity, loss="none", steps=0,
                        ppl=ppl(pruned), seconds=round(time.perf_counter() - t0, 1))
        if not results.has(f"oneshot-{sparsity}"):
            results.add(f"oneshot-{sparsity}", kind="oneshot", sparsity=sparsity, loss="none", steps=0,
                        ppl=ppl(pruned))
        release_memory()
        # 3. fine-tuned students, same budget for every loss
        for loss in losses:
            name = f"{loss}-{sparsity}"
            if results.has(name):
                continue
            student = copy.deepcopy(pruned)
            t0 = time.perf_counter()
            history = finetune(student, teacher if loss != "ce" else None, student_train,
                               config(args.steps, args.lr, **LOSSES[loss]))
            seconds = time.perf_counter() - t0
            # every loss component of the last step (ce, kl, squarehead: whichever the loss has)
            final_parts = {k: v for k, v in history[-1].items() if k not in ("step", "lr", "seconds")}
            results.add(name, kind="finetuned", sparsity=sparsity, loss=loss, steps=args.steps,
                        train_windows=len(student_train), epochs=round(epochs, 4),
                        ppl=ppl(student), seconds=round(seconds, 1), mask_violations=history.mask_violations,
                        final_train_loss=history[-1]["loss"], final_ce=history[-1].get("ce"),
                        final_parts=final_parts, train_ce=[round(r["ce"], 4) for r in history],
                        train_loss=[round(r["loss"], 4) for r in history])
            del student, history
            release_memory()
    total = time.perf_counter() - t_all
    # the table shows every row of these settings, also those earlier invocations added
    shown_losses = [name for name in LOSSES
                    if any(r.get("kind") == "finetuned" and r.get("loss") == name for r in results.rows.values())]
    shown_sparsities = sorted({r["sparsity"] for r in results.rows.values() if r.get("sparsity")})
    table = render(results.rows, shown_sparsities, shown_losses, args, hw, total, len(student_train))
    (out / "table.md").write_text(table)
    print(table)
    return 0


def release_memory() -> None:
    """Hand freed memory back to the OS between runs. Without this, glibc kept the freed
    optimizer states and activations of earlier students, and the process grew by a gigabyte or
    more per student until the kernel killed it (measured here: 11 GB after 8 students)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


def _load_pruned(dm, state: dict) -> None:
    """Load a pruned student's state (weights + mask buffers) into a copy of the dense teacher."""
    from sparsec.ir.layers import find_layers
    from sparsec.passes.masks import apply_mask, mask_buffer_name

    gm = dm.graph_module
    for layer in find_layers(gm):
        key = f"graph_module.{mask_buffer_name(layer)}"
        if key in state and mask_buffer_name(layer) not in dict(gm.named_buffers()):
            apply_mask(gm, layer, layer.as_matrix(state[key]) != 0)
    dm.load_state_dict(state)


def render(rows: dict[str, dict], sparsities: list[float], losses: list[str], args: argparse.Namespace,
           hw: dict, total: float, train_windows: int) -> str:
    def cell(name: str) -> str:
        row = rows.get(name)
        return f"{row['ppl']:.2f}" if row else "-"

    lines = [
        f"Held-out perplexity, SmolLM2-135M, {args.pruner} one-shot then {args.steps} steps of fine-tuning "
        f"(batch {args.batch} x {args.seq_len} tokens, lr {args.lr}, {'bf16' if args.bf16 else 'fp32'}) "
        f"on {'the first ' if args.train_windows is not None else ''}{train_windows} train windows "
        f"({args.steps * args.batch / train_windows:.3g} epochs); "
        f"{args.eval_windows} held-out windows of {args.seq_len} tokens.",
        "",
        f"dense base model: {cell('dense-base')}; dense teacher ({args.teacher_steps} CE steps): "
        f"{cell('dense-teacher')}",
        "",
        "| sparsity | one-shot | " + " | ".join(losses) + " |",
        "|---|---|" + "---|" * len(losses),
    ]
    for s in sparsities:
        tuned = " | ".join(cell(f"{loss}-{s}") for loss in losses)
        lines.append(f"| {s:.0%} | {cell(f'oneshot-{s}')} | {tuned} |")
    where = f"GPU {hw['gpu']} (training and evaluation), " if args.device == "cuda" and hw.get("gpu") else ""
    lines += ["", f"hardware: {where}{hw['cpu']}, {hw['cores']} cores, torch {hw['torch']} with "
                  f"{hw['torch_threads']} threads; load average at start {hw['loadavg_start']:.1f}; this "
                  f"invocation took {total / 60:.1f} min"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
