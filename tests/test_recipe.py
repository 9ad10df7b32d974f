"""The recovery recipe end to end on a tiny Llama over SmolLM2's vocabulary: every stage runs and
is measured, the output holds a loadable artifact and a Hugging Face folder whose zeros are the
masks, an interrupted run continues where it stopped, and bad settings are refused up front."""

from __future__ import annotations

import json

import pytest
import torch

import sparsec
from sparsec.cli import main
from sparsec.recipe import RecipeConfig, RecipeError, recover

TINY = dict(sparsity=0.5, calibration=4, seq_len=32, blockwise_epochs=1, global_steps=2, global_batch=2,
            eval_windows=2, eval_len=32, progress=False)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sparsec.models import cache_dir, load

    folder = cache_dir() / "smollm2-135m"
    if not (folder / "config.json").exists():
        load("smollm2-135m")  # builds the offline cache once
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_every_stage_runs_and_the_output_loads(tiny_folder, tmp_path, capsys):
    out = tmp_path / "recovered"
    assert main(["recover", tiny_folder, "-o", str(out), "--sparsity", "0.5", "--calibration", "4", "--seq-len", "32",
                 "--blockwise-epochs", "1", "--global-steps", "2", "--global-batch", "2", "--eval-windows", "2",
                 "--eval-len", "32", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| global |" in printed and "| compiled int8 |" in printed
    record = json.loads((out / "recipe.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["dense", "one-shot", "block-wise", "global", "compiled int8"]
    assert record["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert all(s["wiki_ppl"] > 1 and s["news_ppl"] > 1 for s in record["stages"])
    layers = record["stages"][1]["detail"]["layers"]  # OWL's per-layer targets, reported
    assert len(layers) == 15 and all("owl_outlier_ratio" in r for r in layers.values() if r["target"])
    assert not (out / ".work").exists()
    # the Hugging Face folder: its zeros are exactly the saved masks
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    masks = load_file(str(out / "model" / "masks.safetensors"))
    assert len(masks) == 14
    for name, mask in masks.items():
        w = model.get_parameter(name)
        assert torch.equal(w == 0, mask == 0), name
    # the artifact loads without compiling and computes what the folder's model computes
    loaded = sparsec.load(str(out / "artifact"))
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        got = loaded(input_ids=ids)
    got = got.logits if hasattr(got, "logits") else got
    assert torch.allclose(got, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_an_interrupted_run_continues_where_it_stopped(tiny_folder, tmp_path):
    out = tmp_path / "resumed"

    class Stop(Exception):
        pass

    def stop_after_blockwise(line: str) -> None:
        if "block-wise:" in line:
            raise Stop

    config = RecipeConfig(**TINY, values="fp32")
    with pytest.raises(Stop):
        recover(tiny_folder, config, out, log=stop_after_blockwise)
    state = json.loads((out / ".work" / "state.json").read_text())
    assert sorted(state["stages"]) == ["dense", "one-shot"]  # block-wise ran but was not recorded
    lines: list[str] = []
    result = recover(tiny_folder, config, out, log=lines.append)
    assert [s.stage for s in result.stages] == ["dense", "one-shot", "block-wise", "global", "compiled fp32"]
    assert not any("one-shot:" in line for line in lines), "the finished stage was redone"
    straight = recover(tiny_folder, config, None, log=lambda line: None)
    for a, b in zip(result.stages, straight.stages):
        assert a.wiki_ppl == pytest.approx(b.wiki_ppl, rel=1e-4), a.stage
    # a finished result, or another recipe's state, is refused
    with pytest.raises(RecipeError, match="finished recipe"):
        recover(tiny_folder, config, out)


@pytest.mark.parametrize("kw, message", [
    (dict(values="int3"), "values must be one of"),
    (dict(pattern="2:x"), "pattern must be N:M"),
    (dict(sparsity=1.2), "sparsity"),
    (dict(blockwise_inputs="cache"), "inputs must be student or teacher"),
    (dict(global_steps=0, generated=0.5), "generated data feeds the global stage"),
    (dict(squarehead_sinks="all"), "unknown sinks rule"),
])
def test_bad_settings_are_refused_before_loading(kw, message, tmp_path):
    with pytest.raises(RecipeError, match=message):
        recover("no-such-model", RecipeConfig(**{**TINY, **kw}), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_an_existing_directory_is_never_overwritten(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    with pytest.raises(RecipeError, match="already exists"):
        recover("no-such-model", RecipeConfig(**TINY), tmp_path / "taken")
    assert (tmp_path / "taken" / "file").read_text() == "mine"


def test_generated_windows_are_the_dense_models_samples(tiny_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsec.recipe import _global_data, sample_from

    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    prompts = torch.randint(0, 1000, (3, 8), generator=torch.Generator().manual_seed(2))
    samples = sample_from(model, prompts, seq_len=20, seed=5, batch=2)
    assert samples.shape == (3, 20) and torch.equal(samples[:, :8], prompts)
    assert torch.equal(samples, sample_from(model, prompts, seq_len=20, seed=5, batch=2))  # seeded
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    config = RecipeConfig(**{**TINY, "generated": 0.5, "global_steps": 2, "global_batch": 2})
    data = _global_data(model, tok, config, log=lambda line: None)
    assert data.shape == (4, 32)
