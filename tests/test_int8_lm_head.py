"""An int8 ``lm_head`` on a model whose ``lm_head`` is tied to its embedding (SmolLM2, Llama with
``tie_word_embeddings``).

``quantize{bits=8,ignore=*embed*}`` takes ``lm_head`` off the default ignore list. The captured
graph holds one parameter for the tied pair, and ``quantize`` writes its quantized values into
it, so the embedding lookup and the int8 ``lm_head`` kernel both use the same ``q * scale``
values. The reference is therefore the eager model with every linear weight replaced by its
packed weight unpacked and the embedding tied to the unpacked ``lm_head``.

A dense int8 weight runs the bitmask int8 ``rows`` kernel at batch 1-4 (every bit set): its
outputs carry that kernel's fixed-point rounding of ``x`` (relative 2^-24, see
docs/performance.md), far below the gap between the two best logits checked below.
"""

from __future__ import annotations

import copy

import pytest
import torch

import sparsec
from sparsec.codegen.cpu import build_linear_kernel
from sparsec.codegen.cpu.host import host_features
from sparsec.codegen.cpu.kernel import CpuLinearKernel
from sparsec.formats import pack
from sparsec.runtime.artifact import read_manifest
from sparsec.runtime.generate import generate

PIPELINE = "prune-magnitude{sparsity=0.5},quantize{bits=8,ignore=*embed*},lower-cpu"
VECTOR = host_features().vector_bitmask


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # a wide init makes the next-token choice depend on the input (greedy tokens worth comparing)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=0.3)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.fixture(scope="module")
def int8_head():
    model = _tied_llama()
    original = model.lm_head.weight.detach().clone()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    compiled = sparsec.compile(model, {"input_ids": ids}, PIPELINE)
    eager = copy.deepcopy(model)
    for k in compiled.kernels():
        eager.get_submodule(k.layer).weight = torch.nn.Parameter(k.packed.unpack(), requires_grad=False)
    eager.model.embed_tokens.weight = eager.lm_head.weight  # the tie, on the quantized values
    return model, original, compiled, eager


def test_lm_head_is_dense_int8_and_the_tie_holds_its_quantized_values(int8_head):
    model, original, compiled, _ = int8_head
    head = {k.layer: k for k in compiled.kernels()}["lm_head"]
    assert (head.packed.format_name, head.packed.value_type) == ("dense", "int8")
    assert head.packed.weight.dtype == torch.int8 and head.packed.scales.shape == (256,)
    if VECTOR:
        assert repr(head.kernel).endswith("kernel=bitmask-avx512 rows (all bits set) at batch <= 4, torch-dense above)")
    embedding = [p for n, p in compiled.graph_module.named_parameters() if "embed" in n]
    assert len(embedding) == 1  # one parameter for the tied pair
    # the embedding lookup reads the values the int8 kernel computes with ...
    assert torch.equal(embedding[0], head.packed.unpack())
    assert not torch.equal(embedding[0], original)
    # ... and the user's model is left as it was
    assert torch.equal(model.lm_head.weight, original) and model.lm_head.weight is model.model.embed_tokens.weight


def test_compiled_logits_match_eager_on_the_same_weights(int8_head):
    _, _, compiled, eager = int8_head
    # lm_head sees batch x length rows: 3 and 4 run the int8 kernel, 15 and 34 torch on the unpacked weight
    for batch, length in ((1, 3), (2, 2), (3, 5), (2, 17)):
        x = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            a, b = compiled(input_ids=x).logits, eager(input_ids=x).logits
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()


def test_greedy_tokens_match_huggingface_generate(int8_head):
    _, _, compiled, eager = int8_head
    for seed in (3, 4):
        ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(seed))
        result = generate(compiled, None, ids[0], 20, stop_at_eos=False)
        out = eager.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                             do_sample=False, pad_token_id=0)
        expected = out[:, ids.shape[1]:]
        assert torch.equal(result.tokens, expected), (result.tokens, expected)
        assert len(set(expected[0].tolist())) >= 4
        with torch.no_grad():
            top2 = eager(torch.cat([ids, expected], 1)).logits[0, ids.shape[1] - 1:-1].topk(2).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-4


def test_dense_int8_kernel_reads_the_packed_bytes_in_place():
    g = torch.Generator().manual_seed(5)
    rows, cols = 70, 203  # neither a multiple of 8 nor of the 64-column chunk
    packed = pack(torch.randn(rows, cols, generator=g), "dense", "int8")
    k = CpuLinearKernel(packed, torch.randn(rows, generator=g), "silu", parallel_min_weights=1)
    if VECTOR:
        assert k._impl.vals.ctypes.data == packed.weight.data_ptr()  # no copy of the values
        assert len(k._impl.parts) == 3  # two threads' row ranges
    ref = packed.unpack().double()
    for batch in (1, 2, 3, 4, 5, 40):
        x = torch.randn(batch, cols, generator=g)
        y = k(x).double()
        pre = x.double() @ ref.T + k._bias_t.double()
        exact = torch.nn.functional.silu(pre)
        bound = 3e-5 * (x.double().abs() @ ref.abs().T + k._bias_t.double().abs()) + 1e-6
        assert ((y - exact).abs() <= bound).all(), (batch, (y - exact).abs().max())
    assert build_linear_kernel(packed).value_type == "int8"


def test_artifact_of_an_int8_head_carries_the_bitmask_int8_kernels(tmp_path):
    # the body stays fp32 bitmask: only lm_head is int8, so only it needs the int8 kernels
    model = _tied_llama()
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    compiled = sparsec.compile(model, {"input_ids": ids},
                               "prune-magnitude{sparsity=0.5},quantize{bits=8,layers=lm_head,ignore=*embed*},lower-cpu")
    assert {(k.packed.format_name, k.packed.value_type) for k in compiled.kernels()} == {
        ("bitmask", "fp32"), ("dense", "int8")}
    sparsec.save(compiled, tmp_path / "a")
    kernels = read_manifest(tmp_path / "a")["kernels"]
    generated = {k["generated"] for k in kernels["kernels"]}
    if VECTOR:
        assert "bitmask_int8" in generated
    loaded = sparsec.load(tmp_path / "a")
    x = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, compiled(input_ids=x).logits)
