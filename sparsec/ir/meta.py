"""The ``node.meta`` keys sparsec passes read and write, documented in one place.

Every key sparsec owns starts with ``"sparsec."`` so it never collides with torch.fx's or
torch.export's own keys (``val``, ``nn_module_stack``, ``stack_trace``...). A pass may only
write the keys listed here; adding a key means adding it here first, with its contract.

Invariants every pass keeps (checked by :func:`sparsec.ir.verify.verify_graph` where cheap):

1. A node carrying :data:`LAYER` is a weighted op (linear, GPT-2 style transposed ``addmm``,
   convolution) whose weight is reachable from a ``get_attr`` node; the layer's ``fqn`` names the
   weight parameter in ``gm.named_parameters()``.
2. If a node carries :data:`MASK`, the weight parameter holds exact zeros wherever the mask is
   zero, and the graph multiplies the weight by the mask buffer before use, so optimizer steps
   can never revive a pruned weight.
3. Passes never remove :data:`LAYER` from a node they did not create; they only refine it.
4. After any pass the GraphModule is recompiled and still computes the model's function (up to
   the changes the pass exists to make: pruning, quantization).
"""

from __future__ import annotations

#: :class:`sparsec.ir.layers.WeightedLayer` describing the weighted op this node computes.
LAYER = "sparsec.layer"

#: name of the mask buffer on the GraphModule (a ``torch.bool``-valued float tensor of the weight's
#: shape, 1 = kept). Written by the mask-insertion machinery (``passes/masks.py``).
MASK = "sparsec.mask"

#: ``{"criterion": str, "sparsity": float, "target": float | None, ...}``: how the mask was chosen.
PRUNE = "sparsec.prune"

#: ``{"bits": int, "group": int | None, "method": str, "scales": Tensor}``: quantization applied to this
#: layer's weight (``scales`` float32 ``[out]`` for 8 bits, ``[out, ceil(in/group)]`` for 4; lowering
#: packs with them so the stored levels are exactly the quantized weight's).
QUANT = "sparsec.quant"

#: ``{"format": str, "value_type": str, "options": dict, "estimates": {candidate: cost}, "reason": str}``:
#: the storage format chosen for this layer by ``select-format`` (``options`` are the format's pack
#: options, e.g. ``{"n": 2, "m": 4}`` or ``{"block_shape": (4, 4)}``).
FORMAT = "sparsec.format"

#: ``{"bias": bool, "activation": str | None, "activation_node": str | None, "swiglu_partner": str | None,
#: "swiglu_role": "gate" | "up" | None, "swiglu_node": str | None}``: epilogue the layer's kernel can
#: fuse, found by ``fuse-epilogue`` (activation: relu | gelu (erf) | silu; the node names are fx node names).
FUSION = "sparsec.fusion"

#: ``{"target": "cpu" | "cuda", "format": str, "value_type": str, "group_size": int | None}``, plus
#: ``"design": str`` where ``lower-cuda{design=...}`` named the bitmask kernel, and ``"dense_from":
#: int | None`` where ``lower-cuda{dense_from=...}`` moved the prefill threshold (``None``: never):
#: set by ``lower-cpu`` / ``lower-cuda``; the runtime replaces every node carrying it with a kernel
#: call, built with those two as options.
LOWERING = "sparsec.lowering"

#: ``int``: index of the repeated block (decoder layer) whose output this node is, for taps.
BLOCK_OUTPUT = "sparsec.block_output"

#: ``str``: why this node is an opaque call (a part of the model that could not be traced).
OPAQUE = "sparsec.opaque"

ALL_KEYS = (LAYER, MASK, PRUNE, QUANT, FORMAT, FUSION, LOWERING, BLOCK_OUTPUT, OPAQUE)

#: :class:`sparsec.formats.base.PackedWeight`: the weight packed by ``lower-cpu``/``lower-cuda``
#: in the format recorded under :data:`LOWERING`, ready for a kernel to read.
PACKED = "sparsec.packed"

ALL_KEYS = (*ALL_KEYS, PACKED)
