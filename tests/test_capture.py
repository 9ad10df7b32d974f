"""Capture of plain modules and of transformers models, and what happens when tracing fails."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsec.capture import CaptureError, capture
from sparsec.ir.layers import find_layers


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: symbolic_trace cannot follow it
            return self.proj(x)
        return -self.proj(x)


class WithOpaquePart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.tricky = DataDependent()
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.tricky(torch.relu(self.inp(x))))


class RootDataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x)
        return y * 2 if y.shape[0] > 1 else y


def test_mlp_is_symbolically_traced_and_normalized(mlp):
    model, x = mlp
    cap = capture(model, (x,))
    assert cap.method == "symbolic_trace" and cap.opaque == []
    assert "call_module" not in {n.op for n in cap.graph_module.graph.nodes if n.target in ("0", "2", "4")}
    layers = find_layers(cap.graph_module)
    assert [(x.name, x.kind, x.shape) for x in layers] == [("0", "linear", (96, 48)), ("2", "linear", (96, 96)),
                                                          ("4", "linear", (24, 96))]
    torch.testing.assert_close(cap.graph_module(x), model(x), rtol=0, atol=0)


def test_untraceable_part_stays_opaque_and_is_reported():
    torch.manual_seed(0)
    model = WithOpaquePart().eval()
    x = torch.randn(3, 8)
    cap = capture(model, (x,))
    assert [(p.name, p.module_type) for p in cap.opaque] == [("tricky", "DataDependent")]
    assert "control flow" in cap.opaque[0].reason
    assert [x.name for x in find_layers(cap.graph_module)] == ["inp", "out"]
    torch.testing.assert_close(cap.graph_module(x), model(x))
    torch.testing.assert_close(cap.graph_module(-x.abs() - 5), model(-x.abs() - 5))


def test_root_that_does_not_trace_falls_back_to_export():
    model = RootDataDependent().eval()
    x = torch.randn(3, 8)
    cap = capture(model, (x,))
    assert cap.method == "export"
    torch.testing.assert_close(cap.graph_module(x), model(x))


def test_capture_does_not_modify_the_model(mlp):
    model, x = mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture(model, (x,))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad, match", [
    ("not a module", "expected a torch.nn.Module"),
])
def test_bad_model(bad, match):
    with pytest.raises(CaptureError, match=match):
        capture(bad, (torch.randn(1),))


def test_bad_example_inputs_give_one_sentence(mlp):
    model, _ = mlp
    with pytest.raises(CaptureError, match="example_inputs must be"):
        capture(model, 3.5)
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(2, 7),))  # wrong feature size: neither path can run it
    assert "could not capture Sequential" in str(info.value)
    assert "\n" not in str(info.value)


def _hf_cases():
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MptConfig,
        MptForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    ids = lambda b, s: torch.randint(0, 128, (b, s), generator=torch.Generator().manual_seed(s))  # noqa: E731
    return {
        "llama": (lambda: LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)), {"input_ids": ids(2, 8)}, 15),
        "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                 bos_token_id=0, eos_token_id=0)), {"input_ids": ids(2, 8)}, 9),
        "bert": (lambda: BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=64)), {"input_ids": ids(2, 8)}, 13),
        "mpt": (lambda: MptForCausalLM(MptConfig(vocab_size=128, d_model=32, n_heads=4, n_layers=2, max_seq_len=32)),
                {"input_ids": ids(2, 8)}, 9),
        "t5": (lambda: T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
               num_heads=4, decoder_start_token_id=0)), {"input_ids": ids(2, 8), "decoder_input_ids": ids(2, 5)}, 33),
        "whisper": (lambda: WhisperForConditionalGeneration(WhisperConfig(
            vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
            max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)),
            {"input_features": torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0)),
             "decoder_input_ids": ids(2, 5)}, 35),
    }


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "mpt", "t5", "whisper"])
def test_transformers_models_are_exported(name):
    make, inputs, n_layers = _hf_cases()[name]
    torch.manual_seed(0)
    model = make().eval()
    cap = capture(model, inputs)
    assert cap.method == "export"
    layers = find_layers(cap.graph_module)
    assert len(layers) == n_layers
    if name == "gpt2":
        assert {x.kind for x in layers} == {"addmm_t", "linear"}  # Conv1D blocks and the lm_head
    with torch.no_grad():
        ref = model(**inputs)
        out = cap.graph_module(**inputs, **cap.constant_kwargs)
    key = "last_hidden_state" if name == "bert" else "logits"
    torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5)
