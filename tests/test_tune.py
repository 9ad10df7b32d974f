"""``sparsec tune``: measuring this machine's kernels, fitting the cost model, and using the file.

Timings on a shared machine are noisy, so the tests check the structure of the fit and that
select-format follows the file it is given, not any particular number.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparsec.capture import capture
from sparsec.ir import meta
from sparsec.passes import PassContext, Pipeline, run_passes
from sparsec.passes.base import PassError
from sparsec.passes.select_format import COST_MODEL_FORMAT, COST_MODEL_VERSION, default_models
from sparsec.tune import nonnegative_least_squares, tune_cpu, write_cost_model


def test_nonnegative_least_squares_drops_negative_coefficients():
    a = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [2.0, 1.0, 1.0]])
    exact = np.array([2.0, 3.0, 0.5])
    assert np.allclose(nonnegative_least_squares(a, a @ exact), exact)
    # b pulls the second coefficient below zero: it is dropped and the rest refitted
    b = np.array([1.0, -1.0, 1.0, 2.0])
    x = nonnegative_least_squares(a, b)
    assert (x >= 0).all() and x[1] == 0.0


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    threads = torch.get_num_threads()
    doc = tune_cpu((64, 256), rotate=False)
    assert torch.get_num_threads() == threads  # measuring leaves the caller's torch threads alone
    path = tmp_path_factory.mktemp("tune") / "cost.json"
    write_cost_model(doc, path)
    return doc, path


def test_tune_measures_and_fits_every_constant(tuned):
    doc, path = tuned
    assert doc["format"] == COST_MODEL_FORMAT and doc["version"] == COST_MODEL_VERSION
    assert len(doc["measured"]) == 2 + 2 * 2 * 2  # dense at 2 batches; 2 types x 2 sparsities x 2 batches
    assert all(m["seconds"] > 0 for m in doc["measured"])
    cpu = doc["cpu"]
    assert cpu["bandwidth"] > 0 and cpu["dense_fma_per_cycle"] > 0
    for key in ("chunk_cycles", "chunk_cycles_per_token", "nnz_cycles_per_token"):
        assert set(cpu[key]) == {"fp32", "fp16", "bf16", "int8", "int4"}
        assert all(v >= 0 and math.isfinite(v) for v in cpu[key].values())
        assert cpu[key]["fp32"] == cpu[key]["bf16"] and cpu[key]["int4"] == cpu[key]["int8"]
    assert json.loads(path.read_text()) == json.loads(json.dumps(doc))  # written as returned


def _decide(w: torch.Tensor, text: str) -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(w)
    gm = capture(model, (torch.randn(2, w.shape[1]),)).graph_module
    gm, _ = run_passes(gm, list(Pipeline.parse(text).passes), PassContext())
    (node,) = [n for n in gm.graph.nodes if meta.FORMAT in n.meta]
    return node.meta[meta.FORMAT]


def test_select_format_uses_the_file(tuned, tmp_path):
    _, path = tuned
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    w[torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) < 0.75] = 0
    rec = _decide(w, f'select-format{{target=cpu,cost_model="{path}"}}')
    assert rec["format"] in ("dense", "bitmask", "csr")
    # a file whose machine has unlimited bandwidth and a free dense path keeps everything dense
    doc = json.loads(path.read_text())
    doc["cpu"].update(bandwidth=1e18, dense_fma_per_cycle=1e9)
    fast = tmp_path / "fast.json"
    fast.write_text(json.dumps(doc))
    rec = _decide(w, f'select-format{{target=cpu,cost_model="{fast}"}}')
    assert rec["format"] == "dense", rec["reason"]
    default = _decide(w, "select-format{target=cpu}")
    assert default["format"] != "dense"  # ... which the shipped constants would not
    assert default_models()["cpu"].bandwidth != 1e18


@pytest.mark.parametrize("content, words", [
    (None, "does not exist; write one with `sparsec tune"),
    ("{not json", "is not readable JSON"),
    (json.dumps({"cpu": {}}), "is not a sparsec cost model"),
    (json.dumps({"format": COST_MODEL_FORMAT, "version": 99, "cpu": {}}), "version 99"),
    (json.dumps({"format": COST_MODEL_FORMAT, "version": COST_MODEL_VERSION, "cpu": {"bandwith": 1}}),
     "unknown cost_model setting(s) ['bandwith'] (in"),
])
def test_bad_cost_model_files_are_one_clear_error(tmp_path, content, words):
    path = tmp_path / "cost.json"
    if content is not None:
        path.write_text(content)
    w = torch.randn(16, 32)
    with pytest.raises(PassError) as err:  # names the pass, then the file and what to do
        _decide(w, f'select-format{{target=cpu,cost_model="{path}"}}')
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("argv, words", [
    (["--shape", "8x8"], "too small to time"),
    (["--shape", "big"], "--shape must be ROWSxCOLS"),
])
def test_cli_refuses_bad_shapes_in_one_line(tmp_path, argv, words):
    out = tmp_path / "c.json"
    r = subprocess.run([sys.executable, "-m", "sparsec.cli", "tune", "-o", str(out), *argv],
                       capture_output=True, text=True)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
