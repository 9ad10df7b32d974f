"""Move a captured graph, the constants baked into it, and its inputs to another device.

``GraphModule.to(device)`` moves parameters and buffers, but a graph captured with
``torch.export`` also records devices *inside its nodes*: ``aten.arange(..., device=cpu)`` for
positions and causal masks, ``aten.to.device(x, cpu, ...)`` for the rotary frequencies, and
``aten._assert_tensor_metadata(x, device=cpu)`` checks. Run on a GPU, such a graph mixes CPU and
CUDA tensors and fails. :func:`move_graph` rewrites every ``torch.device`` among the node
arguments to the new device, then moves the state, so the graph runs where its weights are.

Contract: the graph's structure is unchanged (same nodes, same order); only device arguments and
tensor placement change, so passes that ran before stay valid. Tensors held in ``node.meta`` are
not moved (they are compile-time records).
"""

from __future__ import annotations

import torch
import torch.fx as fx


def _retarget(value, device: torch.device):
    if isinstance(value, torch.device):
        return device
    if isinstance(value, (list, tuple)):
        moved = [_retarget(v, device) for v in value]
        return type(value)(moved) if isinstance(value, list) else tuple(moved)
    if isinstance(value, dict):
        return {k: _retarget(v, device) for k, v in value.items()}
    return value


def move_graph(gm: fx.GraphModule, device: str | torch.device) -> fx.GraphModule:
    """Move ``gm`` (in place) to ``device`` and return it: state and device arguments alike."""
    device = torch.device(device)
    # higher-order ops (torch.export's wrap_with_set_grad_enabled, autocast) keep subgraphs as
    # GraphModule children: their nodes carry devices too
    for sub in gm.modules():
        if not isinstance(sub, fx.GraphModule):
            continue
        changed = False
        for node in sub.graph.nodes:
            if node.op != "call_function":
                continue
            args, kwargs = _retarget(node.args, device), _retarget(node.kwargs, device)
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                changed = True
        if changed:
            sub.recompile()
    gm.to(device)
    return gm


def move_module(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """``module.to(device)`` that also retargets every captured graph inside it (see
    :func:`move_graph`); returns ``module``."""
    for sub in module.modules():
        if isinstance(sub, fx.GraphModule):
            move_graph(sub, device)
    return module.to(device)


def to_device(tree, device: str | torch.device):
    """``tree`` (nested tuples, lists, dicts: a call's inputs) with every tensor moved to ``device``."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


_CPU = torch.device("cpu")


def graph_device(gm: torch.nn.Module, default: torch.device | None = _CPU) -> torch.device | None:
    """The device of ``gm``'s first parameter or buffer (``default`` for a module without state)."""
    for t in gm.parameters():
        return t.device
    for t in gm.buffers():
        return t.device
    return default
