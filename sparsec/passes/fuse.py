"""``fuse-epilogue``: mark what each linear kernel can compute in its epilogue; an analysis pass.

A kernel that already holds a row's dot product can add the bias and apply an activation before
writing it out, saving a full read and write of the output per fused op. This pass finds, for
every linear layer (``linear`` and GPT-2 style ``addmm_t``):

* ``bias``: the op adds a bias parameter;
* ``activation``: the op's only user is ReLU, GELU (exact erf form) or SiLU, in any of the
  spellings captures produce (``torch.relu``, ``F.gelu``, ``aten.silu.default``, ``nn.GELU()``
  modules left by ``symbolic_trace``...); ``activation_node`` names that node. A tanh-approximated
  GELU is not fused (the kernels compute the erf form), nor an activation whose input is also
  used elsewhere (the pre-activation value must still be written);
* SwiGLU pairs: ``silu(gate(x)) * up(x)`` where ``gate`` and ``up`` read the same ``x``. The gate
  layer records ``swiglu_partner`` = the up layer's name, the up layer the gate's, both with
  ``swiglu_role`` (``"gate"``/``"up"``) and ``swiglu_node`` (the multiplication), so a lowering
  can run both projections in one kernel that writes ``silu(g) * u`` once.

It writes ``meta.FUSION = {"bias", "activation", "activation_node", "swiglu_partner",
"swiglu_role", "swiglu_node"}`` on every linear node and changes nothing else: the runtime swaps
a fused layer and its activation node for one kernel call (``runtime/compiled.py``).

Example: ``prune-magnitude{sparsity=0.5},fuse-epilogue,lower-cpu``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F

from sparsec.ir import meta
from sparsec.passes.base import Pass, PassContext, PassResult, register_pass

_aten = torch.ops.aten

_FUNCTIONS = {
    torch.relu: "relu",
    F.relu: "relu",
    _aten.relu.default: "relu",
    F.gelu: "gelu",
    _aten.gelu.default: "gelu",
    F.silu: "silu",
    _aten.silu.default: "silu",
    torch.nn.functional.silu: "silu",
}
_MODULES = {torch.nn.ReLU: "relu", torch.nn.GELU: "gelu", torch.nn.SiLU: "silu"}
_METHODS = {"relu": "relu"}
_MUL = {operator.mul, torch.mul, _aten.mul.Tensor}


def activation_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """``"relu" | "gelu" | "silu"`` when ``node`` applies that activation to its first input, else None.

    GELU counts only in its exact (erf) form; in-place variants are not recognised.
    """
    if node.op == "call_function" and node.target in _FUNCTIONS:
        name = _FUNCTIONS[node.target]
        if name == "gelu":
            approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            if approximate != "none":
                return None
        if node.kwargs.get("inplace") or (node.target is F.relu and len(node.args) > 1 and node.args[1]):
            return None
        return name
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        name = _MODULES.get(type(module))
        if name == "gelu" and getattr(module, "approximate", "none") != "none":
            return None
        if getattr(module, "inplace", False):
            return None
        return name
    if node.op == "call_method" and node.target in _METHODS:
        return _METHODS[node.target]
    return None


def _layer_input(node: fx.Node) -> fx.Node | None:
    layer = node.meta[meta.LAYER]
    x = node.args[1] if layer.kind == "addmm_t" else node.args[0]
    return x if isinstance(x, fx.Node) else None


@register_pass
@dataclass
class FuseEpilogue(Pass):
    """Record bias, activation (ReLU/GELU/SiLU) and SwiGLU gate/up pairs each linear kernel can fuse."""

    name: ClassVar[str] = "fuse-epilogue"
    preserves_numerics: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        layers = [n for n in gm.graph.nodes if n.meta.get(meta.LAYER) is not None]
        linears = [n for n in layers if n.meta[meta.LAYER].kind in ("linear", "addmm_t")]
        records: dict[fx.Node, dict] = {}
        for node in linears:
            layer = node.meta[meta.LAYER]
            rec = {
                "bias": layer.bias is not None,
                "activation": None,
                "activation_node": None,
                "swiglu_partner": None,
                "swiglu_role": None,
                "swiglu_node": None,
            }
            users = list(node.users)
            if len(users) == 1:
                act = activation_of(gm, users[0])
                if act is not None and users[0].args and users[0].args[0] is node:
                    rec["activation"], rec["activation_node"] = act, users[0].name
            records[node] = rec
        for gate, rec in records.items():
            if rec["activation"] != "silu":
                continue
            act = next(iter(gate.users))
            for mul in act.users:
                if not (mul.op == "call_function" and mul.target in _MUL and len(mul.args) == 2):
                    continue
                other = mul.args[1] if mul.args[0] is act else mul.args[0]
                if not isinstance(other, fx.Node) or other not in records or other is gate:
                    continue
                if _layer_input(other) is None or _layer_input(other) is not _layer_input(gate):
                    continue
                if len(other.users) != 1 or records[other]["swiglu_partner"] is not None:
                    continue
                rec.update(swiglu_partner=other.meta[meta.LAYER].name, swiglu_role="gate", swiglu_node=mul.name)
                records[other].update(swiglu_partner=gate.meta[meta.LAYER].name, swiglu_role="up", swiglu_node=mul.name)
                break
        for node, rec in records.items():
            node.meta[meta.FUSION] = rec
        return PassResult(gm, modified=False)
