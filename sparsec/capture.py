"""Capture: a PyTorch model becomes a ``torch.fx.GraphModule`` that passes can rewrite.

Two paths, chosen per model (``method="auto"``):

* ``symbolic_trace`` for plain ``nn.Module`` code. A submodule whose ``forward`` cannot be traced
  (data-dependent control flow, unsupported Python) is kept as an opaque leaf call; the capture
  still succeeds and :attr:`Capture.opaque` says which part and why.
* ``torch.export`` for Hugging Face transformers models (their code does not survive
  ``symbolic_trace`` in transformers 5.x) and as the fallback when the root module's own forward
  cannot be symbolically traced. Decoders are exported with ``use_cache=False``; the batch and
  sequence dimensions of tensor inputs are dynamic, so the captured graph accepts other shapes.

Either way the graph is normalized so that every weighted op is a ``call_function`` whose weight
comes from a ``get_attr`` node (see ``sparsec/ir/layers.py``): ``nn.Linear`` and ``nn.Conv*``
module calls are rewritten into ``F.linear`` / ``F.conv*`` calls on the module's parameters.

Contract: capture never modifies ``model``; the captured module shares ``model``'s parameters
(the caller copies the model first when passes must not touch the user's weights).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsec.errors import first_line
from sparsec.ir import meta
from sparsec.ir.layers import find_layers


class CaptureError(RuntimeError):
    """The model could not be captured by any path; the message names the op and the remedy."""


@dataclass
class OpaquePart:
    """A submodule kept as an opaque call: its weights are invisible to the passes."""

    name: str
    module_type: str
    reason: str


@dataclass
class Capture:
    """The result of capture: the graph plus what a caller needs to run it like the model."""

    graph_module: fx.GraphModule
    method: str
    example_args: tuple
    example_kwargs: dict
    #: keyword inputs that were fixed at capture (``use_cache=False``); filled in on every call.
    constant_kwargs: dict = field(default_factory=dict)
    #: names of the model's forward parameters, to bind positional inputs for exported graphs.
    input_names: list[str] = field(default_factory=list)
    opaque: list[OpaquePart] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def bind_inputs(method: str, input_names: list[str], constant_kwargs: dict, args: tuple,
                kwargs: dict) -> tuple[tuple, dict]:
    """Call inputs as the captured graph takes them.

    Exported graphs take keyword inputs only: positional inputs are bound to the model's
    parameter names and the keyword inputs fixed at capture (``use_cache=False``) are filled in.
    Symbolically traced graphs take the model's own calling convention unchanged.
    """
    if method != "export":
        return tuple(args), dict(kwargs)
    if len(args) > len(input_names):
        raise TypeError(f"expected at most {len(input_names)} positional inputs, got {len(args)}")
    bound = dict(zip(input_names, args))
    for key, value in kwargs.items():
        if key in bound:
            raise TypeError(f"input {key!r} given twice")
        bound[key] = value
    for key, value in constant_kwargs.items():
        if key in bound and bound[key] != value:
            raise ValueError(f"this model was captured with {key}={value!r}; recompile to change it")
        bound[key] = value
    return (), bound


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple of args, a dict of kwargs, or an ``(args, kwargs)`` pair."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 2
            and isinstance(example_inputs[0], (tuple, list)) and isinstance(example_inputs[1], dict)):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example_inputs must be a tensor, a tuple of tensors, a dict of keyword inputs or an "
        f"(args, kwargs) pair; got {type(example_inputs).__name__}"
    )


def is_transformers_model(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)


def capture(model: nn.Module, example_inputs: Any, method: str = "auto") -> Capture:
    """Capture ``model`` as a normalized GraphModule (see the module docstring).

    ``method`` is ``"auto"``, ``"symbolic_trace"`` or ``"export"``. Raises :class:`CaptureError`
    with one sentence naming what failed and what to change.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if method not in ("auto", "symbolic_trace", "export"):
        raise CaptureError(f"unknown capture method {method!r}; use auto, symbolic_trace or export")
    args, kwargs = normalize_inputs(example_inputs)
    _check_model_runs(model, args, kwargs)
    hf = is_transformers_model(model)
    tried: list[str] = []
    if method == "symbolic_trace" or (method == "auto" and not hf):
        try:
            gm, opaque = _symbolic_trace(model)
            cap = Capture(gm, "symbolic_trace", args, kwargs, opaque=opaque)
            return _finish(cap)
        except _RootNotTraceable as e:
            tried.append(f"symbolic_trace: {e}")
            if method == "symbolic_trace":
                raise CaptureError(f"symbolic_trace failed in {type(model).__name__}.forward itself: {e}; "
                                   f"try method='export'") from None
    try:
        return _finish(_export(model, args, kwargs, hf))
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - turned into one clear sentence below
        tried.append(f"torch.export: {_error_line(e)}")
        raise CaptureError(
            f"could not capture {type(model).__name__}: " + "; ".join(tried)
            + ". Wrap the untraceable code in its own submodule, or pass example inputs the model accepts"
        ) from None


def _check_model_runs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Run the model once eagerly: example inputs it rejects would make any capture meaningless."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported as one sentence
        raise CaptureError(f"could not capture {type(model).__name__}: the model itself fails on the example inputs "
                           f"({_error_line(e)}); pass inputs the model accepts") from None


# -- symbolic_trace with opaque leaves -------------------------------------------------------------


class _RootNotTraceable(Exception):
    pass


class _OpaqueTracer(fx.Tracer):
    """A tracer that turns any submodule whose forward fails to trace into a leaf call."""

    def __init__(self) -> None:
        super().__init__()
        self.opaque: list[OpaquePart] = []

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if self.is_leaf_module(m, self.path_of_module(m)):
            return super().call_module(m, forward, args, kwargs)
        # Remember where the graph ended so a failed trace of this submodule can be rolled back.
        last = self.graph._root.prev  # type: ignore[attr-defined]
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # noqa: BLE001 - the submodule becomes opaque, reported below
            created = []
            node = self.graph._root.prev  # type: ignore[attr-defined]
            while node is not last:
                created.append(node)
                node = node.prev
            for node in created:  # newest first, so users go before their inputs
                if not node.users:
                    self.graph.erase_node(node)
            name = self.path_of_module(m)
            self.opaque.append(OpaquePart(name, type(m).__name__, _error_line(e)))
            proxy = self.create_proxy("call_module", name, args, kwargs)
            proxy.node.meta[meta.OPAQUE] = _error_line(e)
            return proxy


def _symbolic_trace(model: nn.Module) -> tuple[fx.GraphModule, list[OpaquePart]]:
    tracer = _OpaqueTracer()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - the root forward itself is not traceable
        raise _RootNotTraceable(_error_line(e)) from None
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    return gm, tracer.opaque


# -- torch.export ------------------------------------------------------------------------------


def _export(model: nn.Module, args: tuple, kwargs: dict, hf: bool) -> Capture:
    from torch.export import Dim

    kwargs = dict(kwargs)
    constants: dict[str, Any] = {}
    notes: list[str] = []
    config = getattr(model, "config", None)
    if hf and getattr(config, "use_cache", False) and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
        notes.append("exported with use_cache=False (decoding with a KV cache runs the kernels in eager mode)")
    for key, value in kwargs.items():
        if not isinstance(value, torch.Tensor):
            constants[key] = value

    def dyn(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            # Batch and sequence dimensions vary between calls; feature dims never do.
            dims = min(value.dim(), 2) if value.dtype in (torch.long, torch.int, torch.bool) else 1
            return {i: Dim.AUTO for i in range(dims)}
        return None

    dynamic = {"args": tuple(dyn(a) for a in args), "kwargs": {k: dyn(v) for k, v in kwargs.items()}}
    # torch.export specializes any dimension of size 1, so a batch-1 example would yield a graph
    # that only accepts batch 1: trace on the example repeated to size 2 along dynamic dimensions.
    args = tuple(_widen(a, d) for a, d in zip(args, dynamic["args"]))
    kwargs = {k: _widen(v, dynamic["kwargs"][k]) for k, v in kwargs.items()}
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, args, kwargs, strict=False,
                                     dynamic_shapes=_dynamic_for_signature(model, dynamic))
    finally:
        model.train(was_training)
    gm = ep.module()
    names = [p for p in inspect.signature(model.forward).parameters if p not in ("self",)]
    return Capture(gm, "export", args, kwargs, constant_kwargs=constants, input_names=names, notes=notes)


def _widen(value: Any, dims: dict | None) -> Any:
    if not isinstance(value, torch.Tensor) or not dims:
        return value
    for dim in dims:
        if value.shape[dim] == 1:
            value = torch.cat([value, value], dim=dim)
    return value


def _dynamic_for_signature(model: nn.Module, dynamic: dict) -> Any:
    """torch.export wants dynamic_shapes keyed like the forward signature when kwargs are used."""
    params = [p for p in inspect.signature(model.forward).parameters.values()]
    args_d, kwargs_d = dynamic["args"], dynamic["kwargs"]
    if not kwargs_d:
        return args_d
    out: dict[str, Any] = {}
    for p, spec in zip(params, args_d):
        out[p.name] = spec
    out.update(kwargs_d)
    return out


# -- normalization -----------------------------------------------------------------------------


def _finish(cap: Capture) -> Capture:
    _functionalize_weighted_modules(cap.graph_module)
    find_layers(cap.graph_module)
    return cap


_CONV_FUNCS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def _functionalize_weighted_modules(gm: fx.GraphModule) -> None:
    """Rewrite ``call_module`` nodes of nn.Linear / nn.Conv* into functional calls on get_attr
    parameters, so every pass sees one op shape (see ``sparsec/ir/layers.py``)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or meta.OPAQUE in node.meta:
            continue
        mod = gm.get_submodule(node.target)
        fwd = type(mod).forward
        if fwd is nn.Linear.forward:
            func, extra = F.linear, ()
        elif type(mod) in _CONV_FUNCS and fwd is type(mod).forward and mod.padding_mode == "zeros":
            func = _CONV_FUNCS[type(mod)]
            extra = (mod.stride, mod.padding, mod.dilation, mod.groups)
        else:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        with graph.inserting_before(node):
            w = graph.get_attr(f"{node.target}.weight")
            b = graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            call = graph.call_function(func, (node.args[0], w, b, *extra))
        call.meta.update({k: v for k, v in node.meta.items() if not k.startswith("sparsec.")})
        call.meta["sparsec.module_type"] = type(mod).__name__
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e)}"[:300]
