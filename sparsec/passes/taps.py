"""``insert-taps``: expose the output of every repeated block (decoder/encoder layer) of a graph.

Distillation on intermediate representations (SquareHead, ``sparsec/finetune/losses.py``) needs
the teacher and the student to hand out matching hidden states. Captured graphs keep, on every
node, the module it came from (``node.meta["nn_module_stack"]``, written by both
``symbolic_trace`` and ``torch.export``), so the blocks are found without model-specific code:

* automatically: module names of the form ``PREFIX.N`` (a ``ModuleList``/``Sequential`` child:
  ``model.layers.3``, ``transformer.h.3``, ``encoder.layer.3``) whose ``PREFIX`` has at least two
  indices; lists nested inside such a block (``...layers.3.experts.0``) are not blocks. Several
  top-level lists (an encoder and a decoder) all count, in graph order;
* or by comma-separated glob patterns over module names (``blocks="model.layers.*"``); only the
  outermost matching modules count, so ``*`` reaching into a block's children is harmless.

A block's output is the last node (in graph order) computed inside the block whose value is used
outside it: the residual sum of a pre-norm decoder layer, the final LayerNorm of a BERT layer,
the call itself when the block is an opaque ``call_module``. It is marked with
:data:`sparsec.ir.meta.BLOCK_OUTPUT` (the block's position, 0-based) and the graph returns::

    (original_output, (h_1, ..., h_L))

``original_output`` is exactly what the graph returned before (for ``torch.export`` graphs the
same pytree, e.g. a ``CausalLMOutputWithPast``); ``h_l`` is the output of block ``l``. The
embedding output is not a tap. :func:`split_tapped` takes such an output apart and
:func:`remove_taps` restores the original return value (the marks stay on the nodes).

Example::

    gm = capture(model, example).graph_module
    gm, _ = run_passes(gm, [make_pass("insert-taps")], PassContext())
    logits_out, hidden = split_tapped(gm(input_ids=ids, use_cache=False))
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.graph import _PyTreeCodeGen

from sparsec.ir import meta
from sparsec.passes.base import Pass, PassContext, PassResult, register_pass

#: ``gm.meta`` key under which a tapped GraphModule records its block names (in tap order).
TAPS_KEY = "sparsec.taps"

_INDEXED = re.compile(r"^(?P<prefix>.+)\.(?P<index>\d+)$")


class TapError(ValueError):
    """Block patterns that match nothing, or a graph whose blocks cannot be found."""


# -- finding blocks ------------------------------------------------------------------------------


def _normalize_fqn(name: str) -> str:
    # Dynamo-style stack entries read ``L['self'].model.layers[0]``; make them ``model.layers.0``.
    name = re.sub(r"^L\['self'\]\.?", "", name)
    name = re.sub(r"\[(\d+)\]", r".\1", name)
    name = re.sub(r"\['([^']+)'\]", r".\1", name)
    return name.strip(".")


def module_path(node: fx.Node) -> list[str]:
    """Fully qualified names of the modules ``node`` was computed in, outermost first.

    A ``call_module`` node (a leaf or opaque submodule call) also belongs to its own module.
    """
    names = []
    for value in (node.meta.get("nn_module_stack") or {}).values():
        fqn = value[0] if isinstance(value, tuple) else value
        if isinstance(fqn, str):
            fqn = _normalize_fqn(fqn)
            if fqn:
                names.append(fqn)
    if node.op == "call_module" and isinstance(node.target, str) and node.target not in names:
        names.append(node.target)
    return names


def _all_modules(gm: fx.GraphModule) -> dict[str, int]:
    """Module name -> position of its first node, for every module some node was computed in."""
    seen: dict[str, int] = {}
    for pos, node in enumerate(gm.graph.nodes):
        for name in module_path(node):
            seen.setdefault(name, pos)
    return seen


def _outermost(names: list[str]) -> list[str]:
    chosen = set(names)
    return [n for n in names if not any(n.startswith(other + ".") for other in chosen if other != n)]


def auto_blocks(gm: fx.GraphModule) -> list[str]:
    """Names of the repeated blocks of ``gm`` (see the module docstring), in graph order."""
    modules = _all_modules(gm)
    by_prefix: dict[str, set[str]] = {}
    for name in modules:
        m = _INDEXED.match(name)
        if m:
            by_prefix.setdefault(m.group("prefix"), set()).add(name)
    lists = [p for p, members in by_prefix.items() if len(members) >= 2]
    # A list inside a block of another list (mixture-of-experts, per-layer sub-lists) is part of
    # that block, not a sequence of blocks of its own.
    top = [p for p in lists if not any(p.startswith(q + ".") for q in lists if q != p)]
    blocks = [name for p in top for name in by_prefix[p]]
    return sorted(blocks, key=lambda n: modules[n])


def pattern_blocks(gm: fx.GraphModule, patterns: str) -> list[str]:
    """Outermost module names matching comma-separated glob ``patterns``, in graph order.
    Every pattern must match; the error shows what the module names look like."""
    modules = _all_modules(gm)
    names = list(modules)
    chosen: list[str] = []
    for pattern in [p.strip() for p in patterns.split(",") if p.strip()]:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            examples = ", ".join(repr(n) for n in (auto_blocks(gm)[:2] or names[:3]))
            raise TapError(f"block pattern {pattern!r} matches no module of the graph; module names look "
                           f"like {examples or '(the graph records no module names)'}")
        chosen += [h for h in hits if h not in chosen]
    return sorted(_outermost(chosen), key=lambda n: modules[n])


def _is_float_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val", node.meta.get("example_value"))
    if val is None:
        return True  # symbolic_trace records no values; trust the structure
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def block_outputs(gm: fx.GraphModule, blocks: str = "") -> list[tuple[str, fx.Node]]:
    """``[(block name, output node)]`` in graph order; ``blocks`` as in :class:`InsertTaps`."""
    names = pattern_blocks(gm, blocks) if blocks.strip() else auto_blocks(gm)
    if not names:
        raise TapError("found no repeated blocks (no module named like PREFIX.0, PREFIX.1, ...); "
                       "name them with blocks=\"PATTERN\", e.g. blocks=\"model.layers.*\"")
    wanted = set(names)
    members: dict[str, list[fx.Node]] = {n: [] for n in names}
    for node in gm.graph.nodes:
        for name in module_path(node):
            if name in wanted:
                members[name].append(node)
    outputs = []
    for name in names:
        inside = set(members[name])
        leaving = [n for n in members[name]
                   if _is_float_tensor(n) and any(u not in inside for u in n.users)]
        if not leaving:
            raise TapError(f"block {name!r} has no floating-point value used outside it; "
                           f"choose other blocks with blocks=\"PATTERN\"")
        outputs.append((name, leaving[-1]))
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    outputs.sort(key=lambda item: position[item[1]])
    return outputs


# -- rewriting the output --------------------------------------------------------------------------


def is_tapped(gm: fx.GraphModule) -> bool:
    return TAPS_KEY in getattr(gm, "meta", {})


def tap_names(gm: fx.GraphModule) -> list[str]:
    """Block names of a tapped graph, in the order of its hidden states (empty if untapped)."""
    return list(getattr(gm, "meta", {}).get(TAPS_KEY, []))


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def insert_taps(gm: fx.GraphModule, blocks: str = "") -> list[str]:
    """Mark block outputs and make ``gm`` return ``(original_output, hidden_states)``.

    Returns the block names in tap order. Re-tapping a tapped graph replaces the old taps.
    Raises :class:`TapError` (leaving ``gm`` untouched) when no block is found.
    """
    found = block_outputs(gm, blocks)
    if is_tapped(gm):
        remove_taps(gm)
    for node in gm.graph.nodes:
        node.meta.pop(meta.BLOCK_OUTPUT, None)
    taps = []
    for index, (_, node) in enumerate(found):
        node.meta[meta.BLOCK_OUTPUT] = index
        taps.append(node)
    out = _output_node(gm)
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        # torch.export graphs return a flat list of leaves that the codegen folds back into the
        # model's own output type; append the taps as extra leaves and extend the spec to
        # (original, (h_1, ..., h_L)).
        leaves = list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
        info = codegen.pytree_info
        original = pytree.tree_unflatten([0] * info.out_spec.num_leaves, info.out_spec)
        spec = pytree.tree_structure((original, tuple(range(len(taps)))))
        out.args = (tuple(leaves + taps),)
        codegen.pytree_info = info._replace(out_spec=spec)
        gm.meta[TAPS_KEY + ".spec"] = info.out_spec
    else:
        out.args = ((out.args[0], tuple(taps)),)
    gm.meta[TAPS_KEY] = [name for name, _ in found]
    gm.graph.lint()
    gm.recompile()
    return [name for name, _ in found]


def remove_taps(gm: fx.GraphModule) -> None:
    """Undo :func:`insert_taps`: the graph returns its original output again (marks stay)."""
    if not is_tapped(gm):
        return
    out = _output_node(gm)
    codegen = gm.graph._codegen
    count = len(gm.meta[TAPS_KEY])
    if isinstance(codegen, _PyTreeCodeGen):
        leaves = list(out.args[0])
        out.args = (tuple(leaves[: len(leaves) - count]),)
        codegen.pytree_info = codegen.pytree_info._replace(out_spec=gm.meta.pop(TAPS_KEY + ".spec"))
    else:
        out.args = (out.args[0][0],)
    del gm.meta[TAPS_KEY]
    gm.recompile()


def split_tapped(output: Any) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """``(original_output, hidden_states)`` of a tapped graph's return value."""
    if (not isinstance(output, tuple) or len(output) != 2 or not isinstance(output[1], tuple)
            or not all(isinstance(h, torch.Tensor) for h in output[1])):
        raise TapError("this model's output carries no block taps; run the insert-taps pass on it first")
    return output[0], output[1]


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output: a tensor, an object with ``.logits``, a tuple/list
    whose first element is one of those, or a tapped output (see :func:`split_tapped`)."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], tuple):
        output = output[0]
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


# -- the pass --------------------------------------------------------------------------------------


@register_pass
@dataclass
class InsertTaps(Pass):
    """Mark every repeated block's output (meta BLOCK_OUTPUT) and return them: (output, (h_1..h_L)).

    Options: ``blocks`` comma-separated glob patterns over module names (``model.layers.*``);
    empty finds the repeated blocks automatically. A pattern that matches nothing is an error.
    """

    name: ClassVar[str] = "insert-taps"
    #: the original output is returned unchanged, as the first element
    preserves_numerics: ClassVar[bool] = True
    blocks: str = ""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        insert_taps(gm, self.blocks)
        return PassResult(gm, modified=True)
