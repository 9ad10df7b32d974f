"""Pass manager guarantees: instruments around every pass, failures that name the pass and its
predecessors, and the structural effect of a pass checked on the printed graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from sparsec.capture import capture
from sparsec.passes import (
    DumpGraph,
    NumericCheck,
    Pass,
    PassContext,
    PassError,
    PassResult,
    PassTiming,
    Pipeline,
    register_pass,
    run_passes,
)
from sparsec.passes.base import unregister_pass


@pytest.fixture
def graph(mlp):
    model, x = mlp
    return capture(model, (x,)).graph_module, model, x


def test_capture_then_prune_structure(graph):
    gm, _, _ = graph
    gm, _ = run_passes(gm, list(Pipeline.parse("prune-magnitude{sparsity=0.5}")), PassContext())
    code = gm.code
    # Each linear now reads weight * mask: the structural contract of mask insertion.
    assert code.count("torch._C._nn.linear(") == 3
    assert code.count("_weight_mask") >= 3
    for i in (0, 2, 4):
        assert f"mul{'' if i == 0 else '_' + str(i // 2)} = _{i}_weight * _{i}_weight_mask" in code


def test_timing_and_dump_instruments(graph, tmp_path):
    gm, _, _ = graph
    timing, dump = PassTiming(), DumpGraph(tmp_path / "dump")
    ctx = PassContext(instruments=[timing, dump])
    run_passes(gm, list(Pipeline.parse("prune-magnitude{sparsity=0.5},lower-cpu")), ctx)
    assert [t for t, _ in timing.timings] == ["prune-magnitude{sparsity=0.5}", "lower-cpu"]
    assert all(s >= 0 for _, s in timing.timings)
    assert "total" in timing.table()
    names = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert names == ["000_captured.py", "001_prune-magnitude.py", "002_lower-cpu.py"]
    assert "_weight_mask" in (tmp_path / "dump" / "001_prune-magnitude.py").read_text()
    assert "_weight_mask" not in (tmp_path / "dump" / "000_captured.py").read_text()


def test_dump_into_a_file_is_one_clear_error(graph, tmp_path):
    gm, _, _ = graph
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    for directory in (blocker, blocker / "dump"):
        ctx = PassContext(instruments=[DumpGraph(directory)])
        with pytest.raises(PassError, match="cannot write graph dumps to .*a-file"):
            run_passes(gm, list(Pipeline.parse("prune-magnitude{sparsity=0.5}")), ctx)
    assert blocker.read_text() == "mine" and sorted(tmp_path.iterdir()) == [blocker]


def test_numeric_check_records_error_per_pass(graph):
    gm, model, x = graph
    with torch.no_grad():
        ref = model(x)
    check = NumericCheck(ref, tolerance=1e-6)
    ctx = PassContext(example_inputs=((x,), {}), instruments=[check])
    run_passes(gm, list(Pipeline.parse("prune-magnitude{sparsity=0.0},prune-magnitude{sparsity=0.6}")), ctx)
    (first, e0), (second, e1) = check.errors
    assert e0 == 0.0 and e1 > 1e-3


@dataclass
class _Breaks(Pass):
    """Claims to preserve numerics but scales a weight."""
    name: ClassVar[str] = "test-breaks-numerics"
    preserves_numerics: ClassVar[bool] = True

    def run(self, gm, ctx):
        with torch.no_grad():
            next(gm.parameters()).mul_(2.0)
        return PassResult(gm, True)


@dataclass
class _Raises(Pass):
    """Always fails."""
    name: ClassVar[str] = "test-raises"

    def run(self, gm, ctx):
        raise RuntimeError("boom")


@pytest.fixture
def broken_passes():
    register_pass(_Breaks)
    register_pass(_Raises)
    yield
    unregister_pass("test-breaks-numerics")
    unregister_pass("test-raises")


def test_numeric_check_names_the_pass_that_broke_numerics(graph, broken_passes):
    gm, model, x = graph
    with torch.no_grad():
        ref = model(x)
    ctx = PassContext(example_inputs=((x,), {}), instruments=[NumericCheck(ref, tolerance=1e-4)])
    expected = r"pass 'test-breaks-numerics' changed the model's output.*after prune-magnitude"
    with pytest.raises(PassError, match=expected):
        run_passes(gm, list(Pipeline.parse("prune-magnitude{sparsity=0.0},test-breaks-numerics")), ctx)


def test_failure_names_pass_and_predecessors(graph, broken_passes):
    gm, _, _ = graph
    with pytest.raises(PassError) as info:
        run_passes(gm, list(Pipeline.parse("prune-magnitude{sparsity=0.1},prune-nm,test-raises")), PassContext())
    assert str(info.value) == "pass 'test-raises' failed (after prune-magnitude, prune-nm): boom"


def test_disabled_passes_are_skipped(graph):
    gm, _, _ = graph
    ctx = PassContext(disabled={"prune-magnitude"})
    gm, results = run_passes(gm, list(Pipeline.parse("prune-magnitude{sparsity=0.5}")), ctx)
    assert results == [] and "_weight_mask" not in gm.code
