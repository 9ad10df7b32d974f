"""OWL layer-wise sparsity: the overall sparsity stays exact, every block stays within lambda of
the target, blocks with more outliers are pruned less, and bad options are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_lm import VOCAB, Net

from sparsec.capture import capture
from sparsec.passes import PassContext, PassOptionError, make_pass, run_passes
from sparsec.passes.masks import select_layers
from sparsec.passes.owl import outlier_ratio, owl_targets
from sparsec.passes.prune_report import sparsity_report


def model_with_outliers(layers: int = 4, d: int = 32):
    """A tiny LM whose block 1 holds a few very large weights (outlier features)."""
    torch.manual_seed(0)
    net = Net(d, layers).eval()
    with torch.no_grad():
        w = net.blocks[1].fc1.weight
        w[:, :3] *= 40.0
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    return net, ids


def samples(count: int = 4) -> list[tuple[tuple, dict]]:
    g = torch.Generator().manual_seed(3)
    return [((torch.randint(0, VOCAB, (2, 8), generator=g),), {}) for _ in range(count)]


def block_sparsity(report: dict, block: str) -> float:
    rows = [r for name, r in report.items() if name.startswith(block + ".")]
    total = sum(r["shape"][0] * r["shape"][1] for r in rows)
    return sum(r["achieved"] * r["shape"][0] * r["shape"][1] for r in rows) / total


def test_outlier_ratio_by_hand():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 91.0])]
    # mean 10: with m=5 only the 91 is above 50
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.1)
    assert outlier_ratio(scores, 10.0) == pytest.approx(0.0)


@pytest.mark.parametrize("pipeline, calibrated", [
    ("prune-magnitude{sparsity=0.6,owl_lambda=0.1,ignore=head}", False),
    ("prune-wanda{sparsity=0.6,owl_lambda=0.1,ignore=head}", True),
    ("prune-sparsegpt{sparsity=0.6,owl_lambda=0.1,ignore=head}", True),
])
def test_overall_sparsity_is_exact_and_blocks_stay_within_lambda(pipeline, calibrated):
    from sparsec.passes import Pipeline

    net, ids = model_with_outliers()
    gm = capture(copy.deepcopy(net), ids).graph_module
    ctx = PassContext(calibration=samples() if calibrated else None)
    run_passes(gm, Pipeline.parse(pipeline).passes, ctx)
    report = sparsity_report(gm)
    pruned = [r for r in report.values() if r["criterion"] != "dense"]
    numel = sum(r["shape"][0] * r["shape"][1] for r in pruned)
    zeros = sum(round(r["achieved"] * r["shape"][0] * r["shape"][1]) for r in pruned)
    assert zeros == round(0.6 * numel)  # exactly the uniform target's count
    per_block = [block_sparsity(report, f"blocks.{i}") for i in range(4)]
    assert all(0.5 - 1e-3 <= s <= 0.7 + 1e-3 for s in per_block), per_block
    # one outlier block among four: it sits at the lower bound, the others share its weights
    assert per_block[1] == pytest.approx(0.5, abs=1e-3), per_block
    assert min(per_block[0], per_block[2], per_block[3]) > 0.6
    # each block's outlier ratio is recorded on its layers, the largest on block 1's
    ratios = {name.split(".")[1]: r["owl_outlier_ratio"] for name, r in report.items() if r in pruned}
    assert max(ratios.values()) == ratios["1"] > 0


def test_owl_targets_leave_the_model_unchanged_and_are_integer_counts():
    net, ids = model_with_outliers()
    gm = capture(copy.deepcopy(net), ids).graph_module
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    layers = select_layers(gm, ignore="head")
    targets, ratios = owl_targets(gm, layers, 0.7, 0.05, 5.0, samples())
    assert sorted(ratios) == [f"blocks.{i}" for i in range(4)]
    for layer in layers:
        numel = layer.shape[0] * layer.shape[1]
        assert targets[layer.name] * numel == pytest.approx(round(targets[layer.name] * numel), abs=1e-6)
    for k, v in before.items():
        assert torch.equal(v, gm.state_dict()[k])


@pytest.mark.parametrize("name, options, message", [
    ("prune-sparsegpt", dict(sparsity=0.5, owl_lambda=0.7), "owl_lambda must be in"),
    ("prune-wanda", dict(sparsity=0.5, owl_lambda=0.1, owl_m=1.0), "owl_m must be a number > 1"),
    ("prune-wanda", dict(n=2, m=4, owl_lambda=0.1), "drop it for n:m"),
    ("prune-magnitude", dict(sparsity=0.5, owl_lambda=0.1, overrides="fc1=0.2"), "drop overrides or owl_lambda"),
    ("prune-magnitude", dict(sparsity=0.5, owl_lambda=0.1, scope="global"), "scope=layer only"),
    ("prune-sparsegpt", dict(sparsity=0.95, owl_lambda=0.1), "lower owl_lambda"),
])
def test_bad_owl_options_are_refused(name, options, message):
    with pytest.raises(PassOptionError, match=message):
        make_pass(name, **options)
