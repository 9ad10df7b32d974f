"""ONNX export of a pruned (optionally int8-quantized) model, for runtimes other than sparsec's.

ONNX has no operator that reads sparsec's packed formats, so the export is dense: every pruned
weight is written with its zeros in place (the mask already multiplied in), in float32, or as
int8 levels behind a ``DequantizeLinear`` (QDQ, weights only) with ``quantize="int8"``. Steps:

1. the model to export: a :class:`~sparsec.runtime.compiled.CompiledModule` becomes an eager
   twin of its graph whose kernel modules are plain linear layers on the unpacked weights (the
   exact masked, rounded or quantized values the kernels read); any other ``nn.Module`` (pruned
   with masks, e.g. ``torch.nn.utils.prune``) is exported as it is;
2. ``torch.onnx.export(..., dynamo=True)``, with the batch and sequence dimensions dynamic;
3. ``onnx-graphsurgeon``: constant folding (``weight * mask`` and weight transposes become one
   initializer each) and removal of dead nodes and unused initializers;
4. with ``quantize="int8"``: each linear weight initializer is replaced by its int8 levels, a
   per-output-channel float32 scale and a ``DequantizeLinear`` (symmetric, ``scale = max|w|/127``
   per row as sparsec's int8 values; a compiled int8 layer keeps exactly its own levels and
   scales);
5. the file is written atomically and, with ``check=True``, run in onnxruntime on the example
   inputs and compared with eager PyTorch running the same weights (onnxruntime's basic graph
   optimizations: at its full level it may run a ``DequantizeLinear -> MatMul`` pair as an
   integer matmul on dynamically quantized activations, which differs by about 1%).

Node counts on a 2-layer Llama: 713 nodes as exported, 342 after folding (what remains is mostly
shape arithmetic on the dynamic batch and sequence sizes).

    result = sparsec.export_onnx(compiled, {"input_ids": ids}, "model.onnx", quantize="int8")
    print(result.nodes_exported, "->", result.nodes, "nodes;", result.max_abs_error)

Needs the ``onnx``, ``onnxscript``, ``onnx-graphsurgeon`` and ``onnxruntime`` packages.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

QUANTIZE = (None, "int8")


class OnnxExportError(ValueError):
    """The model or the options cannot be exported; the message says what to change."""


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: node counts before and after folding, bytes of weights,
    layers stored as int8, and the largest difference between onnxruntime and eager PyTorch
    (``None`` without ``check``)."""

    path: Path
    inputs: list[str]
    outputs: list[str]
    nodes_exported: int
    nodes: int
    initializer_bytes: int
    quantized_layers: int
    max_abs_error: float | None
    max_rel_error: float | None
    notes: list[str] = field(default_factory=list)


class _Linear(nn.Module):
    """A kernel module's eager twin: ``F.linear`` on the unpacked weight, then the fused activation."""

    _ACT = {None: None, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.float(), self.weight, self.bias)
        act = self._ACT[self.activation]
        return (act(y) if act is not None else y).to(x.dtype)


def _eager_twin(compiled: Any) -> tuple[nn.Module, dict[int, Any]]:
    """The compiled graph with every kernel module replaced by :class:`_Linear`, and the packed
    weight of each twin weight (by ``id``), for quantization."""
    from sparsec.runtime.compiled import KernelLinear

    gm = compiled.graph_module
    root: dict[str, Any] = {}
    packed_of: dict[int, Any] = {}
    graph = copy.deepcopy(gm.graph)
    for node in list(graph.nodes):
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if type(mod).__name__ == "GuardsFn" and not node.users:
                graph.erase_node(node)  # export's input guards: generated code, nothing to export
                continue
            if isinstance(mod, KernelLinear):
                twin = _Linear(mod.packed.unpack(), mod.bias, mod.activation)
                packed_of[id(twin.weight)] = mod.packed
                mod = twin
            root[node.target] = mod
        elif node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            root[node.target] = obj
    graph.lint()
    twin_gm = fx.GraphModule(root, graph, "SparsecOnnxTwin")
    return twin_gm.eval(), packed_of


def _copy_model(model: nn.Module) -> nn.Module:
    """A deep copy (the user's model is never touched). Tensors computed in a forward pre-hook,
    such as ``torch.nn.utils.prune``'s ``weight = weight_orig * weight_mask``, are not leaves and
    refuse ``deepcopy``: their detached values are copied instead (the hook recomputes them)."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo).eval()


class _Flat(nn.Module):
    """Calls ``model`` with the tensor inputs given positionally (names fixed at export) and the
    non-tensor ones fixed, and returns the output's tensors as a flat tuple (ONNX outputs)."""

    def __init__(self, model: nn.Module, names: list[str], positional: int, fixed: dict[str, Any],
                 bind) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.positional = positional
        self.fixed = fixed
        self.bind = bind

    def forward(self, *tensors: torch.Tensor):
        args = tuple(tensors[: self.positional])
        kwargs = {**dict(zip(self.names[self.positional:], tensors[self.positional:])), **self.fixed}
        args, kwargs = self.bind(args, kwargs)
        out = self.model(*args, **kwargs)
        return tuple(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _summary(e: BaseException) -> str:
    """The line that says what went wrong in torch.onnx's long multi-section error messages."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1:]
        if after:
            return after[0][:300]
    return (lines[0] if lines else type(e).__name__)[:300]


def _dynamic(t: torch.Tensor) -> dict[int, Any] | None:
    from torch.export import Dim

    if t.dim() == 0:
        return None
    # batch and sequence dimensions vary; feature dimensions never do
    dims = min(t.dim(), 2) if not t.is_floating_point() else 1
    return {i: Dim.AUTO for i in range(dims)}


def _widen(t: torch.Tensor, dims: dict | None) -> torch.Tensor:
    """torch.export specializes size-1 dimensions: trace on the example repeated to size 2."""
    for d in dims or {}:
        if t.shape[d] == 1:
            t = torch.cat([t, t], dim=d)
    return t


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, quantize: str | None = None,
                opset: int = 18, dynamic: bool = True, check: bool = True) -> OnnxExport:
    """Export ``model`` (a :class:`CompiledModule` or any ``nn.Module``) to the ONNX file ``path``.

    ``example_inputs``: as for :func:`sparsec.compile` (a tensor, a tuple, a dict of keyword inputs
    or ``(args, kwargs)``); tensors become the ONNX inputs, other values are fixed. ``quantize``:
    ``None`` or ``"int8"`` (weight-only QDQ). ``dynamic``: batch and sequence dimensions free.
    ``check``: run the file in onnxruntime and compare with eager PyTorch. The model is never
    modified; ``path`` is replaced only once the new file is complete.
    """
    try:
        import onnx
        import onnx_graphsurgeon as gs
    except ImportError as e:
        raise OnnxExportError(f"ONNX export needs the onnx, onnxscript and onnx-graphsurgeon packages ({e}); "
                              f"pip install onnx onnxscript onnx-graphsurgeon onnxruntime") from None
    from sparsec.capture import bind_inputs, normalize_inputs
    from sparsec.runtime.compiled import CompiledModule

    if quantize not in QUANTIZE:
        raise OnnxExportError(f"quantize must be None or 'int8', got {quantize!r}")
    if not isinstance(model, nn.Module):
        raise OnnxExportError(f"export_onnx needs an nn.Module or a CompiledModule, got {type(model).__name__}")
    dest = Path(path)
    if dest.is_dir():
        raise OnnxExportError(f"{dest} is a directory; give a file path such as {dest / 'model.onnx'}")
    from sparsec.runtime.artifact import default_mode, unwritable_reason

    why = unwritable_reason(dest)
    if why is not None:
        raise OnnxExportError(f"cannot write {dest}: {why}; choose a writable location")
    args, kwargs = normalize_inputs(example_inputs)
    notes: list[str] = []
    packed_of: dict[int, Any] = {}
    if isinstance(model, CompiledModule):
        target, packed_of = _eager_twin(model)
        method, names_in, constants = model.method, model.input_names, model.constant_kwargs

        def bind(a: tuple, k: dict) -> tuple[tuple, dict]:
            return bind_inputs(method, names_in, constants, a, k)
    else:
        target = _copy_model(model)

        def bind(a: tuple, k: dict) -> tuple[tuple, dict]:
            return a, k
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise OnnxExportError("positional example inputs must be tensors; pass other values as keywords")
    tensor_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    fixed = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    names = [f"input_{i}" for i in range(len(args))] + list(tensor_kwargs)
    tensors = [*args, *tensor_kwargs.values()]
    if not tensors:
        raise OnnxExportError("example_inputs hold no tensor; the ONNX model needs at least one input")
    # quantize before the reference run, so that the check compares the same weights
    levels = _prequantize(target, packed_of, notes) if quantize == "int8" else {}
    flat = _Flat(target, names, len(args), fixed, bind).eval()
    try:
        with torch.no_grad():
            reference = flat(*tensors)
    except Exception as e:  # noqa: BLE001 - the user's inputs; one sentence
        raise OnnxExportError(f"the model fails on the example inputs ({_summary(e)}); "
                              f"pass inputs it accepts") from None
    dyn = tuple(_dynamic(t) for t in tensors) if dynamic else None
    traced = tuple(_widen(t, d) for t, d in zip(tensors, dyn)) if dyn else tuple(tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # forward(*tensors) is one varargs input to torch.export: its shapes nest once more
            program = torch.onnx.export(flat, traced, dynamo=True, input_names=names,
                                        dynamic_shapes=(dyn,) if dyn else None, opset_version=opset,
                                        optimize=False, verbose=False)
        except Exception as e:  # noqa: BLE001 - one sentence for the user; --debug shows more
            raise OnnxExportError(f"torch.onnx.export failed: {_summary(e)}") from None
    proto = program.model_proto
    nodes_exported = len(proto.graph.node)
    graph = gs.import_onnx(proto)
    graph.fold_constants().cleanup().toposort()
    quantized = 0
    if quantize == "int8":
        quantized = _quantize_weights(graph, levels, notes)
        graph.cleanup().toposort()
    out_proto = gs.export_onnx(graph)
    out_proto.ir_version = proto.ir_version
    onnx.checker.check_model(out_proto)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    except OSError as e:
        raise OnnxExportError(f"cannot write {dest}: {e.strerror or e}; choose a writable location") from None
    os.close(fd)
    try:
        onnx.save(out_proto, tmp)
        os.chmod(tmp, default_mode(directory=False))  # not mkstemp's private 0600
        os.replace(tmp, dest)
    except OSError as e:
        raise OnnxExportError(f"writing {dest} failed: {e.strerror or e}; free space or choose another "
                              f"location") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    init_bytes = sum(np.asarray(t.values).nbytes for t in graph.tensors().values() if isinstance(t, gs.Constant))
    result = OnnxExport(dest, names, [o.name for o in out_proto.graph.output], nodes_exported,
                        len(out_proto.graph.node), init_bytes, quantized, None, None, notes)
    if check:
        result.max_abs_error, result.max_rel_error = _check(dest, names, tensors, reference)
    return result


def _prequantize(model: nn.Module, packed_of: dict[int, Any], notes: list[str]) -> dict[str, tuple]:
    """Round every linear weight of ``model`` (in place: a copy or the twin) to int8 levels times a
    per-row scale, as sparsec's int8 values; ``{layer: (weight, levels, scales)}``. A compiled
    int8 layer keeps exactly its own levels and scales; masks of ``torch.nn.utils.prune`` are
    made permanent first (the zeros quantize to zero)."""
    from torch.nn.utils import prune

    from sparsec.formats.values import dequantize, quantize

    out: dict[str, tuple] = {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, _Linear)):
            continue
        if hasattr(m, "weight_orig") and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")
        w = m.weight.detach().float()
        packed = packed_of.get(id(m.weight))
        if packed is not None and packed.value_type == "int8":
            levels, scales = quantize(w, "int8", scales=packed.scales)
        else:
            if packed is not None and packed.value_type == "int4":
                notes.append(f"{name}: int4 values re-quantized to int8 per channel for ONNX")
            levels, scales = quantize(w, "int8")
        with torch.no_grad():
            m.weight.copy_(dequantize(levels, "int8", scales))
        out[name] = (m.weight, levels, scales)
    return out


def _quantize_weights(graph: Any, layers: dict[str, tuple], notes: list[str]) -> int:
    """Replace each linear layer's weight initializer (as exported, or transposed) by its int8
    levels behind a per-channel ``DequantizeLinear``. Weights are found by value, so nothing relies
    on how the exporter names them; a layer not found as one initializer stays float32 (noted)."""
    import onnx_graphsurgeon as gs

    def key(a: np.ndarray) -> tuple:
        return a.shape, a.tobytes()[:4096], float(a.sum(dtype=np.float64))

    by_key: dict[tuple, list[tuple[str, bool]]] = {}
    for name, (weight, _, _) in layers.items():
        w = weight.detach().float()
        for transposed, t in ((False, w), (True, w.t())):
            by_key.setdefault(key(t.contiguous().numpy()), []).append((name, transposed))
    found: set[str] = set()
    count = 0
    consts = [t for t in graph.tensors().values()
              if isinstance(t, gs.Constant) and t.values.ndim == 2 and t.values.dtype == np.float32]
    for const in consts:
        a = np.asarray(const.values)
        hit = None
        for name, transposed in by_key.get(key(a), []):
            w = layers[name][0].detach().float()
            if np.array_equal(a, (w.t() if transposed else w).numpy()):
                hit = (name, transposed)
                break
        if hit is None:
            continue
        name, transposed = hit
        _, levels, scales = layers[name]
        q = levels.t().contiguous() if transposed else levels
        base = const.name
        q_const = gs.Constant(f"{base}_int8", np.ascontiguousarray(q.numpy()))
        s_const = gs.Constant(f"{base}_scale", np.ascontiguousarray(scales.numpy().astype(np.float32)))
        z_const = gs.Constant(f"{base}_zero_point", np.zeros(scales.shape[0], dtype=np.int8))
        out = gs.Variable(f"{base}_dequantized", dtype=np.float32, shape=list(a.shape))
        node = gs.Node("DequantizeLinear", name=f"{base}_DequantizeLinear", attrs={"axis": 1 if transposed else 0},
                       inputs=[q_const, s_const, z_const], outputs=[out])
        for user in list(const.outputs):
            for i, t in enumerate(list(user.inputs)):
                if t is const:
                    user.inputs[i] = out
        graph.nodes.append(node)
        found.add(name)
        count += 1
    missing = [n for n in layers if n not in found]
    if missing:
        notes.append(f"left in float32 (weight not found as one initializer): {', '.join(missing)}")
    return count


def _check(path: Path, names: list[str], tensors: list[torch.Tensor], reference: tuple) -> tuple[float, float]:
    """Largest absolute and relative (to the largest reference value) difference between
    onnxruntime and eager PyTorch over every output."""
    import onnxruntime as ort

    # Basic optimizations only: at its full level onnxruntime runs DequantizeLinear -> MatMul as an
    # integer matmul on dynamically quantized activations, a different computation (about 1% off
    # on a small Llama) than the file states; the check is about what the file states.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {n: t.numpy() for n, t in zip(names, tensors)})
    if len(outputs) != len(reference):
        raise OnnxExportError(f"the ONNX model gives {len(outputs)} outputs, eager PyTorch {len(reference)}")
    worst_abs = worst_rel = 0.0
    for got, ref in zip(outputs, reference):
        r = ref.detach().double().numpy()
        diff = float(np.abs(got.astype(np.float64) - r).max()) if r.size else 0.0
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / (float(np.abs(r).max()) or 1.0) if r.size else 0.0)
    return worst_abs, worst_rel
