"""Pass infrastructure: passes, their options, the registry, the context, and instruments.

A pass is a small dataclass with a kebab-case ``name`` whose fields are its typed options::

    @register_pass
    @dataclass
    class PruneMagnitude(Pass):
        '''Zero the smallest-magnitude weights of each chosen layer.'''
        name: ClassVar[str] = "prune-magnitude"
        sparsity: float = 0.5

        def run(self, gm, ctx):
            ...
            return PassResult(gm, modified=True)

Options are parsed from pipeline text by their annotation (``float``, ``int``, ``bool``, ``str``,
optionally ``| None``); :meth:`Pass.validate` rejects impossible values when the pass is built,
before any graph is touched. :func:`run_passes` runs a list of passes under a
:class:`PassContext`: it recompiles the graph after each pass, calls the context's instruments
around each pass, and re-raises any failure as :class:`PassError` naming the pass and the passes
that ran before it.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.fx as fx


class PassError(RuntimeError):
    """A pass failed; the message names it and the passes that ran before it."""


class PassOptionError(ValueError):
    """A pass was given an unknown option or an impossible value."""


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph module and whether it changed anything."""

    graph_module: fx.GraphModule
    modified: bool


class Pass:
    """Base class of every pass. Subclasses are dataclasses; their fields are the options.

    Contract: ``run(gm, ctx)`` may mutate ``gm`` in place or return a new module; it must leave
    ``gm`` consistent (the manager lints and recompiles it afterwards). Analyses only write
    ``node.meta`` and return ``modified=False``.
    """

    name: ClassVar[str] = ""
    #: True when the pass must not change what the model computes (checked by NumericCheck).
    preserves_numerics: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`PassOptionError` for impossible option values. Called on construction."""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    # -- options ---------------------------------------------------------------------------

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]

    @classmethod
    def option_types(cls) -> dict[str, type]:
        hints = typing.get_type_hints(cls)
        return {f.name: _base_type(hints[f.name]) for f in cls.option_fields()}

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring: the one-line description ``sparsec passes`` shows."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.option_fields()}

    def explicit_options(self) -> list[str]:
        """Names of options given explicitly (in the order given), for faithful printing."""
        return list(getattr(self, "_explicit", [f.name for f in self.option_fields()
                                                 if getattr(self, f.name) != _default(f)]))

    def to_text(self, full: bool = False) -> str:
        """This pass in pipeline syntax: ``name{opt=value,...}``; ``full`` prints every option."""
        names = [f.name for f in self.option_fields()] if full else self.explicit_options()
        if not names:
            return self.name
        body = ",".join(f"{n}={format_option_value(getattr(self, n))}" for n in names)
        return f"{self.name}{{{body}}}"

    def __str__(self) -> str:
        return self.to_text()


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _base_type(hint: Any) -> type:
    """``float | None`` -> ``float``; plain types pass through."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def format_option_value(value: Any) -> str:
    """Print an option value so that :func:`parse_option_value` reads it back unchanged."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if text == "" or any(c in text for c in ',{}="\' ') or text.lower() in ("none", "true", "false"):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return text


def parse_option_value(pass_cls: type[Pass], option: str, raw: str, quoted: bool) -> Any:
    """Convert the raw text of an option to the option's declared type, or raise with a hint."""
    typ = pass_cls.option_types()[option]
    if not quoted and raw.lower() == "none":
        return None
    try:
        if typ is bool:
            low = raw.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        return raw
    except ValueError:
        raise PassOptionError(
            f"option '{option}' of {pass_cls.name} expects {typ.__name__}, got {raw!r}"
        ) from None


# -- registry ------------------------------------------------------------------------------------

_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: register a pass under its ``name``; a second pass of that name is an error."""
    name = getattr(cls, "name", "")
    if not name or name != name.lower() or " " in name or "_" in name:
        raise ValueError(f"pass {cls.__qualname__} needs a kebab-case `name`, got {name!r}")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"pass {name!r} ({cls.__qualname__}) must be a @dataclass so its options are typed")
    if name in _PASSES and _PASSES[name] is not cls:
        raise ValueError(f"pass name {name!r} is already registered by {_PASSES[name].__module__}."
                         f"{_PASSES[name].__qualname__}")
    _PASSES[name] = cls
    return cls


def unregister_pass(name: str) -> None:
    """Remove a registered pass (for tests and plug-ins that replace one deliberately)."""
    _PASSES.pop(name, None)


def pass_class(name: str) -> type[Pass]:
    """The pass registered as ``name``; an error suggesting the closest names otherwise."""
    try:
        return _PASSES[name]
    except KeyError:
        raise PassOptionError(f"unknown pass {name!r}{suggest(name, _PASSES)}") from None


def registered_passes() -> dict[str, type[Pass]]:
    return dict(sorted(_PASSES.items()))


def suggest(name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def make_pass(name: str, **options: Any) -> Pass:
    """Build a registered pass from Python values, remembering which options were given."""
    cls = pass_class(name)
    known = cls.option_types()
    for key in options:
        if key not in known:
            raise PassOptionError(f"{name} has no option {key!r}{suggest(key, known)}; "
                                  f"options: {', '.join(known) or '(none)'}")
    p = cls(**options)
    p._explicit = list(options)  # type: ignore[attr-defined]
    return p


# -- context and instruments ----------------------------------------------------------------------


class PassInstrument:
    """Hooks called around every pass. Override what you need."""

    def on_pipeline_start(self, passes: list[Pass], gm: fx.GraphModule, ctx: PassContext) -> None:
        pass

    def before_pass(self, p: Pass, index: int, gm: fx.GraphModule, ctx: PassContext) -> None:
        pass

    def after_pass(self, p: Pass, index: int, result: PassResult, ctx: PassContext) -> None:
        pass


@dataclass
class PassContext:
    """Configuration and instruments shared by every pass of one pipeline run.

    ``example_inputs`` are ``(args, kwargs)`` used for numeric checks; ``calibration`` is a list
    of such ``(args, kwargs)`` pairs for data-driven passes (SparseGPT, Wanda, GPTQ).
    ``config`` holds free-form settings (e.g. ``target``); ``disabled`` names passes to skip.
    """

    target: str = "cpu"
    example_inputs: tuple[tuple, dict] | None = None
    calibration: list[tuple[tuple, dict]] | None = None
    instruments: list[PassInstrument] = field(default_factory=list)
    disabled: set[str] = field(default_factory=set)
    config: dict[str, Any] = field(default_factory=dict)
    progress: bool = False

    def instrument(self, kind: type) -> Any:
        """The first instrument of ``kind``, or None."""
        return next((i for i in self.instruments if isinstance(i, kind)), None)


class PassTiming(PassInstrument):
    """Wall time of every pass, in run order: ``timings = [(pass text, seconds)]``."""

    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []
        self._t0 = 0.0

    def before_pass(self, p, index, gm, ctx):
        self._t0 = time.perf_counter()

    def after_pass(self, p, index, result, ctx):
        self.timings.append((p.to_text(), time.perf_counter() - self._t0))

    def table(self) -> str:
        width = max([len(t) for t, _ in self.timings] + [4])
        lines = [f"{'pass':<{width}}  seconds"]
        lines += [f"{t:<{width}}  {s:7.3f}" for t, s in self.timings]
        lines.append(f"{'total':<{width}}  {sum(s for _, s in self.timings):7.3f}")
        return "\n".join(lines)


class DumpGraph(PassInstrument):
    """Write the graph's generated Python after each pass (or only after ``only`` passes) to
    ``directory/NNN_<pass-name>.py``, numbered by position in the pipeline."""

    def __init__(self, directory: str | Path, only: typing.Iterable[str] | None = None) -> None:
        self.directory = Path(directory)
        self.only = set(only) if only is not None else None
        self.written: list[Path] = []

    def on_pipeline_start(self, passes, gm, ctx):
        if self.directory.exists() and not self.directory.is_dir():
            raise PassError(f"cannot write graph dumps to {self.directory}: it is a file; give a directory")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PassError(f"cannot write graph dumps to {self.directory}: {e.strerror or e}; give a writable "
                            f"directory") from None
        self._write(gm, "000_captured.py", "captured graph")

    def after_pass(self, p, index, result, ctx):
        if self.only is None or p.name in self.only:
            self._write(result.graph_module, f"{index + 1:03d}_{p.name}.py", p.to_text())

    def _write(self, gm: fx.GraphModule, filename: str, title: str) -> None:
        path = self.directory / filename
        try:
            path.write_text(f"# after: {title}\n{gm.code}")
        except OSError as e:
            raise PassError(f"cannot write graph dump {path}: {e.strerror or e}; give a writable directory") from None
        self.written.append(path)


class NumericCheck(PassInstrument):
    """After each pass, run the graph on the context's example inputs and record the max
    relative error against the eager reference output; a pass that promises to preserve numerics
    and exceeds ``tolerance`` raises (so the failing pass is named)."""

    def __init__(self, reference: Any, tolerance: float = 1e-4) -> None:
        self.reference = reference
        self.tolerance = tolerance
        self.errors: list[tuple[str, float]] = []

    def after_pass(self, p, index, result, ctx):
        if ctx.example_inputs is None:
            return
        args, kwargs = ctx.example_inputs
        with torch.no_grad():
            out = result.graph_module(*args, **kwargs)
        err = max_relative_error(out, self.reference)
        self.errors.append((p.to_text(), err))
        if p.preserves_numerics and err > self.tolerance:
            raise PassError(f"pass '{p.name}' changed the model's output: max relative error "
                            f"{err:.3g} > tolerance {self.tolerance:g}")


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict) or hasattr(x, "items"):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def max_relative_error(out: Any, ref: Any) -> float:
    """max |out - ref| / max |ref| over every floating tensor of two matching output structures."""
    worst = 0.0
    for a, b in zip(_tensors(out), _tensors(ref)):
        if not (a.is_floating_point() and b.is_floating_point()):
            continue
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        scale = b.abs().max().item() or 1.0
        worst = max(worst, (a - b).abs().max().item() / scale)
    return worst


# -- running --------------------------------------------------------------------------------------


def run_passes(gm: fx.GraphModule, passes: list[Pass], ctx: PassContext,
               on_progress: Callable[[Pass], None] | None = None) -> tuple[fx.GraphModule, list[PassResult]]:
    """Run ``passes`` in order on ``gm``; see the module docstring for the guarantees."""
    for inst in ctx.instruments:
        inst.on_pipeline_start(passes, gm, ctx)
    results: list[PassResult] = []
    done: list[str] = []
    for index, p in enumerate(passes):
        if p.name in ctx.disabled:
            continue
        for inst in ctx.instruments:
            inst.before_pass(p, index, gm, ctx)
        try:
            result = p.run(gm, ctx)
            if not isinstance(result, PassResult):
                raise TypeError(f"run() returned {type(result).__name__}, not PassResult")
            result.graph_module.graph.lint()
            result.graph_module.recompile()
            for inst in ctx.instruments:
                inst.after_pass(p, index, result, ctx)
        except PassError as e:
            if str(e).startswith(f"pass '{p.name}'"):
                raise PassError(f"{e} (after {_after(done)})") from e
            raise PassError(f"pass '{p.name}' failed (after {_after(done)}): {e}") from e
        except Exception as e:  # noqa: BLE001 - re-raised with the pass named
            raise PassError(f"pass '{p.name}' failed (after {_after(done)}): {e}") from e
        gm = result.graph_module
        results.append(result)
        done.append(p.name)
        if on_progress is not None:
            on_progress(p)
    return gm, results


def _after(done: list[str]) -> str:
    return ", ".join(done) if done else "no earlier pass"
