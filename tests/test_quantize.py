"""The ``quantize`` pass: RTN and GPTQ to int8/int4 grids, masks respected, lowering exact."""

from __future__ import annotations

import pytest
import torch

from sparsec.capture import capture
from sparsec.formats import pack
from sparsec.formats.values import dequantize, quantize
from sparsec.ir import meta
from sparsec.ir.layers import find_layers
from sparsec.passes import PassContext, PassError, PassOptionError, Pipeline, PipelineSyntaxError, run_passes
from sparsec.passes.quantize import gptq_quantize, rtn_quantize, search_scales


def _run(gm, text, ctx=None):
    gm, _ = run_passes(gm, list(Pipeline.parse(text)), ctx or PassContext())
    return gm


def _layers(gm):
    return [(n, n.meta[meta.LAYER]) for n in gm.graph.nodes if meta.LAYER in n.meta]


def _correlated_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(dim // 4, dim, generator=g)
    return torch.randn(n, dim // 4, generator=g) @ basis + 0.05 * torch.randn(n, dim, generator=g)


@pytest.mark.parametrize(("bits", "group"), [(8, 128), (4, 16), (4, 7)])
def test_rtn_pass_puts_weights_on_the_grid_and_keeps_pruned_zero(mlp, bits, group):
    model, x = mlp
    gm = capture(model, (x,)).graph_module
    gm = _run(gm, "prune-magnitude{sparsity=0.6}")
    masks_before = {name: b.clone() for name, b in gm.named_buffers()}
    pruned = {layer.weight: layer.matrix(gm).detach().clone() for _, layer in _layers(gm)}
    gm = _run(gm, f"quantize{{bits={bits},group={group}}}")
    vt = "int8" if bits == 8 else "int4"
    for node, layer in _layers(gm):
        rec = node.meta[meta.QUANT]
        assert rec["bits"] == bits and rec["method"] == "rtn"
        assert rec["group"] == (group if bits == 4 else None)
        w = layer.matrix(gm).detach()
        before = pruned[layer.weight]
        assert torch.all(w[before == 0] == 0), "a pruned weight came back"
        # float64 reference of the grid, computed from the definition.
        ref_levels, ref_scales = quantize(before, vt, group)
        torch.testing.assert_close(rec["scales"], ref_scales, rtol=0, atol=0)
        assert torch.equal(w, dequantize(ref_levels, vt, ref_scales, group))
        step = ref_scales[:, None] if bits == 8 else ref_scales.repeat_interleave(group, 1)[:, : w.shape[1]]
        assert torch.all((w.double() - before.double()).abs() <= step.double() / 2 * (1 + 1e-5) + 1e-7)
        # Packing with the recorded scales gives back exactly these values.
        options = {"group_size": group} if bits == 4 else {}
        assert torch.equal(pack(w, "bitmask", vt, scales=rec["scales"], **options).unpack(), w)
    for name, b in gm.named_buffers():
        assert torch.equal(b, masks_before[name]), f"mask {name} changed"


def test_lowering_packs_exactly_the_quantized_weights(mlp):
    model, x = mlp
    gm = capture(model, (x,)).graph_module
    gm = _run(gm, "prune-magnitude{sparsity=0.5},quantize{bits=4,group=32},lower-cpu")
    for node, layer in _layers(gm):
        packed = node.meta[meta.PACKED]
        assert packed.value_type == "int4" and packed.group_size == 32
        assert torch.equal(packed.unpack(), layer.matrix(gm).detach())


def _gptq_graph(seed=0, dim=64, out=48):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(dim, out)).eval()
    x = _correlated_inputs(256, dim, seed)
    gm = capture(model, (x[:4],)).graph_module
    calibration = [((x[i : i + 32],), {}) for i in range(0, 256, 32)]
    return model, gm, x, calibration


def _gptq_against_rtn(bits: int, group: int, options: str = ""):
    """A 50%-pruned layer quantized by ``quantize{...,method=gptq<options>}``, and the mean squared
    error of its output (float64, on the calibration inputs) against that of round-to-nearest:
    ``(gm, node, keep, w_gptq, err_gptq, err_rtn, calibration)``."""
    _, gm, x, calibration = _gptq_graph()
    ctx = PassContext(calibration=calibration)
    gm = _run(gm, "prune-magnitude{sparsity=0.5}")
    ((node, layer),) = _layers(gm)
    w0 = layer.matrix(gm).detach().clone()
    keep = w0 != 0
    w_rtn, _ = rtn_quantize(w0, keep, bits, group)
    gm = _run(gm, f"quantize{{bits={bits},group={group},method=gptq{options}}}", ctx)
    w_gptq = layer.matrix(gm).detach()
    ref = x.double() @ w0.double().T
    err_rtn = ((x.double() @ w_rtn.double().T) - ref).pow(2).mean().item()
    err_gptq = ((x.double() @ w_gptq.double().T) - ref).pow(2).mean().item()
    return gm, node, keep, w_gptq, err_gptq, err_rtn, calibration


@pytest.mark.parametrize(("bits", "group"), [(4, 16), (8, 128)])
def test_gptq_beats_rtn_on_the_layer_output(bits, group):
    gm, node, keep, w_gptq, err_gptq, err_rtn, calibration = _gptq_against_rtn(bits, group)
    assert torch.all(w_gptq[~keep] == 0)
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    rec = node.meta[meta.QUANT]
    assert rec["method"] == "gptq" and rec["calibration_samples"] == len(calibration)
    vt = "int8" if bits == 8 else "int4"
    options = {"group_size": group} if bits == 4 else {}
    # GPTQ's weights sit on the recorded grid even where a row's largest value moved.
    assert torch.equal(pack(w_gptq, "dense", vt, scales=rec["scales"], **options).unpack(), w_gptq)
    gm = _run(gm, "lower-cpu")
    assert torch.equal(node.meta[meta.PACKED].unpack(), w_gptq)


def test_gptq_with_identity_hessian_is_rtn():
    """With H = I no column's error can be compensated, so GPTQ must round to nearest."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(12, 40, generator=g) * (torch.rand(12, 40, generator=g) > 0.3)
    keep = w != 0
    for bits, group in ((8, 128), (4, 8)):
        w_g, s_g, _ = gptq_quantize(w, torch.eye(40, dtype=torch.float64) * 2, keep, bits, group, percdamp=0.0)
        w_r, s_r = rtn_quantize(w, keep, bits, group)
        torch.testing.assert_close(s_g, s_r, rtol=0, atol=0)
        torch.testing.assert_close(w_g, w_r, rtol=0, atol=0)


@pytest.mark.parametrize("scales", ["max", "mse"])
def test_gptq_actorder_with_identity_hessian_is_rtn(scales):
    """Visiting the columns in another order changes nothing when no error can be compensated."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(12, 40, generator=g) * (torch.rand(12, 40, generator=g) > 0.3)
    keep = w != 0
    for bits, group in ((8, 128), (4, 8)):
        for actorder in (False, True):
            w_g, s_g, _ = gptq_quantize(w, torch.eye(40, dtype=torch.float64) * 2, keep, bits, group,
                                        percdamp=0.0, actorder=actorder, scales=scales)
            w_r, s_r = rtn_quantize(w, keep, bits, group, scales)
            torch.testing.assert_close(s_g, s_r, rtol=0, atol=0)
            torch.testing.assert_close(w_g, w_r, rtol=0, atol=0)


@pytest.mark.parametrize(("bits", "group"), [(4, 16), (4, 7), (8, 128)])
def test_searched_scales_round_better_and_pack_exactly(bits, group):
    g = torch.Generator().manual_seed(7)
    # heavy tails, as in real weights: the largest value sets a coarse grid for all the others
    w = torch.randn(24, 50, generator=g) ** 3 * (torch.rand(24, 50, generator=g) > 0.4)
    keep = w != 0
    w_max, _ = rtn_quantize(w, keep, bits, group)
    w_mse, s_mse = rtn_quantize(w, keep, bits, group, "mse")
    assert torch.equal(s_mse, search_scales(w, bits, group))
    assert torch.all(w_mse[~keep] == 0)
    err_mse, err_max = (w_mse - w).pow(2).sum(), (w_max - w).pow(2).sum()
    # int8's 255 levels leave little to gain by clipping; int4's 16 gain clearly
    assert err_mse <= err_max if bits == 8 else err_mse < err_max, (err_mse, err_max)
    vt = "int8" if bits == 8 else "int4"
    options = {"group_size": group} if bits == 4 else {}
    assert torch.equal(pack(w_mse, "bitmask", vt, scales=s_mse, **options).unpack(), w_mse)
    # an all-zero group or row gets scale 0 and stays zero
    w[3] = 0
    assert torch.all(search_scales(w, bits, group)[3] == 0)


@pytest.mark.parametrize(("bits", "group"), [(4, 16), (8, 128)])
def test_gptq_actorder_and_searched_scales_beat_rtn(bits, group):
    gm, node, keep, w_gptq, err_gptq, err_rtn, _ = _gptq_against_rtn(bits, group, ",actorder=true,scales=mse")
    assert torch.all(w_gptq[~keep] == 0)
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    rec = node.meta[meta.QUANT]
    vt = "int8" if bits == 8 else "int4"
    options = {"group_size": group} if bits == 4 else {}
    assert torch.equal(pack(w_gptq, "dense", vt, scales=rec["scales"], **options).unpack(), w_gptq)
    gm = _run(gm, "lower-cpu")
    assert torch.equal(node.meta[meta.PACKED].unpack(), w_gptq)


def test_quantize_errors_are_clear_and_leave_weights_alone(mlp):
    for text, message in [
        ("quantize{bits=3}", "bits must be 8 or 4"),
        ("quantize{method=awq}", "method must be one of rtn, gptq"),
        ("quantize{group=0}", "group must be a positive"),
        ("quantize{scales=minmax}", "scales must be one of max, mse"),
        ("quantize{actorder=true}", "actorder applies to method=gptq only"),
    ]:
        with pytest.raises((PassOptionError, PipelineSyntaxError), match=message):
            Pipeline.parse(text)
    model, x = mlp
    gm = capture(model, (x,)).graph_module
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(PassError, match="needs calibration data"):
        _run(gm, "quantize{method=gptq}")
    bad = torch.randn(4, 48)
    bad[1, 3] = float("nan")
    with pytest.raises(PassError, match="quantize"):
        _run(gm, "quantize{method=gptq}", PassContext(calibration=[((x,), {}), ((bad,), {})]))
    for k, v in gm.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed pass"


def test_pipeline_text_round_trips():
    text = "quantize{bits=4,group=64,method=gptq}"
    assert Pipeline.parse(text).to_text() == text
    text = "quantize{bits=4,group=64,method=gptq,actorder=true,scales=mse}"
    assert Pipeline.parse(text).to_text() == text
    assert Pipeline.parse(Pipeline.parse(text).to_text(full=True)) == Pipeline.parse(text)


def test_lm_head_and_embeddings_are_skipped_by_default(tiny_llama):
    model, inputs = tiny_llama
    gm = capture(model, inputs).graph_module
    gm = _run(gm, "quantize{bits=8}")
    names = {layer.name: node for node, layer in _layers(gm)}
    assert meta.QUANT not in names["lm_head"].meta
    assert all(meta.QUANT in n.meta for name, n in names.items() if name != "lm_head")
    assert len(find_layers(gm)) == len(names)
