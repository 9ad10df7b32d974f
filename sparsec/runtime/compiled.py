"""The runtime: a lowered graph becomes a :class:`CompiledModule` that calls sparse kernels.

:func:`build_compiled` takes the graph after the pass pipeline, builds one kernel per node that
``lower-cpu``/``lower-cuda`` marked (``meta.LOWERING`` + ``meta.PACKED``), swaps each such node
for a call of a :class:`KernelLinear` submodule, folds a fused activation into the kernel, drops
the now unused dense weights, and wraps the graph so that it is called like the original model.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from sparsec.formats.base import PackedWeight
from sparsec.ir import meta


class TargetUnavailableError(RuntimeError):
    """The requested target cannot run here (no GPU, no simulator); the message says what to use."""


class KernelLinear(nn.Module):
    """``y = act(x @ W^T + b)`` by a generated kernel reading a packed weight.

    Holds the packed tensors as buffers (so ``state_dict`` and ``.to()`` see them) and the
    kernel object built for them. Inputs of any float dtype are computed in float32 and returned
    in the input's dtype.
    """

    def __init__(self, layer: str, packed: PackedWeight, kernel: Any, bias: torch.Tensor | None,
                 activation: str | None, target: str, kernel_options: dict | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.packed = packed
        self.kernel = kernel
        self.activation = activation
        self.target = target
        # What the kernel was built with beyond the packed weight (``design``, ``dense_from``):
        # an artifact records it so that loading builds the same kernel.
        self.kernel_options = dict(kernel_options or {})
        self.out_features, self.in_features = packed.shape
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())
        else:
            self.bias = None

    @property
    def design(self) -> str | None:
        """The CUDA bitmask kernel design asked for (None: the code generator's default)."""
        return self.kernel_options.get("design")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Kernels are inference code: they read raw buffers and have no backward.
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"layer {self.layer}: input must be a torch.Tensor, got {type(x).__name__}")
        dtype = x.dtype
        x = x.detach()
        y = self.kernel(x if dtype == torch.float32 else x.float())
        return y if dtype == torch.float32 else y.to(dtype)

    def extra_repr(self) -> str:
        p = self.packed
        return (f"{self.layer}: {p.format_name}/{p.value_type} {self.out_features}x{self.in_features}, "
                f"{p.nbytes()} bytes, target={self.target}, activation={self.activation}")


#: The ``meta.LOWERING`` keys that are options of the kernel builder (only ``lower-cuda`` sets them).
KERNEL_OPTIONS = ("design", "dense_from")


def kernel_builder(target: str):
    """The ``build_linear_kernel`` of a target's code generator."""
    if target == "cpu":
        from sparsec.codegen.cpu import build_linear_kernel

        return build_linear_kernel
    if target == "cuda":
        from sparsec.codegen.cuda import build_linear_kernel, cuda_available

        ok, reason = cuda_available()
        if not ok:
            raise TargetUnavailableError(f"target='cuda' needs an NVIDIA GPU with a working driver: none was found "
                                         f"({reason}); compile with target='cpu'")
        return build_linear_kernel
    raise TargetUnavailableError(f"unknown target {target!r}; use 'cpu' or 'cuda'")


def target_device(target: str) -> torch.device:
    """Where a model compiled for ``target`` runs: the current GPU for ``cuda`` (the CPU under
    numba's CUDA simulator), else the CPU. Call after :func:`kernel_builder` accepted the target."""
    if target == "cuda":
        from sparsec.codegen.cuda.build import device

        return device()
    return torch.device("cpu")


@dataclass
class LayerRecord:
    """What the runtime built for one layer; the compile report's row."""

    name: str
    shape: tuple[int, int]
    format: str
    value_type: str
    nbytes: int
    dense_bytes: int
    sparsity: float
    compile_seconds: float
    max_rel_error: float | None = None


@dataclass
class BuildResult:
    graph_module: fx.GraphModule
    layers: list[LayerRecord] = field(default_factory=list)
    kernel_seconds: float = 0.0


def build_compiled(gm: fx.GraphModule, target: str, verify_inputs: tuple[tuple, dict] | None = None,
                   progress: bool = False) -> BuildResult:
    """Swap lowered nodes for kernel modules in ``gm`` (in place) and return what was built.

    With ``verify_inputs`` every kernel's output is compared during one run with the eager op on
    the same input and the same (masked, quantized) weight; the worst relative error per layer
    lands in :attr:`LayerRecord.max_rel_error`.
    """
    from tqdm.auto import tqdm

    build = kernel_builder(target)
    graph = gm.graph
    lowered = [n for n in graph.nodes if meta.LOWERING in n.meta]
    records: dict[str, LayerRecord] = {}
    replaced: set[str] = set()
    eager: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    result = BuildResult(gm)
    for index, node in enumerate(tqdm(lowered, desc="building kernels", disable=not progress, leave=False)):
        layer = node.meta[meta.LAYER]
        packed: PackedWeight = node.meta[meta.PACKED]
        fusion = node.meta.get(meta.FUSION, {})
        activation = fusion.get("activation")
        bias = gm.get_parameter(layer.bias).detach() if layer.bias else None
        replaced.update(t for t in (layer.weight, layer.bias, node.meta.get(meta.MASK)) if t)
        options = {k: v for k, v in node.meta[meta.LOWERING].items() if k in KERNEL_OPTIONS}
        t0 = time.perf_counter()
        kernel = build(packed, bias=bias, activation=activation, **options)
        seconds = time.perf_counter() - t0
        result.kernel_seconds += seconds
        module_name = f"sparsec_kernel_{index}"
        gm.add_submodule(module_name, KernelLinear(layer.name, packed, kernel, bias, activation, target, options))
        x = node.args[1] if layer.kind == "addmm_t" else node.args[0]
        with graph.inserting_before(node):
            call = graph.call_module(module_name, (x,))
        call.meta.update({k: v for k, v in node.meta.items() if k != meta.PACKED})
        out_node = node
        act_name = fusion.get("activation_node")
        if activation and act_name:
            act = next((n for n in node.users if n.name == act_name), None)
            if act is not None and len(node.users) == 1:
                out_node = act
        out_node.replace_all_uses_with(call)
        if out_node is not node:
            graph.erase_node(out_node)
        graph.erase_node(node)
        if verify_inputs is not None:
            weight = layer.matrix(gm).detach()
            if meta.MASK in node.meta:
                weight = weight * layer.as_matrix(gm.get_buffer(node.meta[meta.MASK]))
            eager[module_name] = (weight.double(), None if bias is None else bias.double())
        n = packed.rows * packed.cols
        zeros = _count_zeros(packed)
        records[module_name] = LayerRecord(layer.name, packed.shape, packed.format_name, packed.value_type,
                                           packed.nbytes(), n * 4, zeros / max(1, n), seconds)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    if verify_inputs is not None and records:
        _verify_layers(gm, verify_inputs, eager, records)
    _drop_unused_parameters(gm, replaced)
    result.layers = list(records.values())
    return result


def _count_zeros(packed: PackedWeight) -> int:
    return int((packed.unpack() == 0).sum().item())


_ACTIVATIONS = {
    None: lambda y: y,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
}


def _verify_layers(gm: fx.GraphModule, inputs: tuple[tuple, dict],
                   eager: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                   records: dict[str, LayerRecord]) -> None:
    """One run of ``gm``; each kernel's output against ``act(x @ W^T + b)`` in float64."""
    handles = []

    def check(name: str):
        def hook(module: KernelLinear, args, out):
            w, b = eager[name]
            ref = args[0].detach().double() @ w.t()
            if b is not None:
                ref = ref + b
            ref = _ACTIVATIONS[module.activation](ref)
            scale = ref.abs().max().item() or 1.0
            err = (out.detach().double() - ref).abs().max().item() / scale
            rec = records[name]
            rec.max_rel_error = max(rec.max_rel_error or 0.0, err)
        return hook

    for name in records:
        handles.append(gm.get_submodule(name).register_forward_hook(check(name)))
    try:
        with torch.no_grad():
            args, kwargs = inputs
            gm(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()


def _drop_unused_parameters(gm: fx.GraphModule, replaced: set[str]) -> None:
    """Delete the dense weights, biases and masks of lowered layers that nothing reads any more.

    Only names in ``replaced`` (what a :class:`KernelLinear` now holds a packed copy of) are
    candidates. One stays when the graph still reads it: by a ``get_attr`` of it (a tied weight
    used by another op), or through a module the graph calls (``call_module`` of a leaf such as
    ``nn.LayerNorm`` or ``nn.Embedding`` reads its own parameters, which no ``get_attr`` names).
    """
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}

    def still_read(fqn: str) -> bool:
        if fqn in used or any(u.startswith(fqn + ".") for u in used):
            return True
        return any(fqn.startswith(m + ".") for m in called)

    for fqn in sorted(replaced):
        if still_read(fqn):
            continue
        owner_name, _, attr = fqn.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        else:
            owner._buffers.pop(attr, None)


class CompiledModule(nn.Module):
    """A compiled model: call it like the original one.

    ``report`` is the :class:`~sparsec.api.CompileReport` of the compile that built it. For graphs
    captured with ``torch.export`` positional inputs are bound to the model's parameter names and
    keyword inputs fixed at capture (``use_cache=False``) are filled in.
    """

    def __init__(self, graph_module: fx.GraphModule, *, method: str, input_names: list[str],
                 constant_kwargs: dict, target: str, pipeline: str, report: Any = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.method = method
        self.input_names = list(input_names)
        self.constant_kwargs = dict(constant_kwargs)
        self.target = target
        self.pipeline = pipeline
        self.report = report

    @property
    def device(self) -> torch.device:
        """Where the model runs; tensor inputs are moved here, outputs stay here. A graph with
        no tensor of its own (every layer a kernel without bias) runs where its target does."""
        from sparsec.ir.device import graph_device

        device = graph_device(self.graph_module, default=None)
        return device if device is not None else target_device(self.target)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from sparsec.capture import bind_inputs
        from sparsec.ir.device import to_device

        if self.target != "cpu":
            args, kwargs = to_device((args, kwargs), self.device)
        if self.method != "export":
            return self.graph_module(*args, **kwargs)
        _, bound = bind_inputs(self.method, self.input_names, self.constant_kwargs, args, kwargs)
        try:
            return self.graph_module(**bound)
        except Exception as e:
            if "keyword mismatch" in str(e) or "kwarg" in str(e):
                expected = [p for p in inspect.signature(self.graph_module.forward).parameters]
                raise TypeError(f"this model was compiled for inputs {expected}; got {sorted(bound)}. "
                                f"Recompile with example inputs that have the same keys") from None
            raise

    def kernels(self) -> list[KernelLinear]:
        return [m for m in self.graph_module.modules() if isinstance(m, KernelLinear)]
