"""insert-taps: block outputs found without model-specific code, returned next to the original output."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from sparsec.capture import capture
from sparsec.ir import meta
from sparsec.passes import PassContext, PassError, make_pass, run_passes
from sparsec.passes.taps import (
    TapError,
    auto_blocks,
    insert_taps,
    is_tapped,
    remove_taps,
    split_tapped,
    tap_names,
)


class Block(nn.Module):
    def __init__(self, d: int, experts: int = 0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)
        # an inner list, as in mixture-of-experts layers: part of the block, not a block list
        self.experts = nn.ModuleList([nn.Linear(d, d) for _ in range(experts)])

    def forward(self, x):
        y = x + self.fc2(torch.relu(self.fc1(x)))
        for e in self.experts:
            y = y + 0.5 * e(y)
        return self.norm(y)


class Net(nn.Module):
    def __init__(self, d: int = 16, vocab: int = 50, layers: int = 3, experts: int = 0) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, experts) for _ in range(layers)])
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def eager_block_outputs(model: nn.Module, blocks: nn.ModuleList, *args, **kwargs):
    got = []
    hooks = [b.register_forward_hook(lambda m, i, o: got.append(o[0] if isinstance(o, tuple) else o))
             for b in blocks]
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return out, got


def test_symbolic_trace_taps_structure_and_values():
    torch.manual_seed(0)
    model = Net().eval()
    ids = torch.randint(0, 50, (2, 5))
    gm = capture(copy.deepcopy(model), ids).graph_module
    gm, _ = run_passes(gm, [make_pass("insert-taps")], PassContext())
    assert tap_names(gm) == ["blocks.0", "blocks.1", "blocks.2"]
    marked = {n.name: n.meta[meta.BLOCK_OUTPUT] for n in gm.graph.nodes if meta.BLOCK_OUTPUT in n.meta}
    assert marked == {"blocks_0_norm": 0, "blocks_1_norm": 1, "blocks_2_norm": 2}
    last_line = gm.code.strip().splitlines()[-1].strip()
    assert last_line == "return (linear_6, (blocks_0_norm, blocks_1_norm, blocks_2_norm))"
    ref, hooks = eager_block_outputs(model, model.blocks, ids)
    out, hidden = split_tapped(gm(ids))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert len(hidden) == 3
    for h, r in zip(hidden, hooks):
        torch.testing.assert_close(h, r, rtol=0, atol=0)


def test_inner_lists_are_not_blocks_and_patterns_pick_outermost():
    model = Net(experts=2).eval()
    ids = torch.randint(0, 50, (2, 4))
    gm = capture(model, ids).graph_module
    assert auto_blocks(gm) == ["blocks.0", "blocks.1", "blocks.2"]
    # `*` also matches blocks.0.fc1, blocks.0.experts.1...: only the outermost matches count
    assert insert_taps(gm, "blocks.*") == ["blocks.0", "blocks.1", "blocks.2"]
    assert insert_taps(gm, "blocks.1") == ["blocks.1"]  # re-tapping replaces the taps
    assert len(split_tapped(gm(ids))[1]) == 1


def test_pattern_matching_nothing_is_an_error_and_leaves_graph_alone():
    gm = capture(Net().eval(), torch.randint(0, 50, (2, 4))).graph_module
    code = gm.code
    with pytest.raises(PassError, match=r"block pattern 'model.layers.\*' matches no module.*'blocks.0'"):
        run_passes(gm, [make_pass("insert-taps", blocks="model.layers.*")], PassContext())
    assert gm.code == code and not is_tapped(gm)


def test_graph_without_repeated_blocks_is_an_error():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    gm = capture(model, torch.randn(2, 4)).graph_module
    with pytest.raises(TapError, match="no repeated blocks"):
        insert_taps(gm)


def test_remove_taps_restores_the_output():
    model = Net().eval()
    ids = torch.randint(0, 50, (2, 4))
    gm = capture(model, ids).graph_module
    before = gm(ids)
    insert_taps(gm)
    remove_taps(gm)
    assert not is_tapped(gm)
    torch.testing.assert_close(gm(ids), before)
    with pytest.raises(TapError, match="insert-taps"):
        split_tapped(gm(ids))


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_exported_llama_taps_are_decoder_layer_outputs(tiny_llama):
    ids = torch.randint(0, 96, (2, 7))
    cap = capture(copy.deepcopy(tiny_llama), {"input_ids": ids.clone()})
    gm, _ = run_passes(cap.graph_module, [make_pass("insert-taps")], PassContext())
    assert tap_names(gm) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert gm.code.strip().splitlines()[-1].strip().startswith("return pytree.tree_unflatten((linear_21, "
                                                               "add_")
    x = torch.randint(0, 96, (3, 9))  # other batch and length: the graph stays dynamic
    ref, hooks = eager_block_outputs(tiny_llama, tiny_llama.model.layers, input_ids=x, use_cache=False)
    out, hidden = split_tapped(gm(input_ids=x, use_cache=False))
    assert type(out).__name__ == "CausalLMOutputWithPast"
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert len(hidden) == 3
    for h, r in zip(hidden, hooks):
        torch.testing.assert_close(h, r, rtol=1e-5, atol=1e-5)
    # the last tap is the raw residual stream, not HF's last hidden state (which is after the final norm)
    with torch.no_grad():
        hf = tiny_llama(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
    assert not torch.allclose(hidden[-1], hf[-1], atol=1e-3)
    remove_taps(gm)
    torch.testing.assert_close(gm(input_ids=x, use_cache=False).logits, ref.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_other_architectures_need_no_model_specific_code(arch):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if arch == "gpt2":  # Conv1D layers (addmm), blocks under transformer.h
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                           bos_token_id=0, eos_token_id=0)).eval()
        blocks, expected = model.transformer.h, ["transformer.h.0", "transformer.h.1"]
    else:  # post-norm encoder, blocks under encoder.layer
        config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=32)
        model = BertModel(config).eval()
        blocks, expected = model.encoder.layer, ["encoder.layer.0", "encoder.layer.1"]
    cap = capture(copy.deepcopy(model), {"input_ids": torch.randint(0, 64, (2, 7))})
    assert insert_taps(cap.graph_module) == expected
    x = torch.randint(0, 64, (3, 5))
    _, hooks = eager_block_outputs(model, blocks, input_ids=x)
    _, hidden = split_tapped(cap.graph_module(input_ids=x, **cap.constant_kwargs))
    for h, r in zip(hidden, hooks, strict=True):
        torch.testing.assert_close(h, r, rtol=1e-5, atol=1e-5)
