"""Generation with a KV cache over the compiled kernels.

Reference: Hugging Face's own ``generate`` on the eager model whose weights are the compiled
model's packed weights unpacked (the same masked, bf16-rounded values). Greedy tokens must be
identical: the kernels agree with eager PyTorch to float32 rounding, far below the gap between
the top two logits of this model (checked below, so the test cannot pass by luck).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsec
from sparsec.runtime.generate import FusedPart, GenerationError, build_decoder, generate

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sparsec.models import cache_dir, load

    folder = cache_dir() / "smollm2-135m"
    if not (folder / "config.json").exists():
        load("smollm2-135m")  # builds the offline cache once
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def compiled_llama(tokenizer):
    """A 2-layer random Llama over SmolLM2's vocabulary, 50% sparse bf16 kernels, and the eager
    model holding exactly the compiled (masked, rounded) weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # a wide init makes the random model's next-token choice depend on its input (not one token)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.3)
    model = LlamaForCausalLM(config).eval()
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    compiled = sparsec.compile(model, {"input_ids": ids}, "prune-magnitude{sparsity=0.5},lower-cpu{value_type=bf16}")
    eager = copy.deepcopy(model)
    for k in compiled.kernels():
        # a new parameter, not a copy into the old one: lm_head's weight is tied to the embedding,
        # which the compiled graph keeps in fp32 while the lm_head kernel holds bf16 values
        eager.get_submodule(k.layer).weight = torch.nn.Parameter(k.packed.unpack(), requires_grad=False)
    return model, compiled, eager


def _hf_greedy(eager, ids, n):
    out = eager.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def test_greedy_tokens_match_eager_huggingface(compiled_llama, tokenizer):
    _, compiled, eager = compiled_llama
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        result = generate(compiled, tokenizer, prompt, 24, stop_at_eos=False)
        expected = _hf_greedy(eager, ids, 24)
        assert torch.equal(result.tokens, expected), (result.tokens, expected)
        assert len(set(result.tokens[0].tolist())) >= 4  # a sequence worth comparing
        assert result.text == tokenizer.decode(expected[0], skip_special_tokens=True)
        assert result.steps == 24 and result.batch == 1 and result.tokens_per_second > 0
    # the margin between the two best logits along the way is far above kernel rounding
    with torch.no_grad():
        full = torch.cat([ids, expected], 1)
        top2 = eager(full).logits[0, ids.shape[1] - 1:-1].topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4


def test_fused_kernels_give_the_same_tokens(compiled_llama, tokenizer):
    _, compiled, _ = compiled_llama
    fused, plain = build_decoder(compiled), build_decoder(compiled, fuse=False)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert all(isinstance(m, FusedPart) for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj))
    assert attn.q_proj.group is attn.v_proj.group and mlp.up_proj.group is not attn.q_proj.group
    assert not isinstance(plain.model.layers[0].self_attn.q_proj, FusedPart)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    for name in ("q_proj", "k_proj", "v_proj"):
        a = getattr(attn, name)(x)
        b = getattr(plain.model.layers[0].self_attn, name)(x)
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids[0]
    assert torch.equal(generate(fused, None, ids, 12, stop_at_eos=False).tokens,
                       generate(plain, None, ids, 12, stop_at_eos=False).tokens)


def test_batch_of_prompts_left_padded_matches_single_prompts(compiled_llama, tokenizer):
    _, compiled, _ = compiled_llama
    batch = generate(compiled, tokenizer, PROMPTS, 12, stop_at_eos=False)
    assert batch.batch == 2 and isinstance(batch.text, list)
    for row, prompt in enumerate(PROMPTS):
        single = generate(compiled, tokenizer, prompt, 12, stop_at_eos=False)
        assert torch.equal(batch.tokens[row], single.tokens[0])
        assert batch.text[row] == single.text


def test_eager_model_runs_through_the_same_loop(compiled_llama, tokenizer):
    _, compiled, eager = compiled_llama
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    a = generate(eager, None, ids[0], 10, stop_at_eos=False)
    b = generate(compiled, None, ids[0], 10, stop_at_eos=False)
    assert torch.equal(a.tokens, b.tokens) and a.text == b.text == ""


def test_sampling_is_reproducible_and_top_k_1_is_greedy(compiled_llama, tokenizer):
    _, compiled, _ = compiled_llama
    a = generate(compiled, tokenizer, PROMPTS[0], 16, temperature=1.0, seed=5, stop_at_eos=False)
    b = generate(compiled, tokenizer, PROMPTS[0], 16, temperature=1.0, seed=5, stop_at_eos=False)
    c = generate(compiled, tokenizer, PROMPTS[0], 16, temperature=1.0, seed=6, stop_at_eos=False)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    greedy = generate(compiled, tokenizer, PROMPTS[0], 16, stop_at_eos=False)
    k1 = generate(compiled, tokenizer, PROMPTS[0], 16, temperature=0.7, top_k=1, seed=1, stop_at_eos=False)
    assert torch.equal(k1.tokens, greedy.tokens)


def test_stream_pieces_add_up_to_the_text(compiled_llama, tokenizer):
    _, compiled, _ = compiled_llama
    pieces: list[str] = []
    result = generate(compiled, tokenizer, PROMPTS[1], 12, stream=pieces.append, stop_at_eos=False)
    assert len(pieces) == 12 and "".join(pieces) == result.text


def test_stops_at_the_end_token(compiled_llama, tokenizer):
    _, compiled, _ = compiled_llama
    free = generate(compiled, tokenizer, PROMPTS[0], 8, stop_at_eos=False)
    decoder = build_decoder(compiled)  # the decoder generate used (built once per compiled model)
    saved = decoder.generation_config.eos_token_id
    decoder.generation_config.eos_token_id = int(free.tokens[0, 2])  # make the third token the end
    try:
        stopped = generate(compiled, tokenizer, PROMPTS[0], 8)
    finally:
        decoder.generation_config.eos_token_id = saved
    first = free.tokens[0].tolist().index(int(free.tokens[0, 2]))
    assert stopped.steps == first + 1 and stopped.finished == [True]
    assert torch.equal(stopped.tokens[0], free.tokens[0, : first + 1])


@pytest.fixture(scope="module")
def artifact(compiled_llama, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "art"
    sparsec.save(compiled_llama[1], path, tokenizer=tokenizer)
    return path


def test_artifact_generates_the_same_tokens(compiled_llama, tokenizer, artifact):
    _, compiled, _ = compiled_llama
    expected = generate(compiled, tokenizer, PROMPTS[0], 10, stop_at_eos=False)
    result = generate(artifact, None, PROMPTS[0], 10, stop_at_eos=False)  # the tokenizer saved with it
    assert torch.equal(result.tokens, expected.tokens) and result.text == expected.text


def test_cli_generate_prints_the_continuation(compiled_llama, tokenizer, artifact, tmp_path):
    _, compiled, _ = compiled_llama
    expected = generate(compiled, tokenizer, PROMPTS[0], 6, stop_at_eos=False)
    env = {**os.environ, "PYTHONPATH": str(Path(sparsec.__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "sparsec.cli", "generate", str(artifact), "--prompt",
                           PROMPTS[0], "--max-new-tokens", "6"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(PROMPTS[0])
    if not any(t in expected.tokens[0].tolist() for t in (tokenizer.eos_token_id,)):
        assert proc.stdout.rstrip("\n") == PROMPTS[0] + expected.text
    assert "tokens/s (fused step)" in proc.stderr
    by_module = subprocess.run([sys.executable, "-m", "sparsec.cli", "generate", str(artifact), "--prompt",
                                PROMPTS[0], "--max-new-tokens", "6", "--step", "modules"], capture_output=True,
                               text=True, env=env, timeout=600)
    assert by_module.returncode == 0 and by_module.stdout == proc.stdout
    assert "tokens/s (modules step)" in by_module.stderr
    bad = subprocess.run([sys.executable, "-m", "sparsec.cli", "generate", str(tmp_path), "--prompt", "x"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "not a sparsec artifact" in bad.stderr and len(bad.stderr.splitlines()) == 1


@pytest.mark.parametrize("kwargs, words", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": torch.tensor([[999999]])}, "token ids must lie"),
    ({"tokenizer": None}, "needs a tokenizer"),
])
def test_bad_arguments_are_one_clear_error(compiled_llama, tokenizer, kwargs, words):
    _, compiled, _ = compiled_llama
    args = {"tokenizer": tokenizer, "prompt": PROMPTS[0], "max_new_tokens": 4, **kwargs}
    with pytest.raises(GenerationError, match=words):
        generate(compiled, args.pop("tokenizer"), args.pop("prompt"), **args)


def test_a_model_that_is_not_a_causal_lm_is_refused():
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    compiled = sparsec.compile(mlp, (torch.randn(2, 16),), "prune-magnitude{sparsity=0.5}")
    with pytest.raises(GenerationError, match="no Hugging Face model"):
        generate(compiled, None, torch.tensor([1, 2, 3]), 4)
    with pytest.raises(GenerationError, match="needs a CompiledModule"):
        generate(mlp, None, torch.tensor([1, 2, 3]), 4)
