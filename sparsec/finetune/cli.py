"""``sparsec finetune``: prune a model and recover its accuracy by distillation from the dense model.

    sparsec finetune smollm2-135m --prune "prune-sparsegpt{sparsity=0.7}" --calibration 32 \\
        --steps 200 --squarehead 1 -o smollm2-70 --checkpoint-dir ckpt

MODEL is the dense model (bundled name, Hugging Face folder or ``FILE.py:FACTORY``); the teacher
is a copy of it (or ``--teacher SPEC``), the student is it after ``--prune`` (pipeline text;
``--prune ""`` for a model that is pruned already, i.e. whose zeros are its mask). Training data
is the bundled Wikipedia train split cut into ``--seq-len`` windows, or ``--data FILE`` (``.pt``
or ``.safetensors`` holding ``input_ids`` ``[N, seq_len]`` and optionally ``attention_mask``).

The output directory receives the fine-tuned model (``save_pretrained`` for Hugging Face models,
``model.safetensors`` otherwise), ``masks.safetensors`` (one uint8 mask per pruned weight, by
weight name) and ``finetune.json`` (settings, per-step losses, perplexities). It is written
under a temporary name and renamed when complete; an existing directory is never overwritten.
Under ``torchrun`` only rank 0 writes. Settings are checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sparsec.errors import first_line
from sparsec.finetune.losses import SQUAREHEAD_NORMALIZATIONS
from sparsec.finetune.trainer import FinetuneConfig, FinetuneError


def add_finetune_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``finetune`` on the ``sparsec`` command's subparsers; returns its parser."""
    p = subparsers.add_parser("finetune", help="prune, then fine-tune against the dense model (SquareHead)",
                              description=__doc__.split("\n\n")[2].strip())
    p.add_argument("model", help="the dense model: bundled name, Hugging Face folder, or FILE.py:FACTORY")
    p.add_argument("-o", "--output", help="directory to write the fine-tuned model to (must not exist)")
    p.add_argument("--prune", default="prune-magnitude{sparsity=0.5}",
                   help="pass pipeline that prunes the student (default: %(default)s; \"\" for none)")
    p.add_argument("--calibration", type=int, default=0, metavar="N",
                   help="N calibration windows from the train split (for sparsegpt/wanda)")
    p.add_argument("--teacher", help="teacher model spec (default: a copy of MODEL before pruning)")
    p.add_argument("--data", default="wikipedia",
                   help="'wikipedia' (bundled train split) or a .pt/.safetensors file")
    p.add_argument("--seq-len", type=int, default=128,
                   help="window length for --data wikipedia (default: %(default)s)")
    p.add_argument("--samples", type=int, default=0, help="use only the first N training windows (0: all)")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=100, help="optimizer steps (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=4,
                   help="sequences per micro-batch per process (default: 4)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--warmup", type=int, default=0,
                   help="linear warmup steps before linear decay (default: 0)")
    g.add_argument("--max-grad-norm", type=float, default=None, help="clip gradients to this norm")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for forward passes")
    g.add_argument("--seed", type=int, default=0, help="data order seed (default: 0)")
    g = p.add_argument_group("loss: a*CE + b*KL + c*SquareHead")
    g.add_argument("--ce", type=float, default=1.0, help="a (default: %(default)s)")
    g.add_argument("--kl", type=float, default=0.0, help="b (default: %(default)s)")
    g.add_argument("--squarehead", type=float, default=1.0, help="c (default: %(default)s)")
    g.add_argument("--squarehead-normalize", choices=SQUAREHEAD_NORMALIZATIONS, default="layer",
                   help="SquareHead normalizer: one teacher energy per layer (the paper's) or per token "
                        "(default: %(default)s)")
    g.add_argument("--squarehead-sinks", default="none",
                   help="positions SquareHead leaves out: none, first, or norm:K (tokens whose teacher norm "
                        "exceeds K x their sequence's median) (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=1.0, help="KL temperature (default: %(default)s)")
    g.add_argument("--blocks", default="",
                   help="glob patterns of the blocks to tap (default: found automatically)")
    g = p.add_argument_group("schedule, checkpoints, processes")
    g.add_argument("--gradual", metavar="FINAL[:N[:EVERY[:START]]]",
                   help="gradual magnitude pruning to FINAL sparsity in N prunings EVERY steps from START "
                        "(use with --prune \"\")")
    g.add_argument("--checkpoint-dir", help="write resumable checkpoints here")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="steps between checkpoints (default: end only)")
    g.add_argument("--no-resume", action="store_true",
                   help="start over even if --checkpoint-dir holds a checkpoint")
    g.add_argument("--stop-at", type=int, help="stop after this step (checkpointed) and continue later")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    g.add_argument("--strategy", default="auto", choices=("auto", "none", "ddp", "fsdp"),
                   help="multi-process strategy under torchrun (default: auto = ddp when launched so)")
    g.add_argument("--eval-windows", type=int, default=0, metavar="N",
                   help="report held-out perplexity on N windows before and after (needs a tokenizer)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_finetune_command)
    return p


def parse_gradual(text: str | None):
    """``"0.7:10:50:0"`` -> a CubicSchedule (final sparsity, prunings, frequency, start step)."""
    if not text:
        return None
    from sparsec.finetune.schedules import CubicSchedule, ScheduleError

    parts = text.split(":")
    try:
        final = float(parts[0])
        ints = [int(x) for x in parts[1:]]
    except ValueError:
        raise FinetuneError(f"bad --gradual {text!r}; write FINAL[:N[:EVERY[:START]]], e.g. 0.7:10:50") \
            from None
    if len(ints) > 3:
        raise FinetuneError(f"bad --gradual {text!r}; at most FINAL:N:EVERY:START")
    names = ("num_prunings", "frequency", "start_step")
    try:
        return CubicSchedule(final, **dict(zip(names, ints)))
    except ScheduleError as e:
        raise FinetuneError(f"--gradual: {e}") from None


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    config = FinetuneConfig(
        steps=args.steps, micro_batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup, max_grad_norm=args.max_grad_norm,
        ce=args.ce, kl=args.kl, squarehead=args.squarehead, temperature=args.temperature, bf16=args.bf16,
        squarehead_normalize=args.squarehead_normalize, squarehead_sinks=args.squarehead_sinks,
        seed=args.seed, blocks=args.blocks, device=args.device, strategy=args.strategy,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=not args.no_resume,
        stop_at=args.stop_at, progress=not args.quiet, gradual=parse_gradual(args.gradual))
    config.validate()
    return config


def load_data(spec: str, tokenizer: Any, seq_len: int, samples: int) -> Any:
    """Token windows of the bundled train split, or the tensors of a ``.pt``/``.safetensors`` file."""
    if spec == "wikipedia":
        if tokenizer is None:
            raise FinetuneError("--data wikipedia needs a model with a tokenizer; give --data FILE with "
                                "token ids")
        from sparsec.data import token_windows

        ids = token_windows(tokenizer, "train", seq_len=seq_len)
        return ids[:samples] if samples else ids
    path = Path(spec)
    if not path.is_file():
        raise FinetuneError(f"--data {spec!r} is neither 'wikipedia' nor a file")
    expected = "give a .pt (torch.save) or .safetensors file holding input_ids [N, seq_len], or --data wikipedia"
    if path.stat().st_size == 0:
        raise FinetuneError(f"--data {spec} is empty; {expected}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            import torch

            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - one line for any unreadable file
        first = first_line(e, default="", limit=200)
        binary = path.suffix in (".pt", ".pth", ".bin", ".safetensors")
        text = "" if binary else " (text is not read: tokenize it first)"
        raise FinetuneError(f"cannot read --data {spec} ({type(e).__name__}: {first}); {expected}{text}") from None
    if isinstance(data, dict) and samples:
        data = {k: v[:samples] for k, v in data.items()}
    elif samples:
        data = data[:samples]
    return data


def run_finetune_command(args: argparse.Namespace) -> int:
    import torch

    from sparsec.capture import capture
    from sparsec.finetune.batches import TokenData
    from sparsec.finetune.model import DistillModel
    from sparsec.finetune.trainer import finetune, mask_pairs
    from sparsec.models import load_spec
    from sparsec.passes import PassContext, Pipeline, run_passes
    from sparsec.runtime.artifact import unwritable_reason

    # Everything that can be checked without the model is checked first.
    config = config_from_args(args)
    for flag, value, least in (("--calibration", args.calibration, 0), ("--samples", args.samples, 0),
                               ("--eval-windows", args.eval_windows, 0), ("--seq-len", args.seq_len, 1)):
        if value < least:
            raise FinetuneError(f"{flag} must be at least {least}, got {value}")
    output = Path(args.output) if args.output else None
    if output is not None and output.exists():
        raise FinetuneError(f"output {output} already exists; choose a new directory (nothing is "
                            f"overwritten)")
    why = unwritable_reason(output, probe=True) if output is not None else None
    if why is not None:
        raise FinetuneError(f"cannot write output {output}: {why}; choose a writable location")
    pipeline = Pipeline.parse(args.prune) if args.prune.strip() else None
    if pipeline is None and config.gradual is None and os.environ.get("RANK", "0") == "0":
        print("sparsec finetune: --prune \"\": training with the masks the model's zeros define")

    loaded = load_spec(args.model)
    tokens = TokenData.from_any(load_data(args.data, loaded.tokenizer, args.seq_len, args.samples))
    teacher_model = load_spec(args.teacher).model if args.teacher else copy.deepcopy(loaded.model)
    example = tokens.input_ids[:2].clone()
    scap = capture(loaded.model, {"input_ids": example})
    tcap = capture(teacher_model, {"input_ids": example})
    calibration = None
    if args.calibration:
        calibration = [((), {"input_ids": w[None].clone(), **scap.constant_kwargs})
                       for w in tokens.input_ids[: args.calibration]]
    if pipeline is not None:
        ctx = PassContext(calibration=calibration, progress=not args.quiet)
        run_passes(scap.graph_module, pipeline.passes, ctx)
    elif config.gradual is None:
        _masks_from_zeros(scap.graph_module)
    student = DistillModel(scap.graph_module, scap.constant_kwargs, config.blocks)
    needs_teacher = config.kl > 0 or config.squarehead > 0
    teacher = DistillModel(tcap.graph_module, tcap.constant_kwargs, config.blocks) if needs_teacher else None

    report: dict[str, Any] = {"model": args.model, "prune": args.prune, "config": config.to_dict()}
    heldout = _heldout(loaded.tokenizer, args)
    if heldout is not None:
        report["perplexity_before"] = _ppl(student, heldout)
    history = finetune(student, teacher, tokens, config)
    report.update(history=history.records, start_step=history.start_step, seconds=history.seconds,
                  mask_violations=history.mask_violations, masks_checksum=history.masks_checksum)
    if heldout is not None:
        report["perplexity_after"] = _ppl(student, heldout)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # under torchrun every rank trained the same model; rank 0 reports and writes
        return 0
    last = history[-1] if len(history) else {}
    print("sparsec finetune: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step")
          + (f"; perplexity {report['perplexity_before']:.3f} -> {report['perplexity_after']:.3f}"
             if heldout is not None else ""))
    if output is not None:
        masks = {w: (student.graph_module.get_buffer(m) != 0).to(torch.uint8).contiguous()
                 for w, m in mask_pairs(student.graph_module)}
        _write_output(output, loaded, masks, report)
        print(f"sparsec finetune: wrote {output}")
    return 0


def _masks_from_zeros(gm) -> None:
    """A model pruned elsewhere: its exact zeros become fixed masks."""
    from sparsec.passes.masks import apply_mask, select_layers

    for layer in select_layers(gm):
        keep = layer.matrix(gm).detach() != 0
        if not keep.all():
            apply_mask(gm, layer, keep)


def _heldout(tokenizer: Any, args: argparse.Namespace):
    if not args.eval_windows:
        return None
    if tokenizer is None:
        raise FinetuneError("--eval-windows needs a model with a tokenizer")
    from sparsec.data import heldout_windows

    return heldout_windows(tokenizer, seq_len=args.seq_len, windows=args.eval_windows)


def _ppl(model: Any, windows: Any) -> float:
    from sparsec.data import perplexity

    return perplexity(lambda input_ids: model(input_ids)[0], windows)


def _write_output(output: Path, loaded: Any, masks: dict, report: dict) -> None:
    from safetensors.torch import save_file, save_model

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    except OSError as e:
        raise FinetuneError(f"cannot write output {output}: {e.strerror or e}; choose a writable location") from None
    try:
        model = loaded.model
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(tmp)
        else:
            save_model(model, str(tmp / "model.safetensors"))
        if masks:
            save_file(masks, str(tmp / "masks.safetensors"))
        (tmp / "finetune.json").write_text(json.dumps(report, indent=1, default=str))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FinetuneError(f"writing output {output} failed: {e.strerror or e}; free space or choose another "
                            f"location") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():
        raise FinetuneError(f"output {output} appeared while training; the result is left in {tmp}")
    os.replace(tmp, output)
