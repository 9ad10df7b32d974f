"""Reading and writing compressed-tensors model folders (sparse-bitmask, pack-quantized)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from sparsec.formats import FormatError, pack
from sparsec.formats.compressed_tensors import pack_linear_weights, read_folder, write_folder


def tiny_pruned_llama(seed: int = 0, sparsity: float = 0.6) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                w = module.weight
                w.mul_(torch.rand_like(w) >= sparsity)
    return model


def linear_names(model: torch.nn.Module) -> list[str]:
    return [
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name
    ]


def test_bitmask_fp32_folder_round_trips_a_pruned_llama(tmp_path):
    model = tiny_pruned_llama()
    sd = model.state_dict()
    names = linear_names(model)
    packed = pack_linear_weights(sd, names, "bitmask", "fp32")
    write_folder(tmp_path, sd, packed, model.config.to_dict())

    config = json.loads((tmp_path / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    assert q["sparsity_config"]["format"] == "sparse-bitmask"
    assert sorted(q["sparsity_config"]["targets"]) == sorted(n[: -len(".weight")] for n in names)
    stored = load_file(tmp_path / "model.safetensors")
    prefix = names[0][: -len(".weight")]
    assert {f"{prefix}.{k}" for k in ("shape", "compressed", "bitmask", "row_offsets")} <= set(stored)
    assert names[0] not in stored

    ckpt = read_folder(tmp_path)
    assert set(ckpt.packed) == set(names)
    for name, t in sd.items():
        assert torch.equal(ckpt.state_dict[name], t), name
    fresh = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in ckpt.config.items() if k != "quantization_config"}))
    fresh.load_state_dict(ckpt.state_dict)
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("fmt", "value_type"),
    [("bitmask", "bf16"), ("bitmask", "fp16"), ("bitmask", "int8"), ("dense", "int8"), ("dense", "int4")],
)
def test_quantized_and_half_folders_read_back_what_was_packed(tmp_path, fmt, value_type):
    model = tiny_pruned_llama(seed=1)
    sd = model.state_dict()
    names = linear_names(model)
    packed = pack_linear_weights(sd, names, fmt, value_type, group_size=16)
    write_folder(tmp_path, sd, packed, model.config.to_dict())
    ckpt = read_folder(tmp_path)
    for name in names:
        got, want = ckpt.packed[name], packed[name]
        assert (got.format_name, got.value_type) == (fmt, value_type)
        assert torch.equal(got.unpack(), want.unpack()), name
        assert torch.equal(ckpt.state_dict[name], want.unpack())
        assert torch.all(ckpt.state_dict[name][sd[name] == 0] == 0)  # pruned stays pruned
    q = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    if value_type in ("int8", "int4"):
        (group,) = q["config_groups"].values()
        assert group["weights"]["num_bits"] == (8 if value_type == "int8" else 4)
        assert group["weights"]["strategy"] == ("group" if value_type == "int4" else "channel")
        assert q["format"] == ("int-quantized" if fmt == "bitmask" else "pack-quantized")


def _ct_pack_to_int32(q: np.ndarray, bits: int) -> np.ndarray:
    """The pack-quantized packing written out independently: unsigned offsets, value i at bits*i."""
    per = 32 // bits
    u = (q.astype(np.int64) + (1 << (bits - 1))).astype(np.uint32)
    pad = (-u.shape[1]) % per
    u = np.pad(u, ((0, 0), (0, pad)))
    out = np.zeros((u.shape[0], u.shape[1] // per), dtype=np.uint32)
    for i in range(per):
        out |= u[:, i::per] << np.uint32(bits * i)
    return out.view(np.int32)


def test_reads_a_folder_laid_out_by_the_compressed_tensors_rules(tmp_path):
    """Tensors built with numpy from the published layout, not with sparsec's writer."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 21, generator=g) * (torch.rand(6, 21, generator=g) > 0.5)
    mask = (w != 0).numpy()
    q4 = torch.randint(-8, 8, (5, 40), generator=g, dtype=torch.int8)
    s4 = torch.rand(5, 40 // 8, generator=g, dtype=torch.float32) + 0.1
    tensors = {
        "layer.a.shape": torch.tensor([6, 21]),
        "layer.a.compressed": w[w != 0].to(torch.bfloat16),
        "layer.a.bitmask": torch.from_numpy(np.packbits(mask, axis=-1, bitorder="little")),
        "layer.a.row_offsets": torch.from_numpy(np.cumsum(mask.sum(1)) - mask.sum(1)),
        "layer.b.weight_packed": torch.from_numpy(_ct_pack_to_int32(q4.numpy(), 4)),
        "layer.b.weight_scale": s4.to(torch.bfloat16),
        "layer.b.weight_shape": torch.tensor([5, 40]),
        "norm.weight": torch.ones(7),
    }
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    args = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 8}
    config = {
        "model_type": "llama",
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": args}},
            "sparsity_config": {"format": "sparse-bitmask", "targets": ["Linear"], "ignore": ["layer.b"]},
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    ckpt = read_folder(tmp_path)
    assert torch.equal(ckpt.state_dict["layer.a.weight"], w.to(torch.bfloat16).float())
    want_b = q4.float() * s4.to(torch.bfloat16).float().repeat_interleave(8, dim=1)
    assert torch.equal(ckpt.state_dict["layer.b.weight"], want_b)
    assert torch.equal(ckpt.state_dict["norm.weight"], torch.ones(7))
    assert ckpt.packed["layer.a.weight"].value_type == "bf16"
    assert ckpt.packed["layer.b.weight"].value_type == "int4"
    # And sparsec writes the same int32 words the independent packing gives.
    dense = pack(want_b, "dense", "int4", group_size=8)
    out = tmp_path / "again"
    write_folder(out, {"layer.b.weight": want_b}, {"layer.b.weight": dense}, {"model_type": "llama"})
    words = load_file(out / "model.safetensors")["layer.b.weight_packed"]
    assert torch.equal(words, torch.from_numpy(_ct_pack_to_int32(dense.levels().numpy(), 4)))


def _good_folder(tmp_path, value_type="fp32"):
    model = tiny_pruned_llama(seed=2)
    sd = model.state_dict()
    names = linear_names(model)[:2]
    write_folder(tmp_path, sd, pack_linear_weights(sd, names, "bitmask", value_type), model.config.to_dict())
    return names[0][: -len(".weight")]


def _edit_tensors(folder, edit):
    t = load_file(folder / "model.safetensors")
    edit(t)
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f, p: (f / "config.json").unlink(), "config.json is missing"),
        (lambda f, p: (f / "config.json").write_text("{not json"), "not valid JSON"),
        (
            lambda f, p: (f / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}})),
            "not 'compressed-tensors'",
        ),
        (lambda f, p: _edit_tensors(f, lambda t: t.pop(f"{p}.row_offsets")), ".row_offsets'"),
        (lambda f, p: _edit_tensors(f, lambda t: t.pop(f"{p}.bitmask")), ".bitmask'"),
        (lambda f, p: _edit_tensors(f, lambda t: t.pop(f"{p}.shape")), ".shape'"),
        (
            lambda f, p: _edit_tensors(f, lambda t: t.__setitem__(f"{p}.compressed", t[f"{p}.compressed"][:-1])),
            ".compressed' holds",
        ),
        (
            lambda f, p: _edit_tensors(f, lambda t: t.__setitem__(f"{p}.shape", torch.tensor([3, 5]))),
            ".bitmask' has shape",
        ),
        (lambda f, p: (f / "model.safetensors").write_bytes(b"\x00" * 20), "not a readable safetensors file"),
        (lambda f, p: (f / "model.safetensors").unlink(), "no *.safetensors"),
    ],
)
def test_malformed_folders_are_refused_with_the_culprit_named(tmp_path, breakage, message):
    prefix = _good_folder(tmp_path)
    breakage(tmp_path, prefix)
    with pytest.raises(FormatError) as info:
        read_folder(tmp_path)
    assert message in str(info.value)
    if message.startswith("."):  # a tensor-level problem names the layer
        assert prefix in str(info.value)


def test_quantized_folder_errors_name_the_scale(tmp_path):
    prefix = _good_folder(tmp_path, "int8")
    _edit_tensors(tmp_path, lambda t: t.pop(f"{prefix}.weight_scale"))
    with pytest.raises(FormatError, match=f"{prefix}.weight_scale"):
        read_folder(tmp_path)
    prefix = _good_folder(tmp_path, "int8")
    _edit_tensors(
        tmp_path,
        lambda t: t.__setitem__(f"{prefix}.weight_zero_point", torch.ones_like(t[f"{prefix}.weight_zero_point"])),
    )
    with pytest.raises(FormatError, match="asymmetric"):
        read_folder(tmp_path)


def test_unwritable_layouts_leave_the_folder_untouched(tmp_path):
    model = tiny_pruned_llama(seed=4)
    sd = model.state_dict()
    names = linear_names(model)
    packed = pack_linear_weights(sd, names, "bitmask", "int4")
    with pytest.raises(FormatError, match=f"layer '{names[0][: -len('.weight')]}'.*int4"):
        write_folder(tmp_path / "out", sd, packed, model.config.to_dict())
    assert not (tmp_path / "out").exists()
    csr = {names[0]: pack(sd[names[0]], "csr")}
    with pytest.raises(FormatError, match="'csr' format"):
        write_folder(tmp_path / "out", sd, csr, model.config.to_dict())
    with pytest.raises(FormatError, match="not a parameter"):
        write_folder(tmp_path / "out", sd, {"nope.weight": pack(sd[names[0]], "bitmask")}, {})
    assert not (tmp_path / "out").exists()


def test_tied_embeddings_are_written_once(tmp_path):
    torch.manual_seed(5)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    names = linear_names(model)
    write_folder(tmp_path, sd, pack_linear_weights(sd, names, "bitmask", "fp16"), model.config.to_dict())
    ckpt = read_folder(tmp_path)
    assert "lm_head.weight" not in ckpt.state_dict  # as save_pretrained does for tied weights
    fresh = LlamaForCausalLM(config).eval()
    missing, unexpected = fresh.load_state_dict(ckpt.state_dict, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    fresh.tie_weights()
    assert torch.equal(fresh.lm_head.weight, sd["model.embed_tokens.weight"])
