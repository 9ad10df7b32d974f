"""The fused batch-1 decode step: every decoder layer in one compiled call a token.

References: the same compiled model decoded module by module (the Hugging Face layers calling
the same kernels one at a time), and eager PyTorch on the compiled model's own weights (packed,
unpacked: the same masked, rounded values). Logits must agree to float32 rounding, tokens must be
identical, and no decoder layer's Python may run during a fused decode step.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sparsec
from sparsec.runtime.decode_step import FusedDecodeStep, fused_step_for
from sparsec.runtime.generate import GenerationError, build_decoder, generate

VOCAB = 300


def _model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # a wide init makes the next token depend on the context, so equal tokens mean something
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, initializer_range=0.3, rope_theta=1000.0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["int8", "bf16", "fp32"])
def compiled(request):
    model = _model()
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    vt = request.param
    c = sparsec.compile(model, {"input_ids": ids}, f"prune-magnitude{{sparsity=0.6}},lower-cpu{{value_type={vt}}}")
    eager = copy.deepcopy(model)
    for k in c.kernels():
        eager.get_submodule(k.layer).weight = torch.nn.Parameter(k.packed.unpack(), requires_grad=False)
    return vt, c, eager, ids[0]


def test_the_step_is_built_for_a_compiled_llama(compiled):
    vt, c, _, _ = compiled
    assert "note: batch-1 decode step: one compiled call a token" in c.report.table()
    step = fused_step_for(build_decoder(c))
    assert isinstance(step, FusedDecodeStep), step
    assert step.value_type == vt and step.layers == 3 and (step.heads, step.kv_heads, step.head_dim) == (4, 2, 16)
    assert fused_step_for(build_decoder(c)) is step  # built once while the modules stay in place


def test_fused_tokens_equal_module_tokens_past_a_cache_regrowth(compiled):
    _, c, _, ids = compiled
    # 9 prompt tokens + 80 new ones: the fused cache starts at 64 positions and has to grow
    fused = generate(c, None, ids, 80, stop_at_eos=False, step="fused")
    modules = generate(c, None, ids, 80, stop_at_eos=False, step="modules")
    assert fused.step == "fused" and fused.step_reason == "" and modules.step == "modules"
    assert torch.equal(fused.tokens, modules.tokens)
    assert len(set(fused.tokens[0].tolist())) >= 10  # a sequence worth comparing


def test_fused_logits_match_eager_pytorch_at_every_position(compiled):
    """Teacher-forced: feed a fixed sequence one token at a time and compare every position's
    logits with eager PyTorch on the same weights (one full forward pass)."""
    vt, c, eager, ids = compiled
    decoder = build_decoder(c)
    step = fused_step_for(decoder)
    seq = torch.randint(0, VOCAB, (70,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = eager(seq[None].long()).logits[0].double()
    got = torch.stack([step(int(t), i)[0] for i, t in enumerate(seq)]).double()
    scale = ref.abs().max()
    # bf16 kernels see x rounded to 16 significant bits (2^-17 relative), int8 to 24-bit fixed
    # point, fp32 exact: every error is float32-rounding sized against logits of size ~scale
    tol = {"int8": 2e-5, "bf16": 2e-4, "fp32": 2e-5}[vt]
    err = (got - ref).abs().max() / scale
    assert err < tol, (vt, float(err))


def test_no_decoder_layer_runs_in_python_during_fused_steps(compiled):
    _, c, _, ids = compiled
    decoder = build_decoder(c)
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in decoder.model.layers]
    try:
        fused = generate(c, None, ids, 20, stop_at_eos=False)
        assert fused.step == "fused"
        assert len(calls) == 3  # the prefill only, once per layer
        calls.clear()
        generate(c, None, ids, 20, stop_at_eos=False, step="modules")
        assert len(calls) == 3 * 20
    finally:
        for h in hooks:
            h.remove()


def test_models_the_step_cannot_run_say_why_and_decode_by_module(compiled):
    _, c, eager, ids = compiled
    # an eager Hugging Face model: no kernels to call
    r = generate(eager, None, ids, 4, stop_at_eos=False)
    assert r.step == "modules" and "its q_proj is a Linear, not a sparsec kernel" in r.step_reason
    with pytest.raises(GenerationError, match=r"^step='fused' is not possible here \(decoder layer 0: .*\); use "):
        generate(eager, None, ids, 4, step="fused")
    # two prompts at once: the fused step is batch 1
    batch = torch.stack([ids, ids.flip(0)])
    r = generate(c, None, batch, 4, stop_at_eos=False)
    assert r.step == "modules" and "a batch of prompts" in r.step_reason
    with pytest.raises(GenerationError, match="step must be one of auto, fused, modules"):
        generate(c, None, ids, 4, step="fast")


def test_a_layer_kept_dense_float_keeps_the_module_path():
    """select-format keeps an unpruned layer dense; with fp32 values that layer runs through torch
    (no bitmask kernel), so the step is refused with that layer named and the model untouched.
    (A dense int8 layer is fine: it runs the bitmask kernel with every bit set.)"""
    model = _model()
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    c = sparsec.compile(model, {"input_ids": ids},
                        "prune-magnitude{sparsity=0.6,ignore=*layers.1.mlp.down_proj*},"
                        "select-format{target=cpu},lower-cpu{value_type=fp32}")
    assert ("note: batch-1 decode step runs by module: decoder layer 1: its down layer is not a CPU bitmask "
            "kernel") in c.report.table()
    kept = {k.layer: k.packed.format_name for k in c.kernels()}
    assert kept["model.layers.1.mlp.down_proj"] == "dense" and kept["model.layers.0.mlp.down_proj"] == "bitmask"
    before = {n: p.clone() for n, p in model.named_parameters()}
    r = generate(c, None, ids[0], 6, stop_at_eos=False)
    assert r.step == "modules"
    assert r.step_reason == ("the decode step runs by module: decoder layer 1: "
                             "its down layer is not a CPU bitmask kernel")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


_SAVE_AFTER_FUSED = textwrap.dedent("""
    import json, sys
    import torch
    import sparsec
    from sparsec.runtime.generate import generate
    sys.path.insert(0, sys.argv[2])
    from test_decode_step import VOCAB, _model

    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    compiled = sparsec.compile(_model(), {"input_ids": ids}, "prune-magnitude{sparsity=0.6},lower-cpu{value_type=int8}")
    fused = generate(compiled, None, ids[0], 12, stop_at_eos=False)
    sparsec.save(compiled, sys.argv[1])
    print(json.dumps({"step": fused.step, "tokens": fused.tokens[0].tolist(), "ids": ids[0].tolist()}))
""")

_LOAD_AND_GENERATE = textwrap.dedent("""
    import json, sys
    import numba.core.dispatcher as dispatcher
    import torch

    compiles = []

    def no_compile(self, *args, **kwargs):
        compiles.append(self.py_func.__qualname__)
        raise AssertionError(f"compiled {self.py_func.__qualname__}")

    dispatcher.Dispatcher._compile_for_args = no_compile
    dispatcher.Dispatcher.compile = no_compile
    import sparsec
    from sparsec.runtime.generate import generate

    path, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
    compiled = sparsec.load(path)
    modules = generate(compiled, None, ids, 12, stop_at_eos=False, step="modules")
    report = {"modules": modules.tokens[0].tolist(), "compiles_by_modules": list(compiles)}
    auto = generate(compiled, None, ids, 12, stop_at_eos=False)
    report.update(auto=auto.tokens[0].tolist(), step=auto.step, reason=auto.step_reason, compiles=compiles)
    print(json.dumps(report))
""")


def test_an_artifact_carries_the_step_and_every_kernel(tmp_path):
    """``sparsec.compile`` compiles the step of a Llama model, and ``sparsec.save`` writes its
    machine code beside the kernels'. The step links the kernels it calls into its own code; that
    must not hide those kernels' Python-called signatures from the save. A fresh process that may
    not compile anything then decodes both ways: by module, and fused with the step linked from
    the artifact. Both processes start from an empty kernel cache, so everything is compiled
    (not loaded from disk) where it is saved."""
    env = {**os.environ, "PYTHONPATH": str(Path(sparsec.__file__).parent.parent),
           "SPARSEC_CACHE_DIR": str(tmp_path / "cache")}
    path = tmp_path / "artifact"
    run = lambda *args: subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True,  # noqa: E731
                                       env=env, timeout=600)
    saved = run(_SAVE_AFTER_FUSED, str(path), str(Path(__file__).parent))
    assert saved.returncode == 0, saved.stderr[-3000:]
    fused = json.loads(saved.stdout.strip().splitlines()[-1])
    assert fused["step"] == "fused"
    section = json.loads((path / "manifest.json").read_text())["kernels"]
    assert section["skipped"] == []  # the step calls the kernels with the signatures Python does
    names = {(e["qualname"], e["generated"]) for e in section["kernels"]}
    assert ("step", "decoder_int8") in names and ("rows_1", "bitmask_int8") in names
    proc = run(_LOAD_AND_GENERATE, str(path), json.dumps(fused["ids"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["compiles_by_modules"] == [] and report["compiles"] == []
    assert report["modules"] == fused["tokens"]
    assert report["step"] == "fused", report["reason"]
    assert report["auto"] == fused["tokens"]


def test_one_two_and_three_threads_give_identical_logits(compiled):
    """Each thread computes whole rows and whole attention heads with the same code, so the split
    changes nothing, bit for bit; three threads on this 2-core machine also exercise a thread
    that owns no key/value group and waits at every barrier for a core."""
    vt, c, _, _ = compiled
    decoder = build_decoder(c)
    seq = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(5))
    runs = {}
    for threads in (1, 2, 3):
        step = fused_step_for(decoder, threads=threads)
        assert step.threads == threads
        runs[threads] = torch.stack([step(int(t), i)[0] for i, t in enumerate(seq)])
    assert torch.equal(runs[1], runs[2]) and torch.equal(runs[1], runs[3]), vt
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        fused_step_for(decoder, threads=0)


def test_default_threads_are_the_kernels_threads(compiled, monkeypatch):
    """``SPARSEC_NUM_THREADS`` (the kernels' thread count) sets the step's, small layers or not."""
    _, c, _, ids = compiled
    decoder = build_decoder(c)
    for n in (1, 2):
        monkeypatch.setenv("SPARSEC_NUM_THREADS", str(n))
        step = fused_step_for(decoder)
        assert isinstance(step, FusedDecodeStep) and step.threads == n
    fused = generate(c, None, ids, 16, stop_at_eos=False)
    modules = generate(c, None, ids, 16, stop_at_eos=False, step="modules")
    assert fused.step == "fused" and torch.equal(fused.tokens, modules.tokens)
