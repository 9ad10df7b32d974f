"""Find the weighted ops of a captured graph, whatever the capture path produced.

Capture (``sparsec/capture.py``) normalizes graphs so that every weighted op is a
``call_function`` whose weight arrives through a ``get_attr`` node (possibly through the mask
multiplication that pruning inserts). Three op shapes exist in practice:

==================  =====================================================  ==================
kind                ops                                                    weight layout
==================  =====================================================  ==================
``linear``          ``F.linear``, ``aten.linear.default``                  ``[out, in]``
``addmm_t``         ``torch.addmm``/``aten.addmm.default`` (GPT-2 Conv1D)  ``[in, out]``
``conv``            ``F.conv1d/2d``, ``aten.conv1d/2d.default``            ``[out, in/g, k...]``
==================  =====================================================  ==================

Passes work on the *matrix view* ``[out, in']`` of each weight (transposed for ``addmm_t``,
flattened over ``in/g x kernel`` for convolutions) and map masks back to the parameter layout
with :meth:`WeightedLayer.to_param_layout`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from sparsec.ir import meta

_aten = torch.ops.aten

LINEAR_TARGETS = {F.linear, _aten.linear.default}
ADDMM_TARGETS = {torch.addmm, _aten.addmm.default}
CONV_TARGETS = {
    F.conv1d, F.conv2d, F.conv3d,
    _aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default,
}
MUL_TARGETS = {operator.mul, torch.mul, _aten.mul.Tensor}


@dataclass(frozen=True)
class WeightedLayer:
    """A weighted op of the graph.

    ``name`` is the owning module's fully qualified name (``model.layers.0.mlp.up_proj``),
    ``weight``/``bias`` the parameters' fully qualified names, ``kind`` one of
    ``linear | addmm_t | conv``, and ``shape`` the matrix view ``(out, in)``.
    """

    name: str
    weight: str
    bias: str | None
    kind: str
    shape: tuple[int, int]
    node_name: str

    def matrix(self, gm: torch.nn.Module) -> torch.Tensor:
        """The weight as an ``[out, in]`` matrix (a view where the layout allows)."""
        return self.as_matrix(gm.get_parameter(self.weight))

    def as_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """Map a tensor in the parameter's layout to the ``[out, in]`` matrix view."""
        if self.kind == "addmm_t":
            return tensor.t()
        if self.kind == "conv":
            return tensor.reshape(tensor.shape[0], -1)
        return tensor

    def to_param_layout(self, matrix: torch.Tensor, param_shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`as_matrix`: an ``[out, in]`` matrix back to the parameter layout."""
        if self.kind == "addmm_t":
            return matrix.t().contiguous()
        return matrix.reshape(param_shape).contiguous()


def weight_source(node: fx.Node, position: int) -> fx.Node | None:
    """The ``get_attr`` node feeding argument ``position`` of ``node``, looking through a mask
    multiplication (``weight * mask``) that pruning may have inserted."""
    if len(node.args) <= position or not isinstance(node.args[position], fx.Node):
        return None
    src = node.args[position]
    if src.op == "call_function" and src.target in MUL_TARGETS and MASK_INPUT in src.meta:
        src = src.args[0]
    return src if src.op == "get_attr" else None


#: meta flag on the ``mul`` node that applies a mask, so it can be found and looked through.
MASK_INPUT = "sparsec.mask_input"


def _param(gm: torch.nn.Module, target: str) -> torch.Tensor | None:
    try:
        return gm.get_parameter(target)
    except AttributeError:
        try:
            t = gm.get_buffer(target)
        except AttributeError:
            return None
        return t


def _layer_for(gm: fx.GraphModule, node: fx.Node) -> WeightedLayer | None:
    if node.op != "call_function":
        return None
    if node.target in LINEAR_TARGETS:
        kind, wpos, bpos = "linear", 1, 2
    elif node.target in ADDMM_TARGETS:
        kind, wpos, bpos = "addmm_t", 2, 0
    elif node.target in CONV_TARGETS:
        kind, wpos, bpos = "conv", 1, 2
    else:
        return None
    wnode = weight_source(node, wpos)
    if wnode is None:
        return None
    weight = _param(gm, wnode.target)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() < 2:
        return None
    bias = None
    braw = node.args[bpos] if len(node.args) > bpos else node.kwargs.get("bias")
    if isinstance(braw, fx.Node) and braw.op == "get_attr":
        bias = braw.target
    if kind == "addmm_t":
        shape = (weight.shape[1], weight.shape[0])
    elif kind == "conv":
        shape = (weight.shape[0], weight[0].numel())
    else:
        shape = (weight.shape[0], weight.shape[1])
    name = wnode.target.rsplit(".", 1)[0] if "." in wnode.target else wnode.target
    return WeightedLayer(name=name, weight=wnode.target, bias=bias, kind=kind, shape=shape, node_name=node.name)


def find_layers(gm: fx.GraphModule) -> list[WeightedLayer]:
    """Every weighted op of ``gm`` in graph order; also records it under ``meta.LAYER``.

    A weight used by several ops (tied weights) is reported once per op; passes that modify
    weights must treat such layers together (see :func:`shared_weights`).
    """
    layers = []
    for node in gm.graph.nodes:
        layer = _layer_for(gm, node)
        if layer is not None:
            node.meta[meta.LAYER] = layer
            layers.append(layer)
    return layers


def layer_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Map from layer (module) name to its op node, for nodes annotated by :func:`find_layers`."""
    return {n.meta[meta.LAYER].name: n for n in gm.graph.nodes if meta.LAYER in n.meta}


def shared_weights(layers: list[WeightedLayer]) -> dict[str, list[str]]:
    """Weights used by more than one op: ``{weight_fqn: [layer names]}``."""
    by_weight: dict[str, list[str]] = {}
    for layer in layers:
        by_weight.setdefault(layer.weight, []).append(layer.name)
    return {w: names for w, names in by_weight.items() if len(names) > 1}
