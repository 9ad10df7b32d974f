"""``mask-zeros``: a model pruned before capture (e.g. fine-tuned with fixed masks in eager PyTorch)
compiles to sparse kernels. Structural: which layers get masks and formats; numerical: the pass
changes nothing the model computes, and the compiled model matches eager PyTorch (fp32 values,
max relative error below 1e-5, as in test_compile.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import sparsec
from sparsec.capture import capture
from sparsec.ir import meta
from sparsec.ir.layers import layer_nodes
from sparsec.passes import PassContext, PassOptionError, Pipeline, make_pass, run_passes
from sparsec.passes.masks import current_mask, topk_keep_mask

SPARSE = ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj")
FEW_ZEROS = "model.layers.0.self_attn.k_proj"


def pruned_llama(tiny_llama):
    """The tiny Llama with two layers pruned to 60% by hand and one holding 1% zeros by chance."""
    model, example = tiny_llama
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in SPARSE:
            w = modules[name].weight
            w.mul_(topk_keep_mask(w.abs(), 0.6))
        w = modules[FEW_ZEROS].weight
        w.view(-1)[:: 100] = 0.0
        modules["lm_head"].weight.mul_(topk_keep_mask(modules["lm_head"].weight.abs(), 0.6))
    return model, example


def test_masks_exactly_the_zeros_of_sparse_layers_and_changes_no_output(tiny_llama):
    model, example = pruned_llama(tiny_llama)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cap = capture(model, example)
    gm = cap.graph_module
    inputs = {**example, "input_ids": example["input_ids"].repeat(2, 1), **cap.constant_kwargs}
    with torch.no_grad():
        before = gm(**inputs)["logits"].clone()
    gm, _ = run_passes(gm, Pipeline.parse("mask-zeros").passes, PassContext())
    nodes = layer_nodes(gm)
    masked = sorted(name for name, node in nodes.items() if meta.MASK in node.meta)
    # lm_head is ignored by default and 1% zeros is under min_sparsity: both stay unmasked
    assert masked == sorted(SPARSE)
    for name in SPARSE:
        layer = nodes[name].meta[meta.LAYER]
        weight = layer.matrix(gm).detach()
        assert torch.equal(current_mask(gm, layer), weight != 0)
        assert nodes[name].meta[meta.PRUNE] == {"criterion": "zeros", "target": pytest.approx(0.6, abs=1e-3),
                                                "sparsity": pytest.approx(0.6, abs=1e-3)}
    assert "mul" in gm.code  # weight * mask feeds the masked ops
    with torch.no_grad():
        assert torch.equal(gm(**inputs)["logits"], before)
    # with the threshold lowered, the layer with a few zeros is masked too
    gm2, _ = run_passes(gm, [make_pass("mask-zeros", min_sparsity=0.0)], PassContext())
    assert meta.MASK in layer_nodes(gm2)[FEW_ZEROS].meta


def test_compile_and_quantize_a_pruned_model(tiny_llama):
    model, example = pruned_llama(tiny_llama)
    compiled = sparsec.compile(model, example, pipeline="mask-zeros,lower-cpu")
    formats = {r.name: (r.format, r.value_type) for r in compiled.report.layers}
    for name, fmt in formats.items():
        assert fmt == (("bitmask", "fp32") if name in SPARSE else ("dense", "fp32")), name
    assert compiled.report.max_rel_error < 1e-5
    assert compiled.report.max_rel_error_vs_original < 1e-5  # the model was pruned already
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = compiled(input_ids=ids).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
    # quantized: pruned weights stay exactly zero, so the sparse layers keep their sparsity
    quant = sparsec.compile(model, example, pipeline="mask-zeros,quantize{bits=8},lower-cpu")
    records = {r.name: r for r in quant.report.layers}
    for name in SPARSE:
        assert (records[name].format, records[name].value_type) == ("bitmask", "int8")
        assert records[name].sparsity == pytest.approx(0.6, abs=1e-3)


def test_options_and_pipeline_text():
    with pytest.raises(PassOptionError, match=r"min_sparsity must be in \[0, 1\]"):
        make_pass("mask-zeros", min_sparsity=1.5)
    text = "mask-zeros{min_sparsity=0.2,ignore=\"lm_head\"},lower-cpu"
    assert Pipeline.parse(Pipeline.parse(text).to_text()).to_text() == Pipeline.parse(text).to_text()
