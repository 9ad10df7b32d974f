"""Teacher and student as fine-tuning calls them: ``forward(input_ids, attention_mask) -> (logits, hidden)``.

Fine-tuning runs on the captured, tapped GraphModule rather than on the eager model, because:

* masks are part of the graph (``weight * mask`` feeds every pruned op, ``sparsec/ir/meta.py``
  invariant 2): gradients of pruned weights are exactly zero and no optimizer step can revive
  them, with no hooks to register, to lose in a state-dict round trip, or to miss under DDP/FSDP
  (a gradient hook on an eager parameter never fires on FSDP's flattened or sharded copies);
* block outputs come from the ``insert-taps`` pass, the same way for every architecture.
  The eager alternative, ``output_hidden_states=True``, is model specific: Llama's last
  "hidden state" already has the final norm applied and the first is the embedding output;
* the trained graph is the one the rest of the pipeline (format selection, quantization,
  lowering) continues from.

The captured graph computes the model in eval mode (``torch.export`` fixes dropout off), which is
what the distillation targets anyway. :func:`as_distill_model` accepts a :class:`DistillModel`, a
:class:`~sparsec.capture.Capture`, a GraphModule, or an eager ``nn.Module`` (captured here, sharing
its parameters, so training it trains the given model's weights in place).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.graph import _PyTreeCodeGen

from sparsec.ir import meta
from sparsec.passes.taps import insert_taps, is_tapped, logits_of, split_tapped, tap_names


class ModelInputError(ValueError):
    """A teacher or student that fine-tuning cannot use as given; the message says what to change."""


def _graph_inputs(gm: fx.GraphModule) -> list[str]:
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        return list(codegen.pytree_info.orig_args)
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


class DistillModel(nn.Module):
    """A tapped GraphModule with a fixed calling convention.

    ``constant_kwargs`` are inputs fixed at capture (``use_cache=False`` for transformers
    decoders); a graph input named ``use_cache`` with no given value gets ``False``. The
    attention mask is passed on when the graph takes one; a causal model captured without one
    still trains correctly on right-padded data, since no real token attends to the padding after
    it and the losses skip padded positions.
    """

    def __init__(self, graph_module: fx.GraphModule, constant_kwargs: dict | None = None,
                 blocks: str = "") -> None:
        super().__init__()
        if not isinstance(graph_module, fx.GraphModule):
            raise ModelInputError(f"expected a torch.fx.GraphModule, got {type(graph_module).__name__}")
        if not is_tapped(graph_module):
            insert_taps(graph_module, blocks)
        self.graph_module = graph_module
        self.inputs = _graph_inputs(graph_module)
        self.keyword_call = isinstance(graph_module.graph._codegen, _PyTreeCodeGen)
        self.constant_kwargs = dict(constant_kwargs or {})
        if "use_cache" in self.inputs:
            self.constant_kwargs.setdefault("use_cache", False)
        if self.keyword_call:
            if "input_ids" not in self.inputs:
                raise ModelInputError(f"the graph takes inputs {self.inputs}, not input_ids; fine-tuning "
                                      f"feeds token ids as input_ids")
            missing = [n for n in self.inputs if n not in ("input_ids", "attention_mask")
                       and n not in self.constant_kwargs]
            if missing:
                raise ModelInputError(f"the graph also takes {missing}; give their values in constant_kwargs "
                                      f"(or pass the Capture, which records them)")

    @property
    def blocks(self) -> list[str]:
        return tap_names(self.graph_module)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if self.keyword_call:
            kwargs: dict[str, Any] = {"input_ids": input_ids, **self.constant_kwargs}
            if attention_mask is not None and "attention_mask" in self.inputs:
                kwargs["attention_mask"] = attention_mask
            out = self.graph_module(**kwargs)
        else:
            kwargs = dict(self.constant_kwargs)
            if attention_mask is not None and "attention_mask" in self.inputs:
                kwargs["attention_mask"] = attention_mask
            out = self.graph_module(input_ids, **kwargs)
        original, hidden = split_tapped(out)
        return logits_of(original), hidden

    def hidden_sizes(self) -> list[int | None]:
        """Last dimension of every tap, from the shapes recorded at capture (None if unknown)."""
        sizes: list[int | None] = []
        taps = sorted((n for n in self.graph_module.graph.nodes if meta.BLOCK_OUTPUT in n.meta),
                      key=lambda n: n.meta[meta.BLOCK_OUTPUT])
        for node in taps:
            val = node.meta.get("val")
            size = val.shape[-1] if isinstance(val, torch.Tensor) and val.dim() else None
            sizes.append(int(size) if isinstance(size, int) else None)
        return sizes


def as_distill_model(model: Any, example_ids: torch.Tensor | None = None, blocks: str = "",
                     role: str = "model") -> DistillModel:
    """Wrap ``model`` (see the module docstring); ``example_ids`` (``[batch >= 2, seq]``) is
    needed only to capture an eager module. ``role`` names it in errors (``"student"``)."""
    from sparsec.capture import Capture, capture

    if isinstance(model, DistillModel):
        return model
    if isinstance(model, Capture):
        return DistillModel(model.graph_module, model.constant_kwargs, blocks)
    if isinstance(model, fx.GraphModule):
        return DistillModel(model, None, blocks)
    if isinstance(model, nn.Module):
        if example_ids is None:
            raise ModelInputError(f"the {role} is an eager module; give example token ids to capture it")
        # A fresh contiguous copy: torch.export turns a view's base into a guard on later calls,
        # and a batch of 1 would be specialized.
        example = example_ids[:2].clone().contiguous()
        if example.shape[0] < 2:
            example = example.repeat(2, 1)
        cap = capture(model, {"input_ids": example})
        return DistillModel(cap.graph_module, cap.constant_kwargs, blocks)
    raise ModelInputError(f"the {role} must be an nn.Module, a torch.fx.GraphModule or a sparsec Capture; "
                          f"got {type(model).__name__}")


def check_pair(student: DistillModel, teacher: DistillModel, example_ids: torch.Tensor | None = None) -> None:
    """Refuse a teacher and student whose taps cannot be compared, before anything trains.

    Hidden sizes come from the shapes recorded at capture; when a graph recorded none
    (``symbolic_trace``), both models run once on ``example_ids`` without gradients to find them.
    """
    if student is teacher or student.graph_module is teacher.graph_module:
        raise ModelInputError("teacher and student are the same model; give the teacher its own copy")
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise ModelInputError(f"teacher and student share {len(shared)} parameter tensor(s); capture the "
                              f"teacher from a copy of the model (copy.deepcopy) so training the student "
                              f"leaves it fixed")
    ns, nt = len(student.blocks), len(teacher.blocks)
    if ns != nt:
        raise ModelInputError(f"the student has {ns} block outputs and the teacher {nt}; SquareHead pairs "
                              f"them one to one, so both need the same number of blocks (or squarehead=0)")
    s_sizes, t_sizes = student.hidden_sizes(), teacher.hidden_sizes()
    if example_ids is not None and None in s_sizes + t_sizes:
        with torch.no_grad():
            s_sizes = [h.shape[-1] for h in student(example_ids)[1]]
            t_sizes = [h.shape[-1] for h in teacher(example_ids)[1]]
    for index, (a, b) in enumerate(zip(s_sizes, t_sizes)):
        if a is not None and b is not None and a != b:
            raise ModelInputError(f"block {index} ({student.blocks[index]}): student hidden size {a}, "
                                  f"teacher {b}; SquareHead needs equal hidden sizes (or set squarehead=0)")
