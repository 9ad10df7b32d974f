"""``sparsec.compile``: capture, run the pass pipeline, lower, wrap. Thin by design.

    >>> compiled = sparsec.compile(model, (x,), pipeline="prune-magnitude{sparsity=0.5}")
    >>> y = compiled(x)
    >>> print(compiled.report.table())
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from sparsec.capture import Capture, OpaquePart, capture
from sparsec.ir.device import move_graph, to_device
from sparsec.passes import (
    NumericCheck,
    Pass,
    PassContext,
    PassTiming,
    Pipeline,
    run_passes,
)
from sparsec.passes.base import max_relative_error
from sparsec.runtime.compiled import (
    CompiledModule,
    LayerRecord,
    build_compiled,
    kernel_builder,
    target_device,
)
from sparsec.runtime.decode_step import prepare_fused_step
from sparsec.runtime.generate import model_description

TARGETS = ("cpu", "cuda")


class CompileError(ValueError):
    """Impossible compile options (unknown target, a pipeline lowering for another target...)."""


@dataclass
class CompileReport:
    """What a compile did: per layer its sparsity, format, bytes and kernel error; the model's
    output error against eager PyTorch; what capture could not see; how long each step took."""

    pipeline: str
    target: str
    capture_method: str
    layers: list[LayerRecord]
    #: compiled output vs eager PyTorch running the same (pruned, quantized) weights.
    max_rel_error: float
    #: compiled output vs the original dense model (includes the effect of pruning).
    max_rel_error_vs_original: float
    opaque: list[OpaquePart] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pass_seconds: list[tuple[str, float]] = field(default_factory=list)
    capture_seconds: float = 0.0
    kernel_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def dense_bytes(self) -> int:
        return sum(layer.dense_bytes for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["nbytes"], out["dense_bytes"] = self.nbytes, self.dense_bytes
        return out

    def table(self) -> str:
        """The per-layer table the CLI prints, then the totals and what capture left opaque."""
        name_w = max([len(r.name) for r in self.layers] + [5])
        head = (f"{'layer':<{name_w}}  {'shape':>11}  {'sparsity':>8}  {'format':<8} {'values':<6} "
                f"{'bytes':>10}  {'x dense':>7}  {'max rel err':>11}  {'compile s':>9}")
        lines = [head, "-" * len(head)]
        for r in self.layers:
            err = "-" if r.max_rel_error is None else f"{r.max_rel_error:.2e}"
            shape = f"{r.shape[0]}x{r.shape[1]}"
            ratio = r.dense_bytes / max(1, r.nbytes)
            lines.append(f"{r.name:<{name_w}}  {shape:>11}  {r.sparsity:8.1%}  {r.format:<8} {r.value_type:<6} "
                         f"{r.nbytes:>10,}  {ratio:6.2f}x  {err:>11}  {r.compile_seconds:9.3f}")
        ratio = self.dense_bytes / max(1, self.nbytes)
        lines.append("-" * len(head))
        lines.append(f"{len(self.layers)} layers, {self.nbytes:,} bytes ({ratio:.2f}x fewer than dense fp32); "
                     f"output max rel error {self.max_rel_error:.2e} vs eager on the same weights, "
                     f"{self.max_rel_error_vs_original:.2e} vs the original model")
        lines.append(f"capture {self.capture_method} {self.capture_seconds:.1f}s, passes "
                     f"{sum(s for _, s in self.pass_seconds):.1f}s, kernels {self.kernel_seconds:.1f}s, "
                     f"total {self.total_seconds:.1f}s")
        for part in self.opaque:
            lines.append(f"opaque: {part.name} ({part.module_type}) kept as a call, its weights untouched: "
                         f"{part.reason}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def resolve_pipeline(pipeline: str | Pipeline | list[Pass], target: str) -> tuple[Pipeline, list[str]]:
    """Parse the pipeline and make sure it ends by lowering for ``target`` (appended if absent)."""
    if isinstance(pipeline, Pipeline):
        pipe = Pipeline(list(pipeline.passes))
    elif isinstance(pipeline, (list, tuple)):
        pipe = Pipeline(list(pipeline))
    elif isinstance(pipeline, str):
        pipe = Pipeline.parse(pipeline)
    else:
        raise CompileError(f"pipeline must be text, a Pipeline or a list of passes, not {type(pipeline).__name__}")
    notes = []
    lowerings = [p for p in pipe.passes if p.name.startswith("lower-")]
    wanted = f"lower-{target}"
    if any(p.name != wanted for p in lowerings):
        other = next(p.name for p in lowerings if p.name != wanted)
        raise CompileError(f"the pipeline lowers with {other} but target={target!r}; use {wanted} or change target")
    if not lowerings:
        from sparsec.passes import make_pass

        pipe.passes.append(make_pass(wanted))
        notes.append(f"appended {wanted} (the pipeline had no lowering pass)")
    elif pipe.passes[-1].name != wanted:
        raise CompileError(f"{wanted} must be the last pass of the pipeline")
    return pipe, notes


def compile(model: nn.Module, example_inputs: Any, pipeline: str | Pipeline | list[Pass] = "lower-cpu",
            target: str = "cpu", *, calibration: list | None = None, instruments: list | None = None,
            capture_method: str = "auto", progress: bool = False) -> CompiledModule:
    """Compile ``model`` through ``pipeline`` for ``target``; returns a :class:`CompiledModule`
    whose ``report`` is a :class:`CompileReport`.

    ``example_inputs``: a tensor, a tuple of args, a dict of keyword inputs, or ``(args, kwargs)``.
    ``calibration``: inputs in the same form, for data-driven passes (SparseGPT, Wanda, GPTQ).
    The user's ``model`` is never modified: sparsec compiles a copy. For a Llama-family causal LM
    on the CPU, the batch-1 decode step that :func:`sparsec.generate` uses is compiled too (the
    report's notes say whether the model can use it), so a saved artifact carries it.
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise CompileError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if target not in TARGETS:
        raise CompileError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    pipe, notes = resolve_pipeline(pipeline, target)
    kernel_builder(target)  # fail now, in one sentence, if the target cannot run here
    from sparsec.capture import bind_inputs, normalize_inputs

    example_args, example_kwargs = normalize_inputs(example_inputs)
    _check_finite_inputs(example_args, example_kwargs, "example_inputs")
    if calibration is not None and not isinstance(calibration, (list, tuple)):
        raise CompileError(f"calibration must be a list of inputs (each in the form of example_inputs), got "
                           f"{type(calibration).__name__}; wrap a single input as [x]")
    work = copy.deepcopy(model).eval()
    t0 = time.perf_counter()
    cap: Capture = capture(work, example_inputs, method=capture_method)
    capture_seconds = time.perf_counter() - t0
    inputs = (cap.example_args, {**cap.example_kwargs})

    def bind(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return bind_inputs(cap.method, cap.input_names, cap.constant_kwargs, args, kwargs)

    # the reference output comes from the eval-mode copy before any pass ran: running the user's
    # model would update its state where it is in training mode (BatchNorm running statistics)
    with torch.no_grad():
        original = work(*example_args, **example_kwargs)
    timing = PassTiming()
    ctx = PassContext(target=target, example_inputs=inputs,
                      calibration=[bind(*normalize_inputs(c)) for c in calibration] if calibration else None,
                      instruments=[timing, *(instruments or [])], progress=progress)
    for inst in ctx.instruments:
        if isinstance(inst, NumericCheck) and inst.reference is None:
            inst.reference = original
    gm, _ = run_passes(cap.graph_module, list(pipe.passes), ctx)
    with torch.no_grad():
        eager = gm(*inputs[0], **inputs[1])
    # passes ran on the CPU; the kernels, and every other weight, live where the target runs
    device = target_device(target)
    if device.type != "cpu":
        move_graph(gm, device)
        inputs = to_device(inputs, device)
    built = build_compiled(gm, target, verify_inputs=inputs, progress=progress)
    compiled = CompiledModule(built.graph_module, method=cap.method, input_names=cap.input_names,
                              constant_kwargs=cap.constant_kwargs, target=target, pipeline=pipe.to_text())
    # the model class and config, so generation can host the kernels in the eager model
    compiled.source_model = model_description(model)
    # the batch-1 decode step, compiled now so that a saved artifact carries it
    step = prepare_fused_step(compiled)
    if step is not None:
        notes.append("batch-1 decode step: one compiled call a token" if not isinstance(step, str)
                     else f"batch-1 decode step runs by module: {step}")
    with torch.no_grad():
        out = built.graph_module(*inputs[0], **inputs[1])
    compiled.report = CompileReport(
        pipeline=pipe.to_text(), target=target, capture_method=cap.method, layers=built.layers,
        max_rel_error=max_relative_error(out, eager),
        max_rel_error_vs_original=max_relative_error(out, original),
        opaque=cap.opaque, notes=[*cap.notes, *notes], pass_seconds=timing.timings,
        capture_seconds=capture_seconds, kernel_seconds=built.kernel_seconds,
        total_seconds=time.perf_counter() - t_start,
    )
    return compiled


def _check_finite_inputs(args: tuple, kwargs: dict, what: str) -> None:
    """Refuse NaN/Inf in floating-point inputs: the compile checks its kernels against eager
    PyTorch on them, and such a check passes or fails on nothing."""
    named = [(f"positional input {i}", v) for i, v in enumerate(args)]
    named += [(f"input {k!r}", v) for k, v in kwargs.items()]
    for name, value in named:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise CompileError(f"{what}: {name} holds {bad} NaN/Inf value(s); pass finite inputs")


def save(compiled: CompiledModule, path: str, tokenizer: Any = None) -> None:
    """Write ``compiled`` as an artifact directory (see ``sparsec/runtime/artifact.py``), with
    ``tokenizer`` (a Hugging Face tokenizer) saved beside it for ``sparsec generate``."""
    from sparsec.runtime.artifact import save_artifact

    save_artifact(compiled, path, tokenizer=tokenizer)


# -- loading artifacts ------------------------------------------------------------------------


def load(path: str) -> CompiledModule:
    """Rebuild the :class:`CompiledModule` saved at ``path`` without compiling or unpickling
    (see ``sparsec/runtime/loader.py``); its ``report`` is the saved :class:`CompileReport`."""
    from sparsec.runtime.loader import load_artifact

    compiled = load_artifact(path)
    if isinstance(compiled.report, dict):
        compiled.report = _report_from_dict(compiled.report)
    return compiled


def _report_from_dict(d: dict) -> CompileReport | None:
    """The CompileReport a manifest recorded (``None`` when it holds none or one of another shape)."""
    from dataclasses import fields

    try:
        known = {f.name for f in fields(CompileReport)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["layers"] = [LayerRecord(**{**x, "shape": tuple(x["shape"])}) for x in d.get("layers", [])]
        kwargs["opaque"] = [OpaquePart(**x) for x in d.get("opaque", [])]
        kwargs["pass_seconds"] = [tuple(x) for x in d.get("pass_seconds", [])]
        return CompileReport(**kwargs)
    except (TypeError, KeyError):
        return None

