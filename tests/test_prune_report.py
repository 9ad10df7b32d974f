"""The per-layer sparsity report reads the passes' records and measures the weights themselves."""

from __future__ import annotations

import torch

from sparsec.capture import capture
from sparsec.passes import PassContext, Pipeline, run_passes
from sparsec.passes.masks import prune_count
from sparsec.passes.prune_report import format_sparsity_table, sparsity_report


def pruned_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                                torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    gm = capture(model, torch.randn(2, 16)).graph_module
    calib = [((torch.randn(6, 16),), {}) for _ in range(3)]
    text = "prune-sparsegpt{sparsity=0.6,layers=0},prune-nm{n=2,m=4,layers=2}"
    gm, _ = run_passes(gm, Pipeline.parse(text).passes, PassContext(calibration=calib))
    return gm


def test_report_per_layer():
    gm = pruned_mlp()
    report = sparsity_report(gm)
    assert list(report) == ["0", "2", "4"]
    assert report["0"] == {"shape": (32, 16), "target": 0.6, "achieved": prune_count(0.6, 512) / 512,
                           "criterion": "sparsegpt", "pattern": None}
    assert report["2"]["criterion"] == "magnitude" and report["2"]["pattern"] == "2:4"
    assert report["2"]["target"] == 0.5 and report["2"]["achieved"] == 0.5
    assert report["4"] == {"shape": (8, 32), "target": None, "achieved": 0.0, "criterion": "dense",
                           "pattern": None}


def test_report_measures_the_weight_not_the_record():
    gm = pruned_mlp()
    with torch.no_grad():
        gm.get_parameter("4.weight")[0, :4] = 0.0
    assert sparsity_report(gm)["4"]["achieved"] == 4 / 256


def test_table_text():
    table = format_sparsity_table(sparsity_report(pruned_mlp()))
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "shape", "criterion", "target", "achieved"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["0", "32x16", "sparsegpt", "0.6000", "0.5996"]
    assert lines[3].split() == ["2", "32x32", "magnitude", "2:4", "0.5000", "0.5000"]
    assert lines[4].split() == ["4", "8x32", "dense", "-", "0.0000"]
    total = (307 + 512) / (512 + 1024 + 256)
    assert lines[5].split() == ["total", "1792", "weights", f"{total:.4f}"]
