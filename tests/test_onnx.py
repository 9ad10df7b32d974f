"""ONNX export: masks folded into the weights, constants folded, int8 QDQ, checked in onnxruntime.

Tolerances: float32 exports compute the same products as eager PyTorch in another order, so
outputs agree to 1e-5 of the largest output; int8 QDQ files are compared with eager PyTorch on
the same dequantized weights (same tolerance). A compiled model's kernels differ from dense
``F.linear`` by float32 rounding (and, for int8 kernels, their 24-bit fixed-point activations):
1e-4 of the largest logit.
"""

from __future__ import annotations

import os
import stat
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.nn.utils import prune

import sparsec
from sparsec.export import OnnxExportError, export_onnx
from sparsec.formats.values import dequantize, quantize


def _session(path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture
def pruned_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 96),
                                torch.nn.ReLU(), torch.nn.Linear(96, 24)).eval()
    for m in model:
        if isinstance(m, torch.nn.Linear):
            prune.l1_unstructured(m, "weight", amount=0.6)
    return model


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_pruned_mlp_masks_fold_into_weights(pruned_mlp, tmp_path):
    before = {k: v.clone() for k, v in pruned_mlp.state_dict().items()}
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(1))
    result = export_onnx(pruned_mlp, (x,), tmp_path / "mlp.onnx")
    # the user's model keeps its masks and values
    assert all(torch.equal(before[k], v) for k, v in pruned_mlp.state_dict().items())
    assert hasattr(pruned_mlp[0], "weight_orig")
    model = onnx.load(str(tmp_path / "mlp.onnx"))
    ops = Counter(n.op_type for n in model.graph.node)
    # weight_orig * weight_mask and the transposes are folded: three Gemm on initializers remain,
    # beside exact GELU (x * 0.5 * (1 + erf(x / sqrt 2))) and ReLU
    assert ops == Counter({"Gemm": 3, "Mul": 2, "Div": 1, "Erf": 1, "Add": 1, "Relu": 1})
    assert result.nodes < result.nodes_exported
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "mlp.onnx").st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    inits = _initializers(tmp_path / "mlp.onnx")
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    for gemm, layer in zip(gemms, [pruned_mlp[0], pruned_mlp[2], pruned_mlp[4]]):
        w = inits[gemm.input[1]]
        expected = layer.weight.detach().numpy()
        assert np.array_equal(w, expected) or np.array_equal(w.T, expected)
        assert (w == 0).mean() == pytest.approx(0.6, abs=0.01)
    # another batch size than the example: the batch dimension is dynamic
    x2 = torch.randn(11, 48, generator=torch.Generator().manual_seed(2))
    got = _session(tmp_path / "mlp.onnx").run(None, {"input_0": x2.numpy()})[0]
    with torch.no_grad():
        assert _rel(got, pruned_mlp(x2)) < 1e-5
    assert result.max_rel_error is not None and result.max_rel_error < 1e-5


def test_int8_qdq_weights(pruned_mlp, tmp_path):
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(1))
    fp32 = export_onnx(pruned_mlp, (x,), tmp_path / "fp32.onnx")
    result = export_onnx(pruned_mlp, (x,), tmp_path / "int8.onnx", quantize="int8")
    assert result.quantized_layers == 3 and result.notes == []
    model = onnx.load(str(tmp_path / "int8.onnx"))
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 3
    inits = _initializers(tmp_path / "int8.onnx")
    # the reference: eager PyTorch on the same int8 levels times per-row scales
    ref = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 96),
                              torch.nn.ReLU(), torch.nn.Linear(96, 24)).eval()
    for m, src, node in zip([ref[0], ref[2], ref[4]], [pruned_mlp[0], pruned_mlp[2], pruned_mlp[4]], dq):
        levels, scales = quantize((src.weight_orig * src.weight_mask).detach(), "int8")
        with torch.no_grad():
            m.bias.copy_(src.bias)
        stored = inits[node.input[0]]
        assert stored.dtype == np.int8
        assert np.array_equal(stored, levels.numpy()) or np.array_equal(stored.T, levels.numpy())
        assert np.array_equal(inits[node.input[1]], scales.numpy())
        with torch.no_grad():
            m.weight.copy_(dequantize(levels, "int8", scales))
    x2 = torch.randn(7, 48, generator=torch.Generator().manual_seed(3))
    got = _session(tmp_path / "int8.onnx").run(None, {"input_0": x2.numpy()})[0]
    with torch.no_grad():
        assert _rel(got, ref(x2)) < 1e-5
    assert result.initializer_bytes < fp32.initializer_bytes / 3


@pytest.fixture(scope="module")
def compiled_int8_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    compiled = sparsec.compile(model, {"input_ids": ids}, "prune-magnitude{sparsity=0.5},lower-cpu{value_type=int8}")
    return compiled, ids


@pytest.mark.parametrize("q", [None, "int8"])
def test_compiled_llama_exports_its_own_weights(compiled_int8_llama, tmp_path, q):
    compiled, ids = compiled_int8_llama
    result = sparsec.export_onnx(compiled, {"input_ids": ids}, tmp_path / "llama.onnx", quantize=q)
    assert result.inputs == ["input_ids"] and len(result.outputs) == 1
    assert result.nodes < result.nodes_exported / 1.5
    x = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(5))
    got = _session(tmp_path / "llama.onnx").run(None, {"input_ids": x.numpy()})[0]
    with torch.no_grad():
        expected = compiled(input_ids=x).logits
    assert _rel(got, expected) < 1e-4
    if q == "int8":
        assert result.quantized_layers == 15
        model = onnx.load(str(tmp_path / "llama.onnx"))
        inits = _initializers(tmp_path / "llama.onnx")
        levels = [inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert all(a.dtype == np.int8 for a in levels)
        # a compiled int8 layer keeps its own levels: down_proj of block 1 is among them
        k = next(k for k in compiled.kernels() if k.layer == "model.layers.1.mlp.down_proj")
        own, _ = quantize(k.packed.unpack(), "int8", scales=k.packed.scales)
        assert any(np.array_equal(a, own.numpy()) or np.array_equal(a.T, own.numpy()) for a in levels)


def test_bad_options_are_one_clear_error(pruned_mlp, tmp_path):
    x = torch.randn(2, 48)
    with pytest.raises(OnnxExportError, match="quantize must be None or 'int8'"):
        export_onnx(pruned_mlp, (x,), tmp_path / "m.onnx", quantize="int4")
    with pytest.raises(OnnxExportError, match="is a directory"):
        export_onnx(pruned_mlp, (x,), tmp_path)
    with pytest.raises(OnnxExportError, match="needs an nn.Module"):
        export_onnx("model", (x,), tmp_path / "m.onnx")
    with pytest.raises(OnnxExportError, match="fails on the example inputs"):
        export_onnx(pruned_mlp, (torch.randn(2, 5),), tmp_path / "m.onnx", check=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    with pytest.raises(OnnxExportError, match="a-file is a file, not a directory; choose a writable location"):
        export_onnx(pruned_mlp, (x,), blocker / "m.onnx")
    assert blocker.read_text() == "mine"
    assert not (tmp_path / "m.onnx").exists()
