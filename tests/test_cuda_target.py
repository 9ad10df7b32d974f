"""``target="cuda"`` end to end: graph placement, dense layers on cuBLAS, compile, refusals.

On a machine without a GPU the kernels run under numba's CUDA simulator (small shapes: it runs
every GPU thread as a Python thread) and the model stays on the CPU; on a GPU the same tests run
there. Moving a captured graph between devices is checked on the ``meta`` device, which needs
no GPU and fails on any tensor left behind.

Tolerance: kernels accumulate in float32, so compiled outputs match eager PyTorch on the same
(masked, rounded) weights to 1e-4 relative to the largest output.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import copy  # noqa: E402

import pytest  # noqa: E402

import sparsec  # noqa: E402
from sparsec.capture import bind_inputs, capture  # noqa: E402
from sparsec.formats import pack  # noqa: E402
from sparsec.ir.device import graph_device, move_graph, move_module  # noqa: E402
from sparsec.runtime.artifact import ArtifactError  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _small_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).eval()
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    return model, x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max())


# -- moving captured graphs ------------------------------------------------------------------------


def test_move_graph_retargets_devices_recorded_in_nodes(tiny_llama):
    model, inputs = tiny_llama
    cap = capture(model, inputs)
    _, kwargs = bind_inputs(cap.method, cap.input_names, cap.constant_kwargs, (), dict(inputs))
    on_meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    # the exported Llama builds positions and masks with device=cpu: moving the state alone fails
    stale = copy.deepcopy(cap.graph_module).to("meta")
    with pytest.raises((RuntimeError, NotImplementedError)):  # a meta tensor sent to the CPU
        stale(**on_meta)
    gm = move_graph(cap.graph_module, "meta")
    out = gm(**on_meta)
    assert out.logits.device.type == "meta" and out.logits.shape == (1, 12, 128)
    assert graph_device(gm).type == "meta"
    assert "device(type='cpu')" not in gm.code


def test_move_module_moves_graphs_inside_a_module(tiny_llama):
    model, inputs = tiny_llama
    holder = torch.nn.Module()
    holder.graph_module = capture(model, inputs).graph_module
    move_module(holder, "meta")
    assert all(p.device.type == "meta" for p in holder.parameters())
    assert "device(type='cpu')" not in holder.graph_module.code


# -- dense layers on the CUDA target -----------------------------------------------------------------


@pytest.mark.parametrize("value_type", ["fp32", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_dense_layer_runs_on_cublas_and_matches_float64(value_type, activation):
    from sparsec.codegen.cuda import build_linear_kernel
    from sparsec.codegen.cuda.dense import DenseCudaLinear

    gen = torch.Generator().manual_seed(4)
    w, b = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
    packed = pack(w, "dense", value_type)
    layer = build_linear_kernel(packed, bias=b, activation=activation)
    assert isinstance(layer, DenseCudaLinear) and layer.nbytes() > 0
    x = torch.randn(5, 40, generator=gen).to(DEVICE)
    ref = x.double().cpu() @ packed.unpack().double().t() + b.double()
    if activation == "silu":
        ref = torch.nn.functional.silu(ref)
    # fp16/bf16 weights multiply x rounded to the same type
    tol = {"fp32": 1e-5, "int8": 1e-5, "fp16": 2e-3, "bf16": 2e-2}[value_type]
    assert _rel(layer(x), ref) < tol
    with pytest.raises(ValueError, match="last dimension is 40"):
        layer(torch.randn(2, 41, device=DEVICE))


# -- compile(target="cuda") ----------------------------------------------------------------------


@pytest.mark.parametrize("pipeline, formats", [
    ("prune-magnitude{sparsity=0.5},lower-cuda{value_type=fp16}", {"bitmask"}),
    ("lower-cuda", {"dense"}),
])
def test_compile_for_cuda_matches_eager_on_the_same_weights(pipeline, formats):
    model, x = _small_mlp()
    before = copy.deepcopy(model.state_dict())
    compiled = sparsec.compile(model, x, pipeline, target="cuda")
    assert compiled.target == "cuda" and compiled.device.type == DEVICE.type
    assert {r.format for r in compiled.report.layers} == formats
    reference = copy.deepcopy(model)
    for k in compiled.kernels():
        reference.get_submodule(k.layer).weight = torch.nn.Parameter(k.packed.unpack(), requires_grad=False)
    with torch.no_grad():
        expected = reference(x)
        out = compiled(x)  # a CPU input is moved to where the model runs
    assert out.device.type == DEVICE.type
    assert _rel(out, expected) < 1e-4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model is untouched


@pytest.mark.parametrize("design", ["runs", "tiles", "mma"])
def test_lower_cuda_design_picks_the_bitmask_kernel(design):
    model, x = _small_mlp()
    pipeline = f"prune-magnitude{{sparsity=0.5}},lower-cuda{{value_type=fp16,design={design}}}"
    compiled = sparsec.compile(model, x, pipeline, target="cuda")
    assert f"design={design}" in compiled.pipeline  # the option prints back, so the run can be repeated
    layers = compiled.kernels()
    assert layers and all(k.design == design for k in layers)
    kernel_name = {"runs": "bitmask-runs", "tiles": "bitmask", "mma": "bitmask-mma"}[design]  # tiles: its old key
    assert all(k.kernel._spec.cache_key[0] == kernel_name for k in layers)
    default = sparsec.compile(model, x, "prune-magnitude{sparsity=0.5},lower-cuda{value_type=fp16}", target="cuda")
    with torch.no_grad():
        assert _rel(compiled(x), default(x)) < 1e-5  # another kernel, the same product


def test_lower_cuda_names_the_designs_the_code_generator_builds():
    from sparsec.codegen.cuda import BITMASK_DESIGNS, DENSE_FROM_ROWS
    from sparsec.codegen.cuda.bitmask_mma import VALUE_TYPES
    from sparsec.passes.lower import CUDA_BITMASK_DESIGNS, CUDA_DENSE_FROM_ROWS, MMA_VALUE_TYPES

    assert CUDA_BITMASK_DESIGNS == BITMASK_DESIGNS
    assert MMA_VALUE_TYPES == VALUE_TYPES
    assert CUDA_DENSE_FROM_ROWS == DENSE_FROM_ROWS


@pytest.mark.parametrize(("option", "dense_from"), [("", 64), (",dense_from=4", 4), (",dense_from=0", None)])
def test_lower_cuda_dense_from_sets_where_prefill_runs_the_dense_weight(option, dense_from):
    model, _ = _small_mlp()
    # 6 rows: one sparse launch a layer on the simulator (its threads are Python threads: a 40-row
    # call, three launches, took a minute)
    x = torch.randn(6, model[0].in_features, generator=torch.Generator().manual_seed(5))
    pipeline = f"prune-magnitude{{sparsity=0.5}},lower-cuda{{value_type=fp16{option}}}"
    compiled = sparsec.compile(model, x, pipeline, target="cuda")
    # printed back when not the default, so the run can be repeated from the text
    assert (option.lstrip(",") in compiled.pipeline) if option else "dense_from" not in compiled.pipeline
    layers = compiled.kernels()
    assert layers and all(k.kernel.dense_from == dense_from for k in layers)
    # compile() ran the model once on x against eager with the pruned fp32 weights (fp16 values
    # differ by their rounding): 6 rows run the dense weight from 4 on and keep it; at 64, or
    # never, the layers stay sparse
    assert compiled.report.max_rel_error < 2e-3
    assert all(bool(k.kernel._dense) == (dense_from == 4) for k in layers)
    if dense_from == 4:  # the dense path, against the stored values exactly (fast: no simulated launch)
        reference = copy.deepcopy(model)
        for k in layers:
            reference.get_submodule(k.layer).weight = torch.nn.Parameter(k.packed.unpack(), requires_grad=False)
        with torch.no_grad():
            assert _rel(compiled(x), reference(x)) < 1e-5


@pytest.mark.parametrize("value", ["-1", "many"])
def test_a_bad_dense_from_is_refused_in_one_line(value):
    model, x = _small_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(Exception) as info:
        sparsec.compile(model, x, f"prune-magnitude{{sparsity=0.5}},lower-cuda{{dense_from={value}}}", target="cuda")
    message = str(info.value)
    assert "\n" not in message and "dense_from" in message, message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_unknown_lower_cuda_design_is_refused_in_one_line():
    model, x = _small_mlp()
    with pytest.raises(Exception) as info:
        sparsec.compile(model, x, "lower-cuda{design=fast}", target="cuda")
    message = str(info.value)
    assert "\n" not in message and "unknown design 'fast'" in message and "lanes, runs, tiles, mma" in message


@pytest.mark.parametrize(("pipeline", "says"), [
    ("prune-magnitude{sparsity=0.5},lower-cuda{design=mma,value_type=bf16}",
     "design mma runs fp16 or int8 values, not bf16"),
    # the default value type of a pruned layer is fp32: the message names the layer and the fix
    ("prune-magnitude{sparsity=0.5},lower-cuda{design=mma}", "but layer 0 would get fp32; add value_type=fp16"),
])
def test_the_mma_design_refuses_values_it_cannot_run_in_one_line(pipeline, says):
    model, x = _small_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(Exception) as info:
        sparsec.compile(model, x, pipeline, target="cuda")
    message = str(info.value)
    assert "\n" not in message and says in message, message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the model saves (tests/test_cuda_artifact.py)")
def test_a_model_compiled_under_the_simulator_is_not_saved(tmp_path):
    model, x = _small_mlp()
    compiled = sparsec.compile(model, x, "prune-magnitude{sparsity=0.5},lower-cuda", target="cuda")
    with pytest.raises(ArtifactError) as info:
        sparsec.save(compiled, str(tmp_path / "a"))
    message = str(info.value)
    assert "\n" not in message and "simulator" in message and "no GPU code to save" in message
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []
