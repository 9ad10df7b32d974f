"""A captured graph cut at its block boundaries into a chain of stage GraphModules.

Block-wise recovery (``blockwise.py``) trains one block of a model at a time on cached inputs, so
it needs each block as a module of its own: called with the block's inputs, it returns the
block's output. Captured graphs are flat (``torch.export`` inlines every module), so the blocks
are cut out of the graph rather than taken from the eager model; this works for any graph whose
blocks the tap pass finds (``sparsec/passes/taps.py``), whatever the architecture.

The graph's nodes, in graph order, are split into consecutive ranges::

    glue 0 | block 0 | glue 1 | block 1 | ... | block L-1 | tail

A block's range runs from the first node computed inside it to its output (the node
:func:`~sparsec.passes.taps.block_outputs` finds: the residual sum of a decoder layer). Anything
the graph computes between blocks (embeddings, rotary tables, attention masks before block 0) is
glue; the tail (final norm, output head) is not part of any stage, since recovery never needs it.
Every stage is a ``GraphModule`` built over the original graph's root, so it holds the *same*
parameter and buffer objects: training a stage trains the model.

A stage's inputs are the values it reads that an earlier range (or a graph input) produced; its
outputs are the values a later stage reads, and always, for a block, the block's output. Values
are named by the original graph's node names, so two captures of one architecture (a teacher and
its pruned student) name their stage inputs alike.

Example::

    stages = split_at_blocks(gm)
    env = bind_inputs(gm, (), {"input_ids": ids, "use_cache": False})
    for stage in stages:
        env.update(stage.run(env))
    hidden = env[stages[-1].output]            # the last block's output
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from sparsec.passes.calibration import bind_placeholders
from sparsec.passes.taps import block_outputs, module_path


class StageError(ValueError):
    """A graph that cannot be cut into block stages; the message says why."""


@dataclass
class Stage:
    """One range of the graph as a module. ``block`` is the block's position (None for glue)."""

    kind: str  # "glue" or "block"
    block: int | None
    name: str  # the block's module name, or "glue-N"
    module: fx.GraphModule
    inputs: list[str]
    outputs: list[str]
    #: for a block, the node name of its output (also in ``outputs``); "" for glue
    output: str = ""

    def run(self, env: dict[str, Any]) -> dict[str, Any]:
        """Run the stage on ``env`` (node name -> value) and return its outputs by name."""
        values = self.module(*[env[name] for name in self.inputs])
        return dict(zip(self.outputs, values))

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters this stage reads, each once."""
        return list(self.module.parameters())


def _is_value(node: fx.Node) -> bool:
    return node.op not in ("placeholder", "get_attr", "output")


def split_at_blocks(gm: fx.GraphModule, blocks: str = "") -> list[Stage]:
    """Cut ``gm`` into stages (see the module docstring); ``blocks`` as in ``insert-taps``.

    Raises :class:`StageError` when a block's nodes are interleaved with another block's, so no
    contiguous range holds it (the graph was reordered), and TapError when no block is found.
    """
    found = block_outputs(gm, blocks)
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    ranges: list[tuple[str, int | None, str, int, int, str]] = []
    cursor = 0
    for index, (name, out) in enumerate(found):
        members = [n for n in nodes if _is_value(n) and name in module_path(n)]
        start, end = position[members[0]], position[out]
        if start < cursor:
            raise StageError(f"block {name!r} starts before the previous block ends; its nodes are not one "
                             f"contiguous range of the graph, so it cannot be recovered on its own")
        if start > cursor:
            ranges.append(("glue", None, f"glue-{index}", cursor, start, ""))
        ranges.append(("block", index, name, start, end + 1, out.name))
        cursor = end + 1
    tail = cursor
    constant: dict[fx.Node, bool] = {}
    stages = []
    for kind, block, name, lo, hi, out in ranges:
        members = [n for n in nodes[lo:hi] if _is_value(n)]
        if kind == "glue" and all(_from_parameters(n, constant) for n in members):
            continue  # a masked or transposed weight placed before its block: the block computes it
        inside = set(members)
        inputs: list[fx.Node] = []
        for n in members:
            for a in n.all_input_nodes:
                if a not in inside and not _from_parameters(a, constant) and a not in inputs:
                    inputs.append(a)
        # what a later stage reads; the tail (final norm, head) and the graph output are no stage
        outputs = [n for n in members if n.name == out or not _from_parameters(n, constant) and any(
            u not in inside and u.op != "output" and position[u] < tail for u in n.users)]
        stages.append(Stage(kind, block, name, _build(gm, members, inputs, outputs),
                            [n.name for n in inputs], [n.name for n in outputs], out))
    return stages


def _from_parameters(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """Whether ``node`` is computed from parameters and buffers alone (a transposed or masked
    weight): a stage recomputes such values itself, so that gradients reach the parameters."""
    if node not in memo:
        if node.op == "get_attr":
            memo[node] = True
        elif node.op in ("placeholder", "output") or not node.all_input_nodes:
            memo[node] = False
        else:
            memo[node] = all(_from_parameters(a, memo) for a in node.all_input_nodes)
    return memo[node]


def _build(gm: fx.GraphModule, members: list[fx.Node], inputs: list[fx.Node],
           outputs: list[fx.Node]) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in inputs:
        env[n] = graph.placeholder(n.name)

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # computed from parameters alone: read (and recompute) it from the shared root
            env[a] = graph.get_attr(a.target) if a.op == "get_attr" else graph.node_copy(a, arg)
        return env[a]

    for n in members:
        env[n] = graph.node_copy(n, arg)
    graph.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(gm, graph)


def bind_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``{placeholder name: value}`` for one call ``gm(*args, **kwargs)`` (pytree graphs included)."""
    flat = bind_placeholders(gm, args, kwargs, 0)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(names, flat))
