"""Gradual magnitude pruning: the cubic schedule's values, and the masks it drives through a real
AdamW fine-tuning loop (exact sparsity at every pruning step, pruned weights stay exactly zero)."""

from __future__ import annotations

import pytest
import torch

from sparsec.capture import capture
from sparsec.finetune.schedules import CubicSchedule, GradualMagnitudePruning, ScheduleError
from sparsec.passes.masks import LayerSelectionError, prune_count


def test_cubic_values_follow_zhu_gupta():
    s = CubicSchedule(final_sparsity=0.8, initial_sparsity=0.1, start_step=10, num_prunings=4, frequency=5)
    assert s.pruning_steps() == [10, 15, 20, 25, 30]
    assert s.sparsity_at(0) == 0.0 and s.sparsity_at(9) == 0.0
    for t in s.pruning_steps():
        expected = 0.8 + (0.1 - 0.8) * (1 - (t - 10) / 20) ** 3
        assert s.sparsity_at(t) == pytest.approx(expected, abs=1e-12)
    assert s.sparsity_at(10) == pytest.approx(0.1) and s.sparsity_at(30) == pytest.approx(0.8)
    assert s.sparsity_at(17) == s.sparsity_at(15)  # held between pruning steps
    assert s.sparsity_at(1000) == pytest.approx(0.8)
    values = [s.sparsity_at(t) for t in s.pruning_steps()]
    assert all(b > a for a, b in zip(values, values[1:]))
    gains = [b - a for a, b in zip(values, values[1:])]
    assert all(b < a for a, b in zip(gains, gains[1:]))  # fast first, slow at the end


@pytest.mark.parametrize("kwargs,match", [
    ({"final_sparsity": 1.0}, r"final_sparsity must be in \[0, 1\)"),
    ({"final_sparsity": 0.5, "initial_sparsity": 0.6}, "initial_sparsity must be in"),
    ({"final_sparsity": 0.5, "frequency": 0}, "frequency"),
    ({"final_sparsity": 0.5, "num_prunings": 0}, "num_prunings"),
    ({"final_sparsity": 0.5, "start_step": -1}, "start_step"),
])
def test_bad_schedules_refused(kwargs, match):
    with pytest.raises(ScheduleError, match=match):
        CubicSchedule(**kwargs)


def small_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 4))
    return capture(model, torch.randn(2, 16)).graph_module


def test_gradual_pruning_in_an_adamw_loop():
    gm = small_mlp()
    opt = torch.optim.AdamW(gm.parameters(), lr=3e-3, weight_decay=0.05)
    sched = GradualMagnitudePruning(gm, final_sparsity=0.75, initial_sparsity=0.0, start_step=2,
                                    num_prunings=3, frequency=4, layers="0,2", optimizer=opt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    y = (x[:, :4] * 2 + 0.1 * torch.randn(64, 4, generator=g))
    updated_at, pruned_before = [], {}
    for step in range(20):
        if sched.step(step):
            updated_at.append(step)
            target = sched.sparsity_at(step)
            for layer in sched.layers:
                w = gm.get_parameter(layer.weight)
                assert int((w == 0).sum()) == prune_count(target, w.numel()), (step, layer.name)
                if layer.name in pruned_before:  # sparsity only grows: earlier zeros stay pruned
                    assert torch.all(w[pruned_before[layer.name]] == 0)
                pruned_before[layer.name] = (w == 0).clone()
        loss = torch.nn.functional.mse_loss(gm(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        for layer in sched.layers:  # momentum from before a prune must not revive a pruned weight
            w = gm.get_parameter(layer.weight)
            assert torch.all(w[pruned_before.get(layer.name, torch.zeros_like(w, dtype=torch.bool))] == 0)
    assert updated_at == [2, 6, 10, 14]
    assert sched.current_sparsity == pytest.approx(0.75)
    assert [t for t, _ in sched.history] == updated_at
    last = gm.get_parameter("4.weight")
    assert int((last == 0).sum()) == 0  # layers not chosen are untouched


def test_no_layer_chosen_is_an_error():
    gm = small_mlp()
    with pytest.raises(LayerSelectionError, match="matches no layer"):
        GradualMagnitudePruning(gm, final_sparsity=0.5, layers="nothing*")
    with pytest.raises(LayerSelectionError, match="chose no layer"):
        GradualMagnitudePruning(gm, final_sparsity=0.5, ignore="*")


def test_nan_weight_refused_at_a_pruning_step_without_changes():
    gm = small_mlp()
    sched = GradualMagnitudePruning(gm, final_sparsity=0.5, start_step=0, num_prunings=2, frequency=1)
    with torch.no_grad():
        gm.get_parameter("2.weight")[0, 0] = float("nan")
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(LayerSelectionError, match="layer '2' has 1 NaN/Inf weight"):
        sched.step(0)
    after = gm.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k].view(torch.int32), v.view(torch.int32)) for k, v in before.items())


def test_without_optimizer_reset_momentum_moves_pruned_weights():
    """Why ``optimizer=`` exists: Adam's moments from before a prune keep moving the raw weight
    (the masked product the graph uses stays zero, but the stored weight does not)."""
    gm = small_mlp()
    opt = torch.optim.AdamW(gm.parameters(), lr=3e-3, weight_decay=0.0)
    sched = GradualMagnitudePruning(gm, final_sparsity=0.5, initial_sparsity=0.5, start_step=3,
                                    num_prunings=1, frequency=1, layers="2")
    x, y = torch.randn(32, 16), torch.randn(32, 4)
    for step in range(5):
        sched.step(step)
        if step == 3:
            pruned = gm.get_parameter("2.weight") == 0
            assert int(pruned.sum()) == prune_count(0.5, pruned.numel())
        torch.nn.functional.mse_loss(gm(x), y).backward()
        opt.step()
        opt.zero_grad()
    w = gm.get_parameter("2.weight")
    assert int((w[pruned] != 0).sum()) > 0
    masked = w * gm.get_buffer("2_weight_mask")
    assert torch.all(masked[pruned] == 0)
