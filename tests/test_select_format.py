"""The ``select-format`` cost model: exact byte counts, the decisions it makes, and what lowering does with them."""

from __future__ import annotations

import json

import pytest
import torch

from sparsec.capture import capture
from sparsec.formats import VALUE_TYPES, pack
from sparsec.ir import meta
from sparsec.passes import PassContext, PassOptionError, Pipeline, PipelineSyntaxError, run_passes
from sparsec.passes.select_format import (
    BLOCK_SHAPES,
    NM_PATTERNS,
    WeightStats,
    default_models,
    estimate_seconds,
    format_nbytes,
)


def _run(gm, text, ctx=None):
    gm, _ = run_passes(gm, list(Pipeline.parse(text)), ctx or PassContext())
    return gm


def _layers(gm):
    return [(n, n.meta[meta.LAYER]) for n in gm.graph.nodes if meta.LAYER in n.meta]


def _sparse(rows, cols, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) >= sparsity)


def _nm(rows, cols, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    idx = torch.rand(rows, cols // m, m, generator=g).topk(n, dim=2).indices
    keep = torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(2, idx, True)
    return w * keep.view(rows, cols)


@pytest.mark.parametrize("shape", [(1, 7), (13, 40), (32, 48), (5, 300)])
@pytest.mark.parametrize("value_type", VALUE_TYPES)
def test_byte_model_equals_what_the_formats_store(shape, value_type):
    rows, cols = shape
    w = _sparse(rows, cols, 0.6, seed=rows * cols)
    stats = WeightStats.of(w, (), BLOCK_SHAPES)
    group = 16
    opts = {"group_size": group} if value_type == "int4" else {}
    for fmt in ("dense", "bitmask", "csr"):
        assert format_nbytes(fmt, value_type, stats, group) == pack(w, fmt, value_type, **opts).nbytes(), fmt
    for blk in BLOCK_SHAPES:
        got = format_nbytes("block", value_type, stats, group, block_shape=blk)
        assert got == pack(w, "block", value_type, block_shape=blk, **opts).nbytes(), blk
    if cols % 4 == 0:
        w24 = _nm(rows, cols, 2, 4, seed=1)
        s24 = WeightStats.of(w24, NM_PATTERNS, ())
        assert s24.nm[(2, 4)] and not s24.nm[(1, 4)]
        assert format_nbytes("nm", value_type, s24, group, n=2, m=4) == pack(w24, "nm", value_type, **opts).nbytes()


def _decide(w, text="select-format{target=cpu,batch=1}", ctx=None, value_type=None):
    model = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(w)
    gm = capture(model, (torch.randn(2, w.shape[1]),)).graph_module
    code = gm.code
    gm = _run(gm, text, ctx)
    assert gm.code == code, "select-format is an analysis: the graph must not change"
    ((node, _),) = _layers(gm)
    return node.meta[meta.FORMAT]


def test_dense_layers_stay_dense_and_sparse_ones_go_sparse_at_batch_one():
    assert _decide(_sparse(256, 512, 0.0, 1))["format"] == "dense"
    rec = _decide(_sparse(256, 512, 0.02, 2))
    assert rec["format"] == "dense", rec["reason"]  # 2% sparsity does not pay for the mask bit
    rec = _decide(_sparse(256, 512, 0.1, 2))
    assert rec["format"] == "bitmask", rec["reason"]  # memory-bound: 10% fewer bytes is 7% faster
    rec = _decide(_sparse(256, 512, 0.1, 2), "select-format{target=cpu,margin=0.1}")
    assert rec["format"] == "dense", rec["reason"]  # ...but not the 10% asked for
    rec = _decide(_sparse(256, 512, 0.75, 3))
    assert rec["format"] != "dense" and rec["value_type"] == "fp32", rec["reason"]
    assert rec["estimates"][rec["format"]] < rec["estimates"]["dense"]
    rec = _decide(_sparse(256, 512, 0.75, 3), "select-format{target=cpu,value_type=int8}")
    assert rec["format"] == "bitmask", rec["reason"]  # 3.2 bits/weight against fp32 torch for dense
    assert rec["bytes"]["bitmask"] < rec["bytes"]["csr"] < rec["bytes"]["dense"]
    rec = _decide(_sparse(256, 512, 0.75, 3), "select-format{target=cuda,value_type=int8}")
    assert rec["format"] == "bitmask", rec["reason"]
    assert "bits/weight" in rec["reason"] and rec["value_type"] == "int8" and "csr" not in rec["estimates"]


def test_very_sparse_layers_pick_csr_and_big_batches_pick_dense():
    # CSR costs ~11 cycles a kept value on the CPU, a bitmask ~3.4 a 16-column chunk: CSR wins
    # only when fewer than about one value in 50 is kept.
    rec = _decide(_sparse(512, 1024, 0.98, 4))
    assert rec["format"] == "bitmask", rec["reason"]
    rec = _decide(_sparse(512, 1024, 0.995, 4))
    assert rec["format"] == "csr", rec["reason"]
    rec = _decide(_sparse(256, 512, 0.75, 3), "select-format{target=cpu,batch=4096}")
    assert rec["format"] == "dense", rec["reason"]


def test_nm_candidates_use_the_sparsest_pattern_that_fits():
    w = _nm(64, 128, 1, 4, seed=5)
    rec = _decide(w, 'select-format{target=cuda,formats="dense,nm"}')
    assert "nm 1:4" in rec["estimates"] and "nm 2:4" not in rec["estimates"]
    assert rec["format"] == "nm" and rec["options"] == {"n": 1, "m": 4}, rec["reason"]
    # The CPU's N:M loop costs ~11 cycles a stored value, more than torch's fp32 matmul here.
    rec = _decide(w, 'select-format{target=cpu,formats="dense,nm"}')
    assert rec["format"] == "dense" and "nm 1:4" in rec["estimates"], rec["reason"]
    rec = _decide(_sparse(64, 128, 0.75, 6), 'select-format{target=cpu,formats="dense,nm"}')
    assert not any(k.startswith("nm") for k in rec["estimates"])  # unstructured: N:M cannot store it


def test_formats_without_a_kernel_are_costed_as_the_unpacked_fallback():
    w = _sparse(128, 256, 0.9, 7)
    stats = WeightStats.of(w, (), ((4, 4),))
    cpu = default_models(2)["cpu"]
    nbytes = format_nbytes("block", "fp32", stats, block_shape=(4, 4))
    fallback = estimate_seconds("block", "fp32", stats, 1, cpu, nbytes, block_shape=(4, 4))
    dense = estimate_seconds("dense", "fp32", stats, 1, cpu, format_nbytes("dense", "fp32", stats))
    assert fallback == pytest.approx(dense, rel=1e-3)  # dense also moves its 16-byte shape
    rec = _decide(w, "select-format{target=cpu}")
    assert not any(k.startswith("block") for k in rec["estimates"])


def test_cost_model_overrides_change_the_decision():
    w = _sparse(256, 512, 0.75, 3)
    ctx = PassContext(config={"cost_model": {"cpu": {"bandwidth": 1e15}}})
    assert _decide(w, ctx=ctx)["format"] == "dense"  # infinite bandwidth: only work counts
    with pytest.raises(Exception, match="unknown cost_model setting"):
        _decide(w, ctx=PassContext(config={"cost_model": {"cpu": {"bandwith": 1}}}))


def test_lowering_follows_the_decision_with_its_options(mlp):
    model, x = mlp
    gm = capture(model, (x,)).graph_module
    gm = _run(gm, 'prune-nm{n=1,m=4},quantize{bits=8},select-format{target=cpu,formats="dense,nm,bitmask"},lower-cpu')
    for node, layer in _layers(gm):
        rec, packed = node.meta[meta.FORMAT], node.meta[meta.PACKED]
        assert (packed.format_name, packed.value_type) == (rec["format"], "int8")
        label = rec["format"] if rec["format"] != "nm" else f"nm {packed.n}:{packed.m}"
        assert packed.nbytes() == rec["bytes"][label]
        if rec["format"] == "nm":
            assert (packed.n, packed.m) == (1, 4)
        assert torch.equal(packed.unpack(), layer.matrix(gm).detach())


def test_bad_options_are_refused():
    for text, message in [
        ("select-format{target=tpu}", "target must be cpu, cuda or auto"),
        ("select-format{batch=0}", "batch must be a positive"),
        ("select-format{formats=coo}", "unknown format(s) coo"),
        ("select-format{value_type=int3}", "value_type must be auto or one of"),
    ]:
        with pytest.raises(
            (PassOptionError, PipelineSyntaxError), match=message.replace("(", r"\(").replace(")", r"\)")
        ):
            Pipeline.parse(text)


def test_cuda_model_agrees_with_the_measured_h200_run():
    """The CUDA constants are fitted to benchmarks/results/gpu/gpu_kernels.json: on those very
    configurations the model must pick the faster of sparsec's bitmask kernel and cuBLAS fp16."""
    import json
    from pathlib import Path

    runs = json.loads((Path(__file__).parent.parent / "benchmarks/results/gpu/gpu_kernels.json").read_text())
    cuda = default_models()["cuda"]
    agree = total = 0
    for r in runs:
        if r["sparsity"] == "2:4":
            continue
        stats = WeightStats(r["rows"], r["cols"], int(r["rows"] * r["cols"] * (1 - float(r["sparsity"]))))
        ours = estimate_seconds("bitmask", r["value_type"], stats, r["batch"], cuda,
                                format_nbytes("bitmask", r["value_type"], stats))
        dense = estimate_seconds("dense", "fp16", stats, r["batch"], cuda, format_nbytes("dense", "fp16", stats))
        total += 1
        agree += (ours < dense) == (r["ours_us"] < r["cublas_us"])
    assert total == 144 and agree >= 0.95 * total, (agree, total)


def test_cuda_model_still_agrees_with_the_lane_word_kernels():
    """The constants predate the ``lanes`` kernel (the default since); on the third H200 run
    (benchmarks/results/gpu-session3, 75%, batch 1 and 16) every ``lanes`` configuration was
    still slower than cuBLAS fp16, and the model must keep choosing dense there."""
    import json
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks/results/gpu-session3/gpu_kernels_75.json"
    runs = [r for r in json.loads(path.read_text()) if r["design"] == "lanes"]
    cuda = default_models()["cuda"]
    assert len(runs) == 24
    for r in runs:
        stats = WeightStats(r["rows"], r["cols"], int(r["rows"] * r["cols"] * (1 - float(r["sparsity"]))))
        ours = estimate_seconds("bitmask", r["value_type"], stats, r["batch"], cuda,
                                format_nbytes("bitmask", r["value_type"], stats))
        dense = estimate_seconds("dense", "fp16", stats, r["batch"], cuda, format_nbytes("dense", "fp16", stats))
        assert (ours < dense) == (r["ours_us"] < r["cublas_us"]), r


def test_gpu_benchmark_fits_the_stored_cublas_times(capsys, monkeypatch):
    """``gpu_kernels.py --fit`` (no GPU) on the third H200 run: cuBLAS's batch-1 times lie on a
    line of a few microseconds plus the weight's bytes at about the HBM bandwidth, and every
    75% configuration gets its ceiling, the speedup of a kernel on that same line."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    spec = importlib.util.spec_from_file_location("gpu_kernels", root / "benchmarks/gpu_kernels.py")
    gpu_kernels = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_kernels", gpu_kernels)  # its dataclass looks itself up there
    spec.loader.exec_module(gpu_kernels)
    run = root / "benchmarks/results/gpu-session3/gpu_kernels_75.json"
    assert gpu_kernels.main(["--fit", str(run)]) == 0
    out = capsys.readouterr().out
    fixed, gbs = gpu_kernels.fit_cublas(json.loads(run.read_text()))[1]
    assert 4.0 < fixed < 9.0 and 4000 < gbs < 5200, (fixed, gbs)
    assert f"batch 1: cuBLAS fp16 time = {fixed:.2f} us" in out
    ceilings = [float(line.split()[-1]) for line in out.splitlines() if " 0.75 " in line]
    assert len(ceilings) == 24 and all(1.3 < c < 3.5 for c in ceilings)
