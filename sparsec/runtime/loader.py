"""Loading artifacts: the graph from JSON, weights from safetensors, kernels from object code.

:func:`load_artifact` turns a directory written by :func:`sparsec.runtime.artifact.save_artifact`
back into a :class:`~sparsec.runtime.compiled.CompiledModule`:

1. the manifest is read and every file checked against its sha256 (:func:`read_manifest`), the
   versions that produced it against this environment (:func:`check_compatible`);
2. the CPU kernels' object code is linked (:mod:`sparsec.codegen.cpu.aot`): a CPU without the
   features it was compiled for, other kernel sources or a symbol this process lacks is refused
   before anything runs; CUDA kernels are rebuilt from their cubin or PTX and installed in the
   kernel cache (:mod:`sparsec.codegen.cuda.aot`): no GPU, a GPU that neither the cubin nor the
   PTX serves, other kernel sources or another numba-cuda is refused;
3. the graph is rebuilt node by node from ``graph.json`` (:func:`decode_graph`): operator targets
   are looked up by name (``aten::linear.default``, ``_operator:getitem``) in an allow-list of
   modules, tensors come from ``weights.safetensors``;
4. each kernel module is rebuilt from its packed tensors and bound to the linked kernels.

Nothing is unpickled (no ``pickle``, no ``torch.load``) and no kernel is compiled (the GPU driver
compiles PTX when it loads it on a GPU other than the one the cubin was built for).
``graph.py`` in the artifact is the same graph as Python source, for people; it is never executed.

The JSON form of a graph (:func:`encode_graph`) covers what ``torch.export`` and
``symbolic_trace`` produce for the models sparsec compiles: ``placeholder``/``get_attr``/
``call_function``/``call_method``/``call_module``/``output`` nodes whose arguments are nodes,
numbers, strings, ``None``, dtypes, devices, layouts, memory formats, slices and containers of
those; ``call_module`` targets are kernel modules or parameter-light ``torch.nn`` modules. Anything
else is refused at save time, naming the node. The export-generated input guard module is not
kept (its code is generated at export); an input outside the captured shape range fails inside
an operator instead of at the guard.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from sparsec.runtime.artifact import (
    GRAPH_JSON,
    KERNEL_DIR,
    WEIGHTS,
    ArtifactError,
    read_manifest,
    versions,
)

GRAPH_FORMAT = 1

#: modules whose functions a saved graph may call (plus the builtins in ``_BUILTINS``).
_FUNCTION_MODULES = ("torch", "_operator", "operator", "math")
_BUILTINS = frozenset({"getattr", "len", "int", "float", "bool", "slice", "range", "tuple", "list", "max",
                       "min", "abs", "sum", "round"})
#: modules whose classes a saved pytree spec may name (Hugging Face model outputs and containers).
_SPEC_MODULES = ("transformers", "torch", "collections", "builtins")


class GraphCodecError(ArtifactError):
    """A graph that cannot be written as (or read back from) JSON; names the node and why."""


# --------------------------------------------------------------------------- values


_LAYOUTS = {str(v): v for v in (torch.strided, torch.sparse_coo, torch.sparse_csr, torch._mkldnn)}
_MEMORY_FORMATS = {str(v): v for v in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d,
                                       torch.preserve_format)}


def _encode_value(v: Any, where: str) -> Any:
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.layout):
        return {"layout": str(v)}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v)}
    if isinstance(v, torch.Size):
        return {"size": [_encode_value(x, where) for x in v]}
    if isinstance(v, slice):
        return {"slice": [_encode_value(x, where) for x in (v.start, v.stop, v.step)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    if isinstance(v, tuple):
        return {"tuple": [_encode_value(x, where) for x in v]}
    if isinstance(v, list):
        return [_encode_value(x, where) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise GraphCodecError(f"{where}: a dict argument with non-string keys cannot be saved")
        return {"dict": {k: _encode_value(x, where) for k, x in v.items()}}
    raise GraphCodecError(f"{where}: an argument of type {type(v).__name__} cannot be saved in an artifact; "
                          f"keep such values out of the compiled graph")


def _decode_value(v: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(v, list):
        return [_decode_value(x, nodes) for x in v]
    if not isinstance(v, dict):
        return v
    if len(v) != 1:
        raise GraphCodecError(f"graph.json: unknown value {v!r}")
    (kind, x), = v.items()
    if kind == "node":
        if x not in nodes:
            raise GraphCodecError(f"graph.json: node {x!r} is used before it is defined")
        return nodes[x]
    if kind == "float":
        return float(x)
    if kind == "dtype":
        dtype = getattr(torch, str(x), None)
        if not isinstance(dtype, torch.dtype):
            raise GraphCodecError(f"graph.json: unknown dtype {x!r}")
        return dtype
    if kind == "device":
        return torch.device(x)
    if kind == "layout":
        return _LAYOUTS[x]
    if kind == "memory_format":
        return _MEMORY_FORMATS[x]
    if kind == "size":
        return torch.Size([_decode_value(e, nodes) for e in x])
    if kind == "slice":
        return slice(*[_decode_value(e, nodes) for e in x])
    if kind == "ellipsis":
        return Ellipsis
    if kind == "tuple":
        return tuple(_decode_value(e, nodes) for e in x)
    if kind == "dict":
        return {k: _decode_value(e, nodes) for k, e in x.items()}
    raise GraphCodecError(f"graph.json: unknown value kind {kind!r}")


# --------------------------------------------------------------------------- call targets


def _resolve_function(module: str, qualname: str) -> Any:
    if module == "builtins":
        if qualname not in _BUILTINS:
            raise GraphCodecError(f"graph.json calls builtins.{qualname}, which artifacts may not call")
        return getattr(builtins, qualname)
    if not any(module == m or module.startswith(m + ".") for m in _FUNCTION_MODULES):
        raise GraphCodecError(f"graph.json calls a function of module {module!r}; artifacts may only call "
                              f"functions of {', '.join(_FUNCTION_MODULES)} and a few builtins")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError:
        raise GraphCodecError(f"graph.json calls {module}.{qualname}, but {module} does not import here") from None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise GraphCodecError(f"graph.json calls {module}.{qualname}, which this torch does not have; "
                                  f"recompile the model with this environment")
    return obj


def _encode_target(node: fx.Node) -> Any:
    t = node.target
    if node.op != "call_function":
        return t
    if isinstance(t, torch._ops.OpOverload):
        return {"op": [t.namespace, t._opname, t._overloadname]}
    if isinstance(t, torch._ops.OpOverloadPacket):
        ns, _, name = t._qualified_op_name.partition("::")
        return {"op_packet": [ns, name]}
    module = getattr(t, "__module__", None)
    # torch's C functions report a qualname inside a private class; their plain name is public
    names = [n for n in (getattr(t, "__qualname__", None), getattr(t, "__name__", None)) if n]
    if module is None or not names:
        raise GraphCodecError(f"node {node.name}: calls {t!r}, which has no importable name")
    error = None
    for name in dict.fromkeys(names):
        try:
            if _resolve_function(module, name) is t:
                return {"function": [module, name]}
        except GraphCodecError as e:
            error = e
    if error is not None and ("may only call" in str(error) or "may not call" in str(error)):
        raise GraphCodecError(f"node {node.name}: {error}") from None
    raise GraphCodecError(f"node {node.name}: {module}.{names[0]} does not name the function the graph calls, "
                          f"so an artifact cannot refer to it")


def _decode_target(op: str, target: Any) -> Any:
    if op != "call_function":
        if not isinstance(target, str):
            raise GraphCodecError(f"graph.json: a {op} node needs a string target, got {target!r}")
        return target
    if not isinstance(target, dict) or len(target) != 1:
        raise GraphCodecError(f"graph.json: unknown call target {target!r}")
    (kind, x), = target.items()
    if kind in ("op", "op_packet"):
        ns = getattr(torch.ops, x[0])
        packet = getattr(ns, x[1], None)
        if packet is None:
            raise GraphCodecError(f"graph.json calls {x[0]}::{x[1]}, which this torch does not have; recompile")
        if kind == "op_packet":
            return packet
        overload = getattr(packet, x[2], None)
        if overload is None:
            raise GraphCodecError(f"graph.json calls {x[0]}::{x[1]}.{x[2]}, which this torch does not have; "
                                  f"recompile")
        return overload
    if kind == "function":
        return _resolve_function(x[0], x[1])
    raise GraphCodecError(f"graph.json: unknown call target kind {kind!r}")


# --------------------------------------------------------------------------- modules


def _is_guards_module(mod: nn.Module) -> bool:
    return type(mod).__name__ == "GuardsFn" and type(mod).__module__.startswith("torch.export")


def _encode_torch_module(name: str, mod: nn.Module) -> dict:
    """A stateless-config ``torch.nn`` module (activations, norms, dropout, embedding...): its
    class and the plain attributes its forward reads; parameters and buffers go to the weights."""
    cls = type(mod)
    if not cls.__module__.startswith("torch.nn.") or list(mod.children()):
        raise GraphCodecError(f"module {name} ({cls.__module__}.{cls.__qualname__}) cannot be saved in an "
                              f"artifact: only kernel modules and leaf torch.nn modules can")
    attrs = {}
    for key, value in vars(mod).items():
        if key.startswith("_") or key == "training":
            continue
        try:
            attrs[key] = _encode_value(value, f"module {name}.{key}")
        except GraphCodecError:
            raise GraphCodecError(f"module {name} ({cls.__qualname__}) holds {key} of type {type(value).__name__}, "
                                  f"which an artifact cannot store") from None
    return {"torch_module": [cls.__module__, cls.__qualname__], "attrs": attrs,
            "parameters": [k for k, v in mod._parameters.items() if v is not None],
            "buffers": [k for k, v in mod._buffers.items() if v is not None]}


def _decode_torch_module(name: str, desc: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    module, qualname = desc["torch_module"]
    if not module.startswith("torch.nn."):
        raise GraphCodecError(f"graph.json: module {name} is of class {module}.{qualname}, not a torch.nn module")
    cls = _resolve_function(module, qualname)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise GraphCodecError(f"graph.json: {module}.{qualname} is not a torch.nn module class")
    mod = cls.__new__(cls)
    nn.Module.__init__(mod)
    for key, value in desc["attrs"].items():
        setattr(mod, key, _decode_value(value, {}))
    for key in desc["parameters"]:
        mod.register_parameter(key, nn.Parameter(_tensor(tensors, f"{name}.{key}"), requires_grad=False))
    for key in desc["buffers"]:
        mod.register_buffer(key, _tensor(tensors, f"{name}.{key}"))
    return mod.eval()


def _tensor(tensors: dict[str, torch.Tensor], path: str) -> torch.Tensor:
    key = f"graph.{path}"
    if key not in tensors:
        raise ArtifactError(f"{WEIGHTS} lacks the tensor {key!r} that the graph reads; the artifact is damaged: "
                            f"recompile it")
    return tensors[key]


# --------------------------------------------------------------------------- graphs


def _spec_modules(spec_json: Any) -> set[str]:
    """Modules named by the ``type`` fields of a serialized pytree spec."""
    out: set[str] = set()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            t = x.get("type")
            if isinstance(t, str) and "." in t:
                out.add(t.rpartition(".")[0])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(spec_json)
    return out


def encode_graph(gm: fx.GraphModule, kernel_modules: set[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON description of ``gm`` and the tensors its nodes read (keyed by attribute path).

    ``kernel_modules``: names of the kernel submodules, recorded by reference (the artifact's
    layer list rebuilds them). Raises :class:`GraphCodecError` naming the first node that cannot
    be described.
    """
    from torch.fx.graph import _PyTreeCodeGen
    from torch.utils._pytree import treespec_dumps

    nodes: list[dict] = []
    modules: dict[str, dict] = {}
    attrs: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for node in gm.graph.nodes:
        where = f"node {node.name} ({node.op} {node.target})"
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if _is_guards_module(mod) and not node.users:
                dropped.append(node.name)
                continue
            if node.target in kernel_modules:
                modules[node.target] = {"kernel": node.target}
            elif node.target not in modules:
                modules[node.target] = _encode_torch_module(node.target, mod)
                for key in (*modules[node.target]["parameters"], *modules[node.target]["buffers"]):
                    tensors[f"{node.target}.{key}"] = getattr(mod, key)
        elif node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if not isinstance(obj, torch.Tensor):
                raise GraphCodecError(f"{where}: reads a {type(obj).__name__}; artifacts only store tensor attributes")
            attrs[node.target] = "parameter" if isinstance(obj, nn.Parameter) else "buffer"
            tensors[node.target] = obj
        nodes.append({"op": node.op, "name": node.name, "target": _encode_target(node),
                      "args": _encode_value(node.args, where), "kwargs": _encode_value(node.kwargs, where)})
    codegen = None
    if isinstance(gm.graph._codegen, _PyTreeCodeGen):
        info = gm.graph._codegen.pytree_info
        codegen = {"pytree": {"orig_args": list(info.orig_args),
                              "in_spec": None if info.in_spec is None else treespec_dumps(info.in_spec),
                              "out_spec": None if info.out_spec is None else treespec_dumps(info.out_spec)}}
    elif type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise GraphCodecError(f"the graph uses a {type(gm.graph._codegen).__name__} code generator, which artifacts "
                              f"cannot store")
    desc = {"graph_format": GRAPH_FORMAT, "class_name": type(gm).__name__.removesuffix("Impl") or "GraphModule",
            "nodes": nodes, "modules": modules, "attributes": attrs, "codegen": codegen, "dropped": dropped}
    return desc, tensors


def decode_graph(desc: dict, tensors: dict[str, torch.Tensor], kernels: dict[str, nn.Module]) -> fx.GraphModule:
    """Rebuild the GraphModule that :func:`encode_graph` described, with ``tensors`` (``graph.*``
    entries of the weights file) and the rebuilt ``kernels`` (module name -> module)."""
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
    from torch.utils._pytree import treespec_loads

    version = desc.get("graph_format") if isinstance(desc, dict) else None
    if version != GRAPH_FORMAT:
        raise GraphCodecError(f"{GRAPH_JSON} has graph format {version!r}, this sparsec reads {GRAPH_FORMAT}; "
                              f"recompile the artifact")
    root: dict[str, Any] = {}
    for path, kind in desc["attributes"].items():
        t = _tensor(tensors, path)
        root[path] = nn.Parameter(t, requires_grad=False) if kind == "parameter" else t
    for name, mdesc in desc["modules"].items():
        if "kernel" in mdesc:
            if name not in kernels:
                raise ArtifactError(f"the graph calls kernel module {name}, which the manifest does not list; "
                                    f"the artifact is damaged: recompile it")
            root[name] = kernels[name]
        else:
            root[name] = _decode_torch_module(name, mdesc, tensors)
    graph = fx.Graph()
    made: dict[str, fx.Node] = {}
    for nd in desc["nodes"]:
        op = nd["op"]
        if op not in ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output"):
            raise GraphCodecError(f"graph.json: unknown node op {op!r}")
        target = _decode_target(op, nd["target"])
        args = _decode_value(nd["args"], made)
        kwargs = _decode_value(nd["kwargs"], made)
        if op == "output":
            made[nd["name"]] = graph.output(args[0])
        else:
            made[nd["name"]] = graph.create_node(op, target, tuple(args), dict(kwargs), name=nd["name"])
    codegen = desc.get("codegen")
    if codegen is not None:
        info = codegen["pytree"]
        for spec in (info["in_spec"], info["out_spec"]):
            for modname in _spec_modules(json.loads(spec) if spec else None):
                if not any(modname == m or modname.startswith(m + ".") for m in _SPEC_MODULES):
                    raise GraphCodecError(f"graph.json names output type module {modname!r}, which artifacts may not "
                                          f"import")
                importlib.import_module(modname)
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(
            info["orig_args"], treespec_loads(info["in_spec"]) if info["in_spec"] else None,
            treespec_loads(info["out_spec"]) if info["out_spec"] else None))
    graph.lint()
    return fx.GraphModule(root, graph, str(desc.get("class_name") or "GraphModule"))


# --------------------------------------------------------------------------- load


#: versions an artifact must share with the loading environment.
_CHECKED_VERSIONS = ("sparsec", "python", "torch", "numba", "llvmlite")


def check_compatible(manifest: dict) -> None:
    """Refuse an artifact saved by other versions of what it depends on (one sentence per mismatch)."""
    saved = manifest.get("versions", {})
    here = versions()
    bad = [f"{k} {saved.get(k)!s} (this environment has {here[k]})" for k in _CHECKED_VERSIONS
           if saved.get(k) != here[k]]
    if bad:
        raise ArtifactError("the artifact was saved with " + ", ".join(bad) + "; recompile the model in this "
                            "environment (sparsec.compile, then sparsec.save), or install the versions it names")


def load_artifact(path: str | os.PathLike) -> Any:
    """Rebuild the :class:`~sparsec.runtime.compiled.CompiledModule` saved at ``path``.

    Raises :class:`ArtifactError` for a missing, damaged or hand-edited file, other versions, a CPU
    lacking the kernels' features, or a graph this sparsec cannot rebuild; the artifact is never
    modified. The result's ``report`` is the saved compile report as a dict, ``load_seconds`` says
    how long loading took and ``kernel_load`` what linking did.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ArtifactError(f"an artifact is loaded from a directory path (str or os.PathLike), got "
                            f"{type(path).__name__}")
    t0 = time.perf_counter()
    with _one_torch_thread():
        compiled = _load(Path(path))
    compiled.load_seconds = time.perf_counter() - t0
    return compiled


def _load_cuda_kernels(section: dict, folder: Path) -> Any:
    """Rebuild and install a CUDA artifact's kernels from their saved GPU code (no compiling)."""
    from sparsec.codegen.cuda import cuda_available
    from sparsec.codegen.cuda.aot import MODE, CudaAotError, load_kernels
    from sparsec.runtime.compiled import TargetUnavailableError

    if section.get("mode") != MODE:
        raise ArtifactError(f"the manifest's kernels section has mode {section.get('mode')!r}, not {MODE!r}: a CUDA "
                            f"artifact must hold GPU code; recompile it")
    ok, why = cuda_available()
    if ok and why:  # the simulator runs Python, not the saved GPU code
        ok = False
    if not ok:
        raise TargetUnavailableError(
            f"this artifact holds GPU code for {section.get('arch')} and needs an NVIDIA GPU with a working driver "
            f"to load: none was found ({why.rstrip('.')}); compile the model with target='cpu' to run it here")
    try:
        return load_kernels(section, folder)
    except CudaAotError as e:
        raise ArtifactError(str(e)) from None


@contextlib.contextmanager
def _one_torch_thread():
    """Loading runs hundreds of small checks and copies (one set per layer): torch's intra-op
    threads cost more than they save there, and on a busy machine a reduction waits for a thread
    that is not scheduled (measured on SmolLM2-135M: 1.1 s single-threaded, 4.4 s with two threads
    on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cuda_designs() -> tuple[str, ...]:
    from sparsec.codegen.cuda import BITMASK_DESIGNS

    return BITMASK_DESIGNS


def _load(root: Path) -> Any:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from sparsec.codegen.cpu.aot import AotError
    from sparsec.formats.base import FormatError, format_class
    from sparsec.ir.device import move_graph
    from sparsec.runtime.compiled import CompiledModule, KernelLinear, kernel_builder, target_device

    manifest = read_manifest(root)
    check_compatible(manifest)
    target = manifest.get("target")
    kernel_section = manifest.get("kernels") or {}
    linked = None
    if target == "cpu" and kernel_section.get("mode") == "object":
        from sparsec.codegen.cpu.aot import load_kernels

        try:
            linked = load_kernels(kernel_section, root / KERNEL_DIR)
        except AotError as e:
            raise ArtifactError(str(e)) from None
    if target == "cuda":
        linked = _load_cuda_kernels(kernel_section, root / KERNEL_DIR)
    build = kernel_builder(target)
    try:
        tensors = load_file(str(root / WEIGHTS))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ArtifactError(f"{root / WEIGHTS} cannot be read ({e}); the artifact is damaged: recompile it") from None
    try:
        desc = json.loads((root / GRAPH_JSON).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{root / GRAPH_JSON} cannot be read ({e}); the artifact is damaged: "
                            f"recompile it") from None
    kernels: dict[str, nn.Module] = {}
    for layer in manifest["layers"]:
        name = layer["module"]
        prefix = f"kernel.{name}"
        own = {k: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        try:
            packed = format_class(layer["format"]).from_tensors(prefix, own, **layer.get("options", {}))
        except FormatError as e:
            raise ArtifactError(f"layer {layer['layer']}: {e}; the artifact is damaged: recompile it") from None
        bias = _tensor(tensors, f"{name}.bias") if layer.get("bias") else None
        design = layer.get("design")
        if design is not None and (target != "cuda" or design not in _cuda_designs()):
            raise ArtifactError(f"layer {layer['layer']}: kernel design {design!r} is not one sparsec builds for "
                                f"target {target!r}; the manifest was edited: recompile the model")
        options = {"design": design} if design is not None else {}
        if "dense_from" in layer:
            dense_from = layer["dense_from"]
            if target != "cuda" or not (dense_from is None or (type(dense_from) is int and dense_from >= 1)):
                raise ArtifactError(f"layer {layer['layer']}: dense_from {dense_from!r} is not a row count sparsec "
                                    f"records for target {target!r}; the manifest was edited: recompile the model")
            options["dense_from"] = dense_from
        kernel = build(packed, bias=bias, activation=layer.get("activation"), **options)
        kernels[name] = KernelLinear(layer["layer"], packed, kernel, bias, layer.get("activation"), target, options)
    if target == "cuda":
        from sparsec.codegen.cuda.aot import missing_kernels

        missing = missing_kernels([m.kernel for m in kernels.values()], linked.keys)
        if missing:
            raise ArtifactError(f"the artifact holds no GPU code for kernel {missing[0]} (of {len(missing)} missing) "
                                f"that its layers launch; the artifact is damaged or incomplete: recompile it")
    gm = decode_graph(desc, tensors, kernels)
    gm.eval()
    # safetensors loads on the CPU; the graph's other tensors (biases, norms, embeddings, the
    # devices recorded inside nodes) go where the kernels run, as compile() places them
    device = target_device(target)
    if device.type != "cpu":
        move_graph(gm, device)
    compiled = CompiledModule(gm, method=manifest["capture_method"], input_names=manifest["input_names"],
                              constant_kwargs=manifest["constant_kwargs"], target=target,
                              pipeline=manifest["pipeline"], report=manifest.get("report"))
    compiled.eval()
    compiled.source_model = manifest.get("model")
    compiled.kernel_load = linked
    return compiled


__all__ = ["GraphCodecError", "check_compatible", "decode_graph", "encode_graph", "load_artifact"]
