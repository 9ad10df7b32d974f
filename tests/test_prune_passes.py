"""Pruning passes end to end on captured graphs: exact per-layer sparsity for every criterion, N:M
groups and blocks checked one by one, masks that survive AdamW training, and every bad input
refused with a clear error that leaves the weights bit-identical."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from sparsec.capture import capture
from sparsec.ir import meta
from sparsec.ir.layers import layer_nodes
from sparsec.passes import PassContext, PassError, PassOptionError, Pipeline, make_pass, run_passes
from sparsec.passes.masks import prune_count, select_layers, topk_keep_mask


@pytest.fixture(scope="module")
def captured():
    """A tiny Llama (the SmolLM2 architecture at toy size), captured once, and calibration inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = capture(model, {"input_ids": torch.randint(0, 128, (1, 8))}).graph_module
    g = torch.Generator().manual_seed(3)
    calib = [((), {"input_ids": torch.randint(0, 128, (1, 16), generator=g), "use_cache": False})
             for _ in range(4)]
    return gm, calib


@pytest.fixture
def llama(captured):
    gm, calib = captured
    return copy.deepcopy(gm), PassContext(calibration=calib)


def run(gm, text, ctx):
    out, _ = run_passes(gm, Pipeline.parse(text).passes, ctx)
    return out


def snapshot(gm) -> tuple[dict[str, torch.Tensor], str]:
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}, gm.code


def assert_unchanged(gm, snap) -> None:
    """Bit-identical tensors (NaN-safe: compared as integers) and the same graph code."""
    state, code = snap
    now = gm.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        a, b = now[k].detach(), v
        if a.is_floating_point():
            bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
            a, b = a.view(bits), b.view(bits)
        assert torch.equal(a, b), k
    assert gm.code == code


EXACT = [
    ("prune-magnitude{sparsity=0.6}", 0.6),
    ("prune-wanda{sparsity=0.55}", 0.55),
    ("prune-sparsegpt{sparsity=0.7}", 0.7),
    ("prune-sparsegpt{sparsity=0.5,blocksize=16}", 0.5),
]


@pytest.mark.parametrize("text,target", EXACT)
def test_exact_per_layer_sparsity(llama, text, target):
    gm, ctx = llama
    lm_head = gm.get_parameter("lm_head.weight").detach().clone()
    gm = run(gm, text, ctx)
    chosen = select_layers(gm)
    assert len(chosen) == 14
    nodes = layer_nodes(gm)
    for layer in chosen:
        w = gm.get_parameter(layer.weight)
        assert int((w == 0).sum()) == prune_count(target, w.numel()), layer.name
        record = nodes[layer.name].meta[meta.PRUNE]
        assert record["target"] == target and record["sparsity"] == pytest.approx(target, abs=1 / w.numel())
        mask = gm.get_buffer(nodes[layer.name].meta[meta.MASK])
        assert torch.equal(mask == 0, w == 0)  # mask and weight agree (meta.py invariant 2)
    assert torch.equal(gm.get_parameter("lm_head.weight"), lm_head)  # ignored by default


@pytest.mark.parametrize("text,n,m", [
    ("prune-nm{n=2,m=4}", 2, 4),
    ("prune-nm{n=1,m=8}", 1, 8),
    ("prune-wanda{n=2,m=4}", 2, 4),
    ("prune-sparsegpt{n=2,m=4}", 2, 4),
    ("prune-sparsegpt{n=4,m=8,blocksize=32}", 4, 8),
])
def test_nm_group_by_group(llama, text, n, m):
    gm, ctx = llama
    gm = run(gm, text, ctx)
    for layer in select_layers(gm):
        w = layer.matrix(gm)
        kept = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (kept == n).all(), layer.name
    record = layer_nodes(gm)["model.layers.0.mlp.up_proj"].meta[meta.PRUNE]
    assert record["pattern"] == f"{n}:{m}" and record["target"] == 1 - n / m


def test_nm_keeps_largest_magnitudes(llama):
    gm, ctx = llama
    dense = {layer.name: layer.matrix(gm).detach().clone() for layer in select_layers(gm)}
    gm = run(gm, "prune-nm{n=2,m=4}", ctx)
    for layer in select_layers(gm):
        d, w = dense[layer.name].abs().reshape(-1, 4), layer.matrix(gm).reshape(-1, 4)
        kept = w != 0
        pruned_max = d.masked_fill(kept, float("-inf")).amax(-1)
        kept_min = d.masked_fill(~kept, float("inf")).amin(-1)
        assert (pruned_max <= kept_min).all(), layer.name


def test_block_pruning_whole_blocks_exact_count(llama):
    gm, ctx = llama
    gm = run(gm, 'prune-block{sparsity=0.5,block="2x8",norm=l1}', ctx)
    for layer in select_layers(gm):
        w = layer.matrix(gm)
        r, c = w.shape
        tiles = (w != 0).reshape(r // 2, 2, c // 8, 8).permute(0, 2, 1, 3).reshape(-1, 16)
        assert (tiles.all(1) | (~tiles).all(1)).all(), layer.name
        assert int((~tiles.any(1)).sum()) == prune_count(0.5, tiles.shape[0])


def test_global_magnitude_one_threshold_over_all_layers(llama):
    gm, ctx = llama
    dense = {layer.name: layer.matrix(gm).detach().abs().clone() for layer in select_layers(gm)}
    gm = run(gm, "prune-magnitude{sparsity=0.7,scope=global}", ctx)
    chosen = select_layers(gm)
    zeros = sum(int((layer.matrix(gm) == 0).sum()) for layer in chosen)
    total = sum(layer.matrix(gm).numel() for layer in chosen)
    assert zeros == prune_count(0.7, total)
    pruned_max = max(float(dense[lay.name][layer_w == 0].max()) for lay in chosen
                     for layer_w in [lay.matrix(gm)] if (layer_w == 0).any())
    kept_min = min(float(dense[lay.name][layer_w != 0].min())
                   for lay in chosen for layer_w in [lay.matrix(gm)])
    assert pruned_max <= kept_min
    per_layer = {lay.name: float((lay.matrix(gm) == 0).float().mean()) for lay in chosen}
    assert max(per_layer.values()) - min(per_layer.values()) > 0.01  # layers differ: it is global


def test_overrides_set_per_layer_targets(llama):
    gm, ctx = llama
    gm = run(gm, 'prune-sparsegpt{sparsity=0.5,overrides="down_proj=0.75;model.layers.1.*.q_proj=0.25"}', ctx)
    for layer in select_layers(gm):
        want = 0.5
        if layer.name.endswith("down_proj"):
            want = 0.75
        elif layer.name == "model.layers.1.self_attn.q_proj":
            want = 0.25
        w = layer.matrix(gm)
        assert int((w == 0).sum()) == prune_count(want, w.numel()), layer.name


def single_linear(seed: int = 0, d: int = 48, out: int = 24):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d, out, bias=False)).eval()
    gm = capture(model, torch.randn(2, d)).graph_module
    g = torch.Generator().manual_seed(seed + 1)
    # correlated features with uneven scales (a few large ones), the way LLM activations look
    mix = torch.eye(d) + 0.5 * torch.randn(d, d, generator=g)
    scales = torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]
    calib = [(((torch.randn(64, d, generator=g) @ mix) * scales,), {}) for _ in range(8)]
    return model, gm, calib


def test_wanda_scores_weight_times_input_norm_per_row():
    model, gm, calib = single_linear()
    w0 = model[0].weight.detach().clone()
    gm = run(gm, "prune-wanda{sparsity=0.5}", PassContext(calibration=calib))
    x = torch.cat([c[0][0] for c in calib]).double()
    score = w0.abs().double() * x.norm(dim=0)[None, :]
    w = gm.get_parameter("0.weight")
    for r in range(w.shape[0]):
        kept = w[r] != 0
        assert int((~kept).sum()) == 24  # half of each row: the rows are the comparison groups
        assert score[r][~kept].max() <= score[r][kept].min()
    assert torch.equal(w[w != 0], w0[w != 0])  # Wanda never updates kept weights


def test_sparsegpt_pass_reconstructs_better_than_magnitude():
    model, gm, calib = single_linear(seed=2)
    w0 = model[0].weight.detach().clone().double()
    gm = run(gm, "prune-sparsegpt{sparsity=0.6}", PassContext(calibration=calib))
    x = torch.cat([c[0][0] for c in calib]).double()
    w_sgpt = gm.get_parameter("0.weight").detach().double()
    w_mag = w0 * topk_keep_mask(w0.abs(), 0.6)

    def err(w):
        return float(torch.linalg.norm((w0 - w) @ x.t()))

    assert err(w_sgpt) < 0.7 * err(w_mag), (err(w_sgpt), err(w_mag))
    assert layer_nodes(gm)["0"].meta[meta.PRUNE]["loss"] > 0


@pytest.mark.parametrize("text", ["prune-sparsegpt{sparsity=0.5}", "prune-magnitude{sparsity=0.5}"])
def test_adamw_training_keeps_pruned_weights_exactly_zero(llama, text):
    gm, ctx = llama
    gm = run(gm, text, ctx)
    chosen = select_layers(gm)
    zero = {layer.weight: gm.get_parameter(layer.weight) == 0 for layer in chosen}
    before = {layer.weight: gm.get_parameter(layer.weight).detach().clone() for layer in chosen}
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(9)
    gm.train()
    losses = []
    for _ in range(4):
        ids = torch.randint(0, 128, (1, 16), generator=g)
        logits = gm(input_ids=ids, use_cache=False)["logits"]
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    for layer in chosen:
        w = gm.get_parameter(layer.weight)
        assert torch.all(w[zero[layer.weight]] == 0), layer.name
        assert not torch.equal(w, before[layer.weight])  # the kept weights did train
    assert all(torch.isfinite(torch.tensor(losses)))


# -- bad inputs: a clear error, and nothing changed ------------------------------------------------


@pytest.mark.parametrize("name,options,match", [
    ("prune-magnitude", {"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
    ("prune-wanda", {"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
    ("prune-sparsegpt", {"sparsity": 1.5}, r"sparsity must be in \[0, 1\)"),
    ("prune-block", {"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
    ("prune-nm", {"n": 5, "m": 4}, "n=5 > m=4"),
    ("prune-sparsegpt", {"n": 3, "m": 2}, "n=3 > m=2"),
    ("prune-wanda", {"n": 4, "m": 2}, "n=4 > m=2"),
    ("prune-sparsegpt", {"n": 2, "m": 4, "sparsity": 0.7}, "fixes the sparsity at 0.5"),
    ("prune-sparsegpt", {"n": 2, "m": 4, "blocksize": 6}, "multiple of m=4"),
    ("prune-sparsegpt", {"percdamp": -1.0}, "percdamp must be >= 0"),
    ("prune-block", {"block": "4x"}, "ROWSxCOLS"),
    ("prune-block", {"norm": "linf"}, "norm must be 'l1' or 'l2'"),
])
def test_bad_options_refused_at_construction(name, options, match):
    with pytest.raises(PassOptionError, match=match):
        make_pass(name, **options)


def nm_unfriendly_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 10),
                                torch.nn.ReLU(), torch.nn.Linear(10, 4)).eval()
    gm = capture(model, torch.randn(2, 8)).graph_module
    calib = [((torch.randn(3, 8),), {}) for _ in range(2)]
    return gm, calib


@pytest.mark.parametrize("text", ["prune-nm{n=2,m=4}", "prune-wanda{n=2,m=4}", "prune-sparsegpt{n=2,m=4}"])
def test_input_dim_not_divisible_by_m_names_the_layer(text):
    gm, calib = nm_unfriendly_mlp()
    snap = snapshot(gm)
    with pytest.raises(PassError, match=r"layer '4' has 10 input columns, not divisible by m=4"):
        run(gm, text, PassContext(calibration=calib))
    assert_unchanged(gm, snap)


@pytest.mark.parametrize("text", ['prune-magnitude{layers="o_proj,k_projj"}',
                                  "prune-wanda{layers=mlp.nothing}",
                                  "prune-sparsegpt{layers=model.layers.7.*}", "prune-nm{layers=qproj}",
                                  'prune-block{overrides="nothing=0.5"}'])
def test_pattern_matching_nothing(llama, text):
    gm, ctx = llama
    snap = snapshot(gm)
    with pytest.raises(PassError, match="matches no"):
        run(gm, text, ctx)
    assert_unchanged(gm, snap)


@pytest.mark.parametrize("text", ["prune-magnitude{sparsity=0.5}", "prune-nm", "prune-block",
                                  "prune-wanda{sparsity=0.5}", "prune-sparsegpt{sparsity=0.5}"])
def test_nan_or_inf_weights_refused(llama, text):
    gm, ctx = llama
    with torch.no_grad():
        gm.get_parameter("model.layers.1.mlp.up_proj.weight")[3, 7] = float("nan")
        gm.get_parameter("model.layers.1.mlp.up_proj.weight")[5, 1] = float("inf")
    snap = snapshot(gm)
    with pytest.raises(PassError, match=r"layer 'model.layers.1.mlp.up_proj' has 2 NaN/Inf weight"):
        run(gm, text, ctx)
    assert_unchanged(gm, snap)


@pytest.mark.parametrize("text", ["prune-wanda{sparsity=0.5}", "prune-sparsegpt{sparsity=0.5}"])
def test_nan_calibration_data_refused(text):
    _, gm, calib = single_linear()
    calib[5][0][0][10, 3] = float("nan")
    snap = snapshot(gm)
    with pytest.raises(PassError,
                       match=r"calibration sample 5 gives 1 NaN/Inf value\(s\) at the input of layer '0'"):
        run(gm, text, PassContext(calibration=calib))
    assert_unchanged(gm, snap)


class _LogMLP(torch.nn.Module):
    """The second layer's input turns NaN (log of a negative) only once the first is pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.log(self.a(x)))


@pytest.mark.parametrize("text", ["prune-wanda{sparsity=0.5}", "prune-sparsegpt{sparsity=0.5}"])
def test_failure_midway_restores_every_weight(text):
    torch.manual_seed(0)
    model = _LogMLP().eval()
    gm = capture(model, torch.randn(2, 8)).graph_module
    calib = [((torch.randn(4, 8),), {}) for _ in range(2)]
    snap = snapshot(gm)
    with pytest.raises(PassError, match="at the input of layer 'b'"):
        run(gm, text, PassContext(calibration=calib))
    assert_unchanged(gm, snap)  # layer 'a' had been pruned and updated: it is restored bit for bit


@pytest.mark.parametrize("text", ["prune-wanda{sparsity=0.5}", "prune-sparsegpt{n=2,m=4}"])
def test_missing_calibration_is_a_clear_error(llama, text):
    gm, _ = llama
    snap = snapshot(gm)
    with pytest.raises(PassError, match="needs calibration data"):
        run(gm, text, PassContext())
    assert_unchanged(gm, snap)


@pytest.mark.parametrize("text", [
    "prune-nm{n=1,m=4}",
    "prune-block{sparsity=0.6,block=4x4,norm=l1}",
    "prune-wanda{sparsity=0.6,layers=mlp}",
    "prune-sparsegpt{n=2,m=4,blocksize=64,percdamp=0.05}",
    'prune-sparsegpt{sparsity=0.7,overrides="down_proj=0.5"}',
])
def test_pipeline_text_round_trip(text):
    assert Pipeline.parse(text).to_text() == text
