"""The sequential calibration engine: statistics against float64 references, sequential semantics
(later layers see the outputs of already-pruned layers), shared inputs, and clear errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from sparsec.capture import capture
from sparsec.passes.calibration import CalibrationError, LayerStatistics, calibrate_layers
from sparsec.passes.masks import select_layers, topk_keep_mask


def mlp_graph(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    return model, capture(model, torch.randn(3, 16)).graph_module


def samples(count: int, shape=(5, 16), seed: int = 1) -> list[tuple[tuple, dict]]:
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(*shape, generator=g),), {}) for _ in range(count)]


def test_hessian_and_norms_match_float64_reference():
    _, gm = mlp_graph()
    calib = samples(6)
    seen: dict[str, LayerStatistics] = {}
    order = calibrate_layers(gm, select_layers(gm), calib, lambda layer, st: seen.__setitem__(layer.name, st),
                             statistics=("hessian", "norms"))
    assert order == ["0", "2"]
    x = torch.cat([s[0][0] for s in calib]).double()
    st = seen["0"]
    assert st.rows == 30 and st.samples == 6
    # per-sample products are float32 (summed in float64): float32 rounding, |H| is about 1-2 here
    torch.testing.assert_close(st.hessian, 2 * x.t() @ x / 30, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.sq_norms, (x * x).sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.column_norms(), x.norm(dim=0), rtol=1e-5, atol=1e-6)


def test_later_layers_see_the_pruned_outputs():
    model, gm = mlp_graph()
    calib = samples(4)
    seen: dict[str, LayerStatistics] = {}

    def prune_half(layer, stats):
        seen[layer.name] = stats
        w = gm.get_parameter(layer.weight)
        with torch.no_grad():
            w.mul_(topk_keep_mask(w.abs(), 0.5))

    dense_w0 = model[0].weight.detach().clone()
    calibrate_layers(gm, select_layers(gm), calib, prune_half)
    x = torch.cat([s[0][0] for s in calib])
    pruned_hidden = torch.relu(x @ gm.get_parameter("0.weight").t() + model[0].bias).double()
    dense_hidden = torch.relu(x @ dense_w0.t() + model[0].bias).double()
    ref = 2 * pruned_hidden.t() @ pruned_hidden / pruned_hidden.shape[0]
    torch.testing.assert_close(seen["2"].hessian, ref, rtol=1e-5, atol=1e-7)
    unpruned = 2 * dense_hidden.t() @ dense_hidden / dense_hidden.shape[0]
    assert (seen["2"].hessian - unpruned).abs().max() > 1e-3  # it really is the pruned model's input


@pytest.fixture(scope="module")
def llama_graph():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = capture(model, {"input_ids": torch.randint(0, 128, (1, 8))}).graph_module
    g = torch.Generator().manual_seed(4)
    calib = [((), {"input_ids": torch.randint(0, 128, (1, 12), generator=g), "use_cache": False})
             for _ in range(3)]
    return gm, calib


def test_ops_sharing_an_input_share_statistics_and_order_is_graph_order(llama_graph):
    gm, calib = llama_graph
    gm = copy.deepcopy(gm)
    seen: dict[str, LayerStatistics] = {}
    order = calibrate_layers(gm, select_layers(gm), calib, lambda layer, st: seen.__setitem__(layer.name, st),
                             statistics=("norms",))
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
    assert order[:7] == [f"model.layers.0.{n}" for n in names]
    p = "model.layers.0."
    assert seen[p + "self_attn.q_proj"] is seen[p + "self_attn.k_proj"] is seen[p + "self_attn.v_proj"]
    assert seen[p + "mlp.gate_proj"] is seen[p + "mlp.up_proj"]
    assert seen[p + "mlp.down_proj"] is not seen[p + "mlp.up_proj"]
    assert seen[p + "mlp.down_proj"].rows == 36  # 3 samples x 12 tokens
    assert seen[p + "mlp.down_proj"].sq_norms.shape == (128,)


def test_only_the_chosen_layer_is_visited(llama_graph):
    gm, calib = llama_graph
    layers = select_layers(gm, "model.layers.1.mlp.up_proj")
    calls = []
    order = calibrate_layers(gm, layers, calib, lambda layer, st: calls.append(layer.name))
    assert order == calls == ["model.layers.1.mlp.up_proj"]


def test_missing_graph_input_is_a_clear_error(llama_graph):
    gm, _ = llama_graph
    bad = [((), {"input_ids": torch.randint(0, 128, (1, 8))})]
    with pytest.raises(CalibrationError, match="use_cache"):
        calibrate_layers(gm, select_layers(gm), bad, lambda layer, st: None)


@pytest.mark.parametrize("calib,match", [
    ([], "non-empty list"),
    ([torch.randn(2, 16)], r"give \(args, kwargs\) pairs"),
    ([((torch.randn(2, 16),), {}, 3)], r"give \(args, kwargs\) pairs"),
])
def test_malformed_calibration_is_refused(calib, match):
    _, gm = mlp_graph()
    with pytest.raises(CalibrationError, match=match):
        calibrate_layers(gm, select_layers(gm), calib, lambda layer, st: None)


def test_nan_activation_names_layer_and_sample():
    _, gm = mlp_graph()
    calib = samples(3)
    calib[2][0][0][1, 4] = float("nan")
    with pytest.raises(
            CalibrationError, match=r"sample 2 gives 1 NaN/Inf value\(s\) at the input of layer '0'"):
        calibrate_layers(gm, select_layers(gm), calib, lambda layer, st: None)


def test_unknown_statistics_refused():
    _, gm = mlp_graph()
    with pytest.raises(CalibrationError, match="statistics must be"):
        calibrate_layers(gm, select_layers(gm), samples(1), lambda layer, st: None, statistics=("fisher",))


def test_conv2d_patches_match_unfold_reference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, stride=2), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5)).eval()
    gm = capture(model, torch.randn(1, 3, 8, 8)).graph_module
    g = torch.Generator().manual_seed(5)
    calib = [((torch.randn(2, 3, 8, 8, generator=g),), {}) for _ in range(2)]
    seen = {}
    calibrate_layers(gm, select_layers(gm), calib, lambda layer, st: seen.__setitem__(layer.name, st))
    x = torch.cat([c[0][0] for c in calib])
    cols = torch.nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27).double()
    assert seen["0"].rows == cols.shape[0]
    torch.testing.assert_close(seen["0"].hessian, 2 * cols.t() @ cols / cols.shape[0], rtol=1e-5, atol=1e-7)
