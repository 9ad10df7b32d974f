"""The ``sparsec`` command. It parses arguments and calls the Python API; nothing more.

    sparsec passes                                   every pass, its options and one-line doc
    sparsec compile MODEL --pipeline TEXT -o DIR     compile, print the per-layer report, save
    sparsec inspect MODEL_OR_ARTIFACT                per-layer table of a model or an artifact
    sparsec bench MODEL --pipeline TEXT              eager vs compiled forward time
    sparsec generate ARTIFACT --prompt TEXT          generate text from an artifact with a KV cache
    sparsec recover MODEL --sparsity 0.7 -o DIR      prune, recover, quantize, compile: the whole recipe
    sparsec tune -o FILE                             fit the CPU cost model of select-format to this machine

MODEL is a bundled name (``smollm2-135m``), a local Hugging Face folder, or ``FILE.py:FACTORY``.
Every error a user can cause prints one line on stderr and exits with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_USAGE = 2


class CliError(Exception):
    """A user error the CLI reports in one line."""


def _add_model_args(p: argparse.ArgumentParser, pipeline: bool = True) -> None:
    if pipeline:
        p.add_argument("--pipeline", "-p", default="prune-magnitude{sparsity=0.5}",
                       help="pass pipeline text or a named pipeline (default: %(default)s)")
        p.add_argument("--target", choices=("cpu", "cuda"), default="cpu", help="where the kernels run")
        p.add_argument("--calibration", type=int, default=0, metavar="N",
                       help="N calibration sequences from the bundled train split (for sparsegpt/wanda/gptq)")
        p.add_argument("--seq-len", type=int, default=128, help="calibration sequence length (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsec", description="Make pretrained networks sparse, accurate and fast.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("passes", help="list every pass with its options, and the named pipelines")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("compile", help="compile a model and save an artifact")
    p.add_argument("model", help="bundled name, Hugging Face folder, or FILE.py:FACTORY")
    _add_model_args(p)
    p.add_argument("-o", "--output", help="artifact directory to write")
    p.add_argument("--dump-graph", metavar="DIR", help="write the graph after every pass to DIR/NNN_<pass>.py")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("tune", help="fit select-format's CPU cost model to this machine's kernels",
                       description="Fit select-format's CPU cost model to this machine's kernels. On a machine "
                                   "shared with other work run it as OMP_WAIT_POLICY=PASSIVE sparsec tune: torch "
                                   "reads the variable when it loads, and spinning OpenMP threads stalled its "
                                   "dense matmul 100-fold here.")
    p.add_argument("-o", "--output", default=None,
                   help="JSON file to write (default: ~/.cache/sparsec/cost-model.json)")
    p.add_argument("--shape", default="4096x4096", help="ROWSxCOLS of the timed layers (default: %(default)s)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (steadier on a machine shared with other work)")
    p.add_argument("--quick", action="store_true",
                   help="a 512x1024 layer without rotating over copies (seconds; a rough fit)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("inspect", help="per-layer table of a model or an artifact")
    p.add_argument("model", help="artifact directory, bundled name, Hugging Face folder, or FILE.py:FACTORY")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="time the eager model against the compiled one")
    p.add_argument("model", help="bundled name, Hugging Face folder, or FILE.py:FACTORY")
    _add_model_args(p)
    p.add_argument("--repeat", type=int, default=20, help="timed runs of each (default: %(default)s)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("recover", help="the recovery recipe: one-shot, block-wise, global distillation, compile",
                       description="One-shot SparseGPT (with OWL), block-wise recovery, global distillation, "
                                   "quantize and compile; writes DIR/model (Hugging Face folder), DIR/artifact and "
                                   "DIR/recipe.json. Rerun the same command to continue an interrupted run.")
    p.add_argument("model", help="bundled name or Hugging Face folder of a causal language model")
    p.add_argument("-o", "--output", required=True, help="directory to write (new, or an unfinished recipe's)")
    _add_recipe_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_recover)

    try:
        from sparsec.finetune.cli import add_finetune_command
    except ImportError:
        pass
    else:
        add_finetune_command(sub)
    from sparsec.runtime.generate import add_generate_command

    add_generate_command(sub)
    return parser


#: the recipe settings the ``recover`` command exposes, with their help (RecipeConfig's defaults)
_RECIPE_HELP = {
    "sparsity": "fraction of every linear weight (lm_head aside) pruned",
    "pattern": "N:M instead of unstructured sparsity, e.g. 2:4",
    "values": "weight values of the compiled model: fp32, int8 or int4",
    "owl_lambda": "OWL: per-block sparsity within +-lambda by outlier ratio (0: uniform)",
    "calibration": "train windows for SparseGPT and block-wise recovery",
    "seq_len": "tokens per training window",
    "blockwise_epochs": "passes over the calibration windows per block (0: skip the stage)",
    "blockwise_lr": "block-wise peak learning rate (cosine decay)",
    "blockwise_inputs": "block inputs: student (recovered blocks before it) or teacher",
    "blockwise_normalize": "block loss normalizer: layer or token",
    "blockwise_sinks": "positions the block loss leaves out: none, first or norm:K",
    "global_steps": "global distillation steps (0: skip the stage)",
    "global_batch": "windows per global step",
    "global_lr": "global peak learning rate",
    "ce": "weight of cross entropy in the global loss",
    "kl": "weight of KL to the dense model's logits",
    "squarehead": "weight of SquareHead (block outputs)",
    "squarehead_normalize": "SquareHead normalizer: layer or token",
    "squarehead_sinks": "positions SquareHead leaves out: none, first or norm:K",
    "generated": "share of global windows sampled from the dense model",
    "eval_windows": "held-out windows per evaluation (Wikipedia and news)",
    "eval_len": "tokens per held-out window",
    "seed": "seed of data order and sampling",
}


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    from sparsec.recipe import RecipeConfig

    defaults = RecipeConfig()
    for name, text in _RECIPE_HELP.items():
        value = getattr(defaults, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, dest=name,
                       help=f"{text} (default: {value if value != '' else 'none'})")


def cmd_recover(args: argparse.Namespace) -> int:
    from sparsec.recipe import RecipeConfig, recover

    config = RecipeConfig(**{name: getattr(args, name) for name in _RECIPE_HELP}, progress=not args.quiet)
    result = recover(args.model, config, args.output)
    print(result.table())
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from sparsec.passes import registered_passes, registered_pipelines
    from sparsec.passes.base import _default, format_option_value
    from sparsec.passes.pipeline import pipeline_doc

    for name, cls in registered_passes().items():
        print(f"{name}\n    {cls.summary()}")
        types = cls.option_types()
        for f in cls.option_fields():
            default = format_option_value(_default(f))
            print(f"    {f.name:<12} {types[f.name].__name__:<6} default {default}")
    pipelines = registered_pipelines()
    if pipelines:
        print("\nnamed pipelines:")
        for name, text in pipelines.items():
            doc = pipeline_doc(name)
            print(f"  {name}{'  - ' + doc if doc else ''}\n    {text}")
    return 0


def _load(spec: str):
    from sparsec.models import load_spec

    return load_spec(spec)


def _calibration(loaded, args) -> list | None:
    if not args.calibration:
        return None
    if loaded.tokenizer is None:
        raise CliError("--calibration needs a model with a tokenizer (a bundled name or a Hugging Face folder)")
    from sparsec.data import token_windows

    windows = token_windows(loaded.tokenizer, "train", seq_len=args.seq_len, count=args.calibration, seed=0)
    return [{"input_ids": w[None]} for w in windows]


def _compile(args: argparse.Namespace, loaded, instruments=None):
    import sparsec

    return sparsec.compile(loaded.model, loaded.example_inputs, pipeline=args.pipeline, target=args.target,
                           calibration=_calibration(loaded, args), instruments=instruments, progress=True)


def _check_pipeline(args: argparse.Namespace) -> None:
    """Parse the pipeline and check the numbers before loading anything, so a typo costs no model load."""
    from sparsec.api import resolve_pipeline

    resolve_pipeline(args.pipeline, args.target)
    if args.calibration < 0:
        raise CliError(f"--calibration must be 0 (none) or a number of sequences, got {args.calibration}")
    if args.seq_len < 1:
        raise CliError(f"--seq-len must be a positive number of tokens, got {args.seq_len}")


def cmd_compile(args: argparse.Namespace) -> int:
    import json

    from sparsec.passes import DumpGraph
    from sparsec.runtime.artifact import check_destination, unwritable_reason

    _check_pipeline(args)
    if args.output:
        check_destination(args.output, probe=True)  # before the compile, not after it
    if args.dump_graph:
        dump = Path(args.dump_graph)
        why = "it is a file" if dump.exists() and not dump.is_dir() else unwritable_reason(dump / "x", probe=True)
        if why is not None:
            raise CliError(f"--dump-graph {args.dump_graph}: {why}; give a writable directory")
    loaded = _load(args.model)
    instruments = [DumpGraph(args.dump_graph)] if args.dump_graph else None
    compiled = _compile(args, loaded, instruments)
    report = compiled.report
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.table())
    if args.output:
        import sparsec

        sparsec.save(compiled, args.output, tokenizer=loaded.tokenizer)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _parse_shape(text: str) -> tuple[int, int]:
    """``ROWSxCOLS`` as two positive ints; anything else is a :class:`CliError` that shows a valid one."""
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        rows = cols = 0
    if rows <= 0 or cols <= 0:
        raise CliError(f"--shape must be ROWSxCOLS, two positive whole numbers such as --shape 4096x4096; "
                       f"got {text!r}")
    return rows, cols


def cmd_tune(args: argparse.Namespace) -> int:
    from sparsec.models import cache_dir
    from sparsec.tune import tune_cpu, write_cost_model

    rows, cols = _parse_shape(args.shape)
    if args.quick:
        rows, cols = 512, 1024
    out = Path(args.output) if args.output else cache_dir() / "cost-model.json"
    if out.exists() and out.is_dir():
        raise CliError(f"{out} is a directory; give a file path with -o")
    from sparsec.runtime.artifact import unwritable_reason

    why = unwritable_reason(out, probe=True)
    if why is not None:
        raise CliError(f"cannot write {out}: {why}; give a writable file path with -o")
    try:
        doc = tune_cpu((rows, cols), clock=args.clock, rotate=not args.quick, progress=print)
    except ValueError as e:
        raise CliError(str(e)) from None
    try:
        write_cost_model(doc, out)
    except OSError as e:
        raise CliError(f"cannot write {out}: {e.strerror or e}; give a writable file path with -o") from None
    cpu = doc["cpu"]
    print(f"bandwidth {cpu['bandwidth'] / 1e9:.1f} GB/s, dense {cpu['dense_fma_per_cycle']:.2f} FMA/cycle; "
          f"bitmask fit within {max(doc['fit']['max_relative_error'].values()):.0%} of the measurements")
    print(f"wrote {out}; use it with select-format{{cost_model=\"{out}\"}}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from sparsec.runtime.artifact import is_artifact, read_manifest

    if is_artifact(args.model):
        manifest = read_manifest(args.model)
        print(f"artifact {args.model}: target {manifest['target']}, sparsec {manifest['versions']['sparsec']}, "
              f"torch {manifest['versions']['torch']}")
        print(f"pipeline: {manifest['pipeline']}")
        layers = manifest["layers"]
        width = max([len(x["layer"]) for x in layers] + [5])
        print(f"{'layer':<{width}}  {'shape':>11}  {'format':<8} {'values':<6} {'bytes':>10}  {'activation':<10}")
        for x in layers:
            shape = f"{x['shape'][0]}x{x['shape'][1]}"
            print(f"{x['layer']:<{width}}  {shape:>11}  {x['format']:<8} {x['value_type']:<6} {x['nbytes']:>10,}  "
                  f"{x['activation'] or '-':<10}")
        total = sum(x["nbytes"] for x in layers)
        dense = sum(4 * x["shape"][0] * x["shape"][1] for x in layers)
        print(f"{len(layers)} layers, {total:,} bytes ({dense / max(1, total):.2f}x fewer than dense fp32)")
        return 0
    if args.model.strip() and Path(args.model).is_dir() and not (Path(args.model) / "config.json").exists():
        raise CliError(f"{args.model} is neither an artifact (no manifest.json) nor a Hugging Face folder")
    from sparsec.capture import capture
    from sparsec.ir.layers import find_layers

    loaded = _load(args.model)
    cap = capture(loaded.model, loaded.example_inputs)
    gm = cap.graph_module
    layers = find_layers(gm)
    width = max([len(x.name) for x in layers] + [5])
    print(f"{loaded.source}: captured with {cap.method}, {len(layers)} weighted layers")
    print(f"{'layer':<{width}}  {'kind':<7} {'shape':>11}  {'sparsity':>8}  {'fp32 bytes':>11}")
    for x in layers:
        w = gm.get_parameter(x.weight)
        sparsity = (w == 0).sum().item() / max(1, w.numel())
        print(f"{x.name:<{width}}  {x.kind:<7} {x.shape[0]:>5}x{x.shape[1]:<5}  {sparsity:8.1%}  {4 * w.numel():>11,}")
    for part in cap.opaque:
        print(f"opaque: {part.name} ({part.module_type}): {part.reason}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from sparsec.capture import normalize_inputs

    _check_pipeline(args)
    if args.repeat < 1:
        raise CliError("--repeat must be at least 1")
    loaded = _load(args.model)
    compiled = _compile(args, loaded)
    call_args, call_kwargs = normalize_inputs(loaded.example_inputs)

    def timed(fn) -> float:
        with torch.no_grad():
            fn(*call_args, **call_kwargs)
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn(*call_args, **call_kwargs)
                times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2]

    eager = timed(loaded.model)
    comp = timed(compiled)
    print(f"{'':<10} {'median ms':>10}")
    print(f"{'eager':<10} {eager * 1e3:10.3f}")
    print(f"{'compiled':<10} {comp * 1e3:10.3f}   ({eager / comp:.2f}x)")
    print(f"median of {args.repeat} runs after one warm-up; pipeline {compiled.pipeline}")
    return 0


def _known_errors() -> tuple[type[BaseException], ...]:
    from sparsec.api import CompileError
    from sparsec.capture import CaptureError
    from sparsec.data import DataError
    from sparsec.formats.base import FormatError
    from sparsec.models import ModelLoadError
    from sparsec.passes.base import PassError, PassOptionError
    from sparsec.passes.pipeline import PipelineSyntaxError
    from sparsec.runtime.artifact import ArtifactError
    from sparsec.runtime.compiled import TargetUnavailableError

    return (CliError, CompileError, CaptureError, DataError, FormatError, ModelLoadError, PassError,
            PassOptionError, PipelineSyntaxError, ArtifactError, TargetUnavailableError, FileNotFoundError,
            ValueError)


# Options whose values may start with '-': argparse reads `--shape -4x8` as two options and fails
# with "expected one argument", so such a value is joined to its option, as in `--shape=-4x8`,
# and the command's own check says what a valid value looks like.
_DASH_VALUE_OPTIONS = ("--shape",)


def _join_dash_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--":
            return out + argv[i:]
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if argv[i] in _DASH_VALUE_OPTIONS and value[:1] == "-" and value[1:2].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_dash_values(sys.argv[1:] if argv is None else list(argv)))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("sparsec: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug
        if args.debug:
            raise
        from sparsec.errors import first_line
        from sparsec.passes.pipeline import PipelineSyntaxError

        if isinstance(e, PipelineSyntaxError):
            print(f"sparsec: error: {e.pretty()}", file=sys.stderr)
            return EXIT_USAGE
        known = isinstance(e, _known_errors())
        message = first_line(e)
        if not known:
            message = f"{type(e).__name__}: {message} (rerun with --debug for the traceback)"
        print(f"sparsec: error: {message}", file=sys.stderr)
        return EXIT_USAGE if known else 1


if __name__ == "__main__":
    sys.exit(main())
