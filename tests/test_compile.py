"""sparsec.compile end to end: compiled output against eager PyTorch, and the report.

Tolerance: the CPU kernels accumulate in float32 in a different order than oneDNN, so outputs
agree to a few float32 ulps of the largest value: max relative error (max |diff| / max |ref|)
below 1e-5 for fp32 values.
"""

from __future__ import annotations

import copy

import pytest
import torch

import sparsec
from sparsec.api import CompileError
from sparsec.passes import PipelineSyntaxError
from sparsec.runtime.compiled import CompiledModule, KernelLinear

TOL = 1e-5


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _eager_pruned(model, compiled):
    """The original model with the compiled masks applied: the eager reference on the same weights."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    for k in compiled.kernels():
        dense = k.packed.unpack()
        w = params[f"{k.layer}.weight"]
        with torch.no_grad():
            w.copy_(dense if w.shape == dense.shape else dense.t())
    return ref


def test_mlp_compiles_and_matches_eager(mlp):
    model, x = mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = sparsec.compile(model, (x,), "prune-magnitude{sparsity=0.75},lower-cpu")
    assert isinstance(compiled, CompiledModule) and isinstance(compiled, torch.nn.Module)
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    kernels = compiled.kernels()
    assert [k.layer for k in kernels] == ["0", "2", "4"]
    ref = _eager_pruned(model, compiled)
    x2 = torch.randn(9, 48, generator=torch.Generator().manual_seed(7))
    assert _rel(compiled(x2), ref(x2)) < TOL
    report = compiled.report
    assert [r.name for r in report.layers] == ["0", "2", "4"]
    for r in report.layers:
        assert r.format == "bitmask" and r.value_type == "fp32"
        assert r.sparsity == pytest.approx(0.75, abs=1e-9)
        assert 0 < r.nbytes < r.dense_bytes
        assert r.max_rel_error is not None and r.max_rel_error < TOL
    assert report.max_rel_error < TOL
    assert report.max_rel_error_vs_original > 1e-3  # pruning 75% changes the function
    assert "bitmask" in report.table() and report.pipeline == "prune-magnitude{sparsity=0.75},lower-cpu"
    # kernel compile time per layer: a column of the table, what an earlier layer compiled costs 0
    assert "compile s" in report.table().splitlines()[0]
    assert all(r.compile_seconds >= 0 for r in report.layers) and report.kernel_seconds >= sum(
        r.compile_seconds for r in report.layers)


def test_tiny_llama_compiles_and_matches_eager(tiny_llama):
    model, inputs = tiny_llama
    compiled = sparsec.compile(model, inputs, "prune-magnitude{sparsity=0.5}")
    assert compiled.report.capture_method == "export"
    assert len(compiled.kernels()) == 15  # 7 per block x 2 + lm_head
    names = {r.name: r for r in compiled.report.layers}
    assert names["lm_head"].format == "dense" and names["lm_head"].sparsity < 0.01
    assert names["model.layers.1.mlp.down_proj"].sparsity == pytest.approx(0.5)
    ref = _eager_pruned(model, compiled)
    for shape in [(1, 12), (3, 7)]:  # other batch and sequence sizes than the example
        ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            assert _rel(compiled(input_ids=ids).logits, ref(input_ids=ids).logits) < TOL
            assert _rel(compiled(ids).logits, ref(input_ids=ids).logits) < TOL  # positional binding
    assert compiled.report.max_rel_error < TOL


def test_bert_encoder_compiles_and_matches_eager(tiny_bert):
    model, inputs = tiny_bert
    compiled = sparsec.compile(model, inputs, "prune-magnitude{sparsity=0.6,scope=global}")
    ref = _eager_pruned(model, compiled)
    with torch.no_grad():
        out = compiled(**inputs).last_hidden_state
        assert _rel(out, ref(**inputs).last_hidden_state) < TOL
    total = sum(r.sparsity * r.shape[0] * r.shape[1] for r in compiled.report.layers)
    assert total / sum(r.shape[0] * r.shape[1] for r in compiled.report.layers) == pytest.approx(0.6, abs=1e-3)


def test_dense_pipeline_is_exact(mlp):
    model, x = mlp
    compiled = sparsec.compile(model, (x,), "dense-cpu")
    assert {r.format for r in compiled.report.layers} == {"dense"}
    assert _rel(compiled(x), model(x)) < TOL
    assert compiled.report.max_rel_error_vs_original < TOL


def test_compiled_module_keeps_only_packed_weights(mlp):
    model, x = mlp
    compiled = sparsec.compile(model, (x,), "prune-magnitude{sparsity=0.5}")
    assert not [n for n, _ in compiled.named_parameters() if n.endswith("weight")]
    assert all(isinstance(k, KernelLinear) for k in compiled.kernels())


class _EmbedNormMLP(torch.nn.Module):
    """Leaf modules with their own parameters (Embedding, LayerNorm) between Linears: symbolic
    tracing keeps them as ``call_module`` nodes that read their parameters without ``get_attr``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(40, 32)
        self.up = torch.nn.Linear(32, 64)
        self.norm = torch.nn.LayerNorm(64)
        self.down = torch.nn.Linear(64, 16)

    def forward(self, ids):
        return self.down(torch.relu(self.norm(self.up(self.embed(ids)))))


def test_leaf_modules_keep_their_parameters(tmp_path):
    torch.manual_seed(0)
    model = _EmbedNormMLP().eval()
    with torch.no_grad():  # not the default ones and zeros, so a lost affine would show
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    compiled = sparsec.compile(model, (ids,), pipeline="prune-magnitude{sparsity=0.5},lower-cpu")
    assert compiled.report.capture_method == "symbolic_trace"
    assert [k.layer for k in compiled.kernels()] == ["up", "down"]
    params = {n for n, _ in compiled.named_parameters()}
    assert params == {"graph_module.embed.weight", "graph_module.norm.weight", "graph_module.norm.bias"}
    ref = _eager_pruned(model, compiled)
    ids2 = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = compiled(ids2)
        assert _rel(y, ref(ids2)) < TOL
    path = tmp_path / "embed-norm"
    sparsec.save(compiled, path)
    with torch.no_grad():
        assert torch.equal(sparsec.load(path)(ids2), y)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"target": "tpu"}, CompileError, "unknown target 'tpu'"),
    ({"pipeline": "prune-magnitude{sparsity=0.5},lower-cuda", "target": "cpu"}, CompileError, "lowers with lower-cuda"),
    ({"pipeline": "lower-cpu,prune-magnitude"}, CompileError, "must be the last pass"),
    ({"pipeline": "prune-magnitude{sparsity=-0.1}"}, PipelineSyntaxError, r"sparsity must be in \[0, 1\)"),
    ({"pipeline": "prune-magnitude{layers=nothing_matches}"}, Exception, "matches no layer"),
    ({"pipeline": "prune-wanda{sparsity=0.5}"}, Exception, r"pass calibration=\[inputs, \.\.\.\] to sparsec\.compile"),
    ({"calibration": torch.ones(5, 48)}, CompileError, r"calibration must be a list of inputs .* got Tensor"),
])
def test_bad_options_fail_clearly_and_leave_model_unchanged(mlp, kwargs, error, match):
    model, x = mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        sparsec.compile(model, (x,), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nan_weights_are_refused_naming_the_layer(mlp):
    model, x = mlp
    with torch.no_grad():
        model[2].weight[3, 4] = float("nan")
    with pytest.raises(Exception, match=r"layer '2' has 1 NaN/Inf weight"):
        sparsec.compile(model, (x,), "prune-magnitude{sparsity=0.5}")
    assert torch.isnan(model[2].weight[3, 4])  # still the user's (bad) weight, nothing else changed


@pytest.mark.parametrize("pipeline, where", [
    ("lower-cpu", "weight"),
    ("fuse-epilogue,lower-cpu", "weight"),
    ("lower-cpu", "bias"),
])
def test_nan_weights_and_biases_are_refused_at_lowering_naming_the_layer(mlp, pipeline, where):
    model, x = mlp
    with torch.no_grad():
        getattr(model[2], where).view(-1)[3] = float("inf")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(Exception, match=rf"pass 'lower-cpu' failed .*layer '2' has 1 NaN/Inf {where} value"):
        sparsec.compile(model, (x,), pipeline)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("model, inputs, match", [
    (lambda x: x, torch.ones(2, 48), "model must be a torch.nn.Module, got function"),
    (None, torch.ones(2, 48), "model must be a torch.nn.Module, got NoneType"),
    (torch.nn.Linear(48, 8), torch.full((2, 48), float("nan")), "positional input 0 holds 96 NaN/Inf value"),
    (torch.nn.Linear(48, 8), {"input": torch.full((2, 48), float("inf"))}, "input 'input' holds 96 NaN/Inf"),
])
def test_bad_models_and_inputs_are_one_clear_error(model, inputs, match):
    with pytest.raises(CompileError, match=match) as info:
        sparsec.compile(model, inputs)
    assert "\n" not in str(info.value)


def test_a_model_in_training_mode_is_left_as_it_was():
    """The reference output comes from the compiled copy: the user's BatchNorm statistics stay."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                torch.nn.Dropout(0.5), torch.nn.Linear(32, 8)).train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(6, 16)
    compiled = sparsec.compile(model, (x,), "lower-cpu")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # dense fp32 kernels, so the compiled model equals the model in eval mode
    assert compiled.report.max_rel_error_vs_original < TOL
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got str"):
        compiled("not a tensor")


def test_cuda_without_a_gpu_is_one_sentence_saying_what_to_use(mlp, monkeypatch):
    import sparsec.codegen.cuda as cuda

    reason = "no CUDA driver or NVIDIA GPU is visible to numba-cuda"
    monkeypatch.setattr(cuda, "cuda_available", lambda: (False, reason))
    model, x = mlp
    with pytest.raises(Exception, match=r"^target='cuda' needs an NVIDIA GPU .*; compile with target='cpu'$") as info:
        sparsec.compile(model, (x,), "prune-magnitude{sparsity=0.5}", target="cuda")
    assert "\n" not in str(info.value)
