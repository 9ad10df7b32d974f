"""``fuse-epilogue``: bias, activation and SwiGLU pairs recorded for the kernels, graph untouched."""

from __future__ import annotations

import torch

from sparsec.capture import capture
from sparsec.ir import meta
from sparsec.passes import PassContext, Pipeline, run_passes


def _fuse(gm):
    code = gm.code
    gm, _ = run_passes(gm, list(Pipeline.parse("fuse-epilogue")), PassContext())
    assert gm.code == code, "fuse-epilogue is an analysis: the graph must not change"
    return {n.meta[meta.LAYER].name: n.meta[meta.FUSION] for n in gm.graph.nodes if meta.LAYER in n.meta}


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 32, bias=False)
        self.c = torch.nn.Linear(32, 8)
        self.d = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.a(x), approximate="tanh")  # not the erf form: not fused
        pre = self.b(h)
        h = torch.relu(pre) + pre  # the pre-activation is used again: not fused
        return torch.nn.functional.silu(self.d(self.c(h)))


def test_activations_and_bias_of_a_traced_mlp(mlp):
    model, x = mlp  # Linear, GELU, Linear, ReLU, Linear (nn modules stay call_module nodes)
    fused = _fuse(capture(model, (x,)).graph_module)
    assert [(r["bias"], r["activation"]) for r in fused.values()] == [(True, "gelu"), (True, "relu"), (True, None)]
    assert all(r["activation_node"] for r in list(fused.values())[:2])
    assert all(r["swiglu_partner"] is None for r in fused.values())


def test_unfusable_epilogues_are_left_alone():
    model = _Block().eval()
    fused = _fuse(capture(model, (torch.randn(3, 16),)).graph_module)
    assert fused["a"]["activation"] is None  # tanh GELU
    assert fused["b"]["activation"] is None and fused["b"]["bias"] is False  # two users
    assert fused["c"]["activation"] is None
    assert fused["d"]["activation"] == "silu" and fused["d"]["swiglu_partner"] is None


def test_swiglu_pairs_in_a_llama(tiny_llama):
    model, inputs = tiny_llama
    fused = _fuse(capture(model, inputs).graph_module)
    for i in range(2):
        gate, up = fused[f"model.layers.{i}.mlp.gate_proj"], fused[f"model.layers.{i}.mlp.up_proj"]
        assert gate["activation"] == "silu" and gate["swiglu_role"] == "gate"
        assert gate["swiglu_partner"] == f"model.layers.{i}.mlp.up_proj"
        assert up["swiglu_partner"] == f"model.layers.{i}.mlp.gate_proj" and up["swiglu_role"] == "up"
        assert gate["swiglu_node"] == up["swiglu_node"] is not None
        assert fused[f"model.layers.{i}.self_attn.q_proj"]["activation"] is None
        assert fused[f"model.layers.{i}.mlp.down_proj"]["swiglu_partner"] is None
    assert fused["lm_head"]["bias"] is False
