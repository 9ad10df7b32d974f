"""The fine-tuning trainer: masks stay fixed, the teacher stays frozen, checkpoints resume exactly,
bad input is refused before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_lm import VOCAB, Net

from sparsec.capture import capture
from sparsec.finetune import (
    CheckpointError,
    DataInputError,
    FinetuneConfig,
    FinetuneError,
    ModelInputError,
    finetune,
)
from sparsec.finetune.checkpoint import checkpoint_path
from sparsec.finetune.schedules import CubicSchedule
from sparsec.finetune.trainer import lr_factor, mask_pairs
from sparsec.passes import PassContext, make_pass, run_passes
from sparsec.passes.taps import TapError, is_tapped


def data(n: int = 16, seq: int = 8, seed: int = 1) -> torch.Tensor:
    # A learnable pattern (each token follows from the previous one) with random starts.
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    return (start + 3 * torch.arange(seq)) % VOCAB


def pair(sparsity: float = 0.6, d: int = 16, layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    base = Net(d, layers).eval()
    ids = data()[:2].clone()
    teacher = capture(copy.deepcopy(base), ids).graph_module
    student = capture(copy.deepcopy(base), ids).graph_module
    if sparsity:
        run_passes(student, [make_pass("prune-magnitude", sparsity=sparsity)], PassContext())
    return student, teacher


def cfg(**kw) -> FinetuneConfig:
    base = dict(steps=6, micro_batch_size=4, lr=1e-2, progress=False, device="cpu", strategy="none")
    base.update(kw)
    return FinetuneConfig(**base)


def params(gm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def test_fixed_masks_frozen_teacher_and_loss_goes_down():
    student, teacher = pair(0.6)
    masks = {w: student.get_buffer(m).clone() for w, m in mask_pairs(student)}
    assert masks, "magnitude pruning attached masks"
    teacher_before = params(teacher)
    hist = finetune(student, teacher, data(32), cfg(steps=25, kl=1.0, squarehead=1.0, weight_decay=0.1))
    assert len(hist) == 25 and hist.mask_violations == 0
    assert set(hist[0]) >= {"step", "lr", "loss", "ce", "kl", "squarehead"}
    first = sum(r["loss"] for r in hist.records[:3]) / 3
    last = sum(r["loss"] for r in hist.records[-3:]) / 3
    assert last < 0.9 * first, (first, last)
    for weight, mask in masks.items():  # masks unchanged, pruned weights exactly zero (weight decay on)
        w = student.get_parameter(weight)
        assert torch.equal(w[mask == 0], torch.zeros_like(w[mask == 0]))
    assert {w: student.get_buffer(m) for w, m in mask_pairs(student)}.keys() == masks.keys()
    for w, m in mask_pairs(student):
        assert torch.equal(student.get_buffer(m), masks[w])
    for k, v in params(teacher).items():
        assert torch.equal(v, teacher_before[k]), k


def test_lr_schedule_warmup_then_linear_decay():
    assert [round(lr_factor(s, 10, 4, 0.0), 4) for s in range(10)] == \
        [0.25, 0.5, 0.75, 1.0, 1.0, 0.8333, 0.6667, 0.5, 0.3333, 0.1667]
    student, teacher = pair(0.5)
    hist = finetune(student, teacher, data(), cfg(steps=5, warmup_steps=2, lr=0.1))
    assert [round(r["lr"], 6) for r in hist] == [0.05, 0.1, 0.1, 0.066667, 0.033333]


def test_gradient_accumulation_matches_one_large_batch():
    runs = []
    for micro, accum in ((8, 1), (4, 2), (2, 4)):
        student, _ = pair(0.5)
        finetune(student, None, data(), cfg(steps=3, micro_batch_size=micro, grad_accum=accum,
                                            ce=1.0, kl=0.0, squarehead=0.0))
        runs.append(params(student))
    for other in runs[1:]:
        for k in runs[0]:
            torch.testing.assert_close(other[k], runs[0][k], rtol=1e-5, atol=1e-6)


def test_checkpoint_resume_is_exact(tmp_path):
    settings = dict(steps=6, micro_batch_size=2, grad_accum=2, kl=0.5, warmup_steps=2, weight_decay=0.1)
    s1, t1 = pair()
    straight = finetune(s1, t1, data(), cfg(**settings, checkpoint_dir=str(tmp_path / "a")))
    s2, t2 = pair()
    first = finetune(s2, t2, data(), cfg(**settings, checkpoint_dir=str(tmp_path / "b"), stop_at=3))
    assert len(first) == 3 and checkpoint_path(tmp_path / "b").exists()
    s3, t3 = pair()  # a fresh process would rebuild the models like this
    resumed = finetune(s3, t3, data(), cfg(**settings, checkpoint_dir=str(tmp_path / "b")))
    assert resumed.start_step == 3 and len(resumed) == 6
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    for k, v in params(s1).items():
        assert torch.equal(v, params(s3)[k]), k
    assert resumed.masks_checksum == straight.masks_checksum


def test_corrupted_checkpoint_is_refused_and_nothing_changes(tmp_path):
    student, teacher = pair()
    finetune(student, teacher, data(), cfg(steps=4, checkpoint_dir=str(tmp_path), stop_at=2))
    path = checkpoint_path(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    damaged = path.read_bytes()
    s2, t2 = pair()
    before = params(s2)
    with pytest.raises(CheckpointError, match="cannot be read.*damaged"):
        finetune(s2, t2, data(), cfg(steps=4, checkpoint_dir=str(tmp_path)))
    assert path.read_bytes() == damaged
    assert all(torch.equal(v, before[k]) for k, v in params(s2).items())
    assert not is_tapped(s2) and not is_tapped(t2)


def test_checkpoint_for_other_data_or_model_is_refused(tmp_path):
    student, teacher = pair()
    finetune(student, teacher, data(), cfg(steps=4, checkpoint_dir=str(tmp_path), stop_at=2))
    s2, t2 = pair()
    with pytest.raises(CheckpointError, match="another data"):
        finetune(s2, t2, data(seed=7), cfg(steps=4, checkpoint_dir=str(tmp_path)))
    s3, t3 = pair(d=8)
    with pytest.raises(CheckpointError, match="another model"):
        finetune(s3, t3, data(), cfg(steps=4, checkpoint_dir=str(tmp_path)))


def test_teacher_and_student_that_do_not_match_are_refused():
    student, _ = pair(layers=3)
    _, teacher = pair(layers=2)
    code = student.code
    with pytest.raises(ModelInputError, match="3 block outputs and the teacher 2"):
        finetune(student, teacher, data(), cfg())
    assert student.code == code and not is_tapped(student)  # the caller's graph is left as it was
    s2, _ = pair(d=16)
    _, t2 = pair(d=8)
    with pytest.raises(ModelInputError, match="hidden size 16, teacher 8"):
        finetune(s2, t2, data(), cfg())
    with pytest.raises(ModelInputError, match="same model"):
        finetune(s2, s2, data(), cfg())


def test_bad_data_and_settings_are_refused():
    student, teacher = pair()
    with pytest.raises(DataInputError, match="empty"):
        finetune(student, teacher, torch.zeros(0, 8, dtype=torch.long), cfg())
    with pytest.raises(DataInputError, match="integer token ids"):
        finetune(student, teacher, torch.randn(4, 8), cfg())
    with pytest.raises(TapError, match="matches no module"):
        finetune(student, teacher, data(), cfg(blocks="model.layers.*"))
    with pytest.raises(FinetuneError, match="need a teacher"):
        finetune(student, None, data(), cfg(squarehead=1.0))
    with pytest.raises(FinetuneError, match="warmup_steps"):
        finetune(student, teacher, data(), cfg(steps=3, warmup_steps=3))
    assert not is_tapped(student) and not is_tapped(teacher)


def test_padding_is_skipped_and_bf16_runs():
    student, teacher = pair()
    ids = data(8, 10)
    mask = torch.ones_like(ids)
    mask[::2, 6:] = 0
    ids_junk = ids.clone()
    ids_junk[mask == 0] = 0  # padded positions may hold anything
    hist = finetune(student, teacher, {"input_ids": ids_junk, "attention_mask": mask},
                    cfg(steps=3, kl=1.0, bf16=True))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)
    # the padded tokens never reach the loss: other junk gives the same losses
    s2, t2 = pair()
    ids_junk2 = ids.clone()
    ids_junk2[mask == 0] = 7
    hist2 = finetune(s2, t2, {"input_ids": ids_junk2, "attention_mask": mask},
                     cfg(steps=3, kl=1.0, bf16=True))
    assert [r["loss"] for r in hist] == pytest.approx([r["loss"] for r in hist2], rel=1e-6)


def test_gradual_schedule_raises_sparsity_and_keeps_pruned_weights_zero():
    student, teacher = pair(0.0)
    sched = CubicSchedule(final_sparsity=0.75, num_prunings=3, frequency=2)
    hist = finetune(student, teacher, data(), cfg(steps=8, gradual=sched))
    assert hist.mask_violations == 0
    pairs = mask_pairs(student)
    assert len(pairs) == 7  # 3 blocks x 2 Linears and the head (only lm_head and embeddings are skipped)
    for weight, mask in pairs:
        frac = float((student.get_buffer(mask) == 0).float().mean())
        assert frac == pytest.approx(0.75, abs=0.01)
        assert torch.equal(student.get_parameter(weight)[student.get_buffer(mask) == 0],
                           torch.zeros(int((student.get_buffer(mask) == 0).sum())))


def test_eager_student_is_trained_in_place():
    torch.manual_seed(0)
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hist = finetune(model, None, data(), cfg(steps=2, ce=1.0, kl=0.0, squarehead=0.0))
    assert len(hist) == 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradual_schedule_resumes_exactly_across_a_pruning_step(tmp_path):
    sched = CubicSchedule(final_sparsity=0.6, num_prunings=2, frequency=3, start_step=1)
    s1, t1 = pair(0.0)
    straight = finetune(s1, t1, data(), cfg(steps=8, gradual=sched, checkpoint_dir=str(tmp_path / "a")))
    # stopped at step 2: one pruning happened (step 1), so the checkpoint holds masks the fresh
    # student does not have yet
    s2, t2 = pair(0.0)
    finetune(s2, t2, data(), cfg(steps=8, gradual=sched, checkpoint_dir=str(tmp_path / "b"), stop_at=2))
    s3, t3 = pair(0.0)
    assert not mask_pairs(s3)
    resumed = finetune(s3, t3, data(), cfg(steps=8, gradual=sched, checkpoint_dir=str(tmp_path / "b")))
    assert resumed.start_step == 2
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert resumed.masks_checksum == straight.masks_checksum
    for k, v in params(s1).items():
        assert torch.equal(v, params(s3)[k]), k


def test_exported_llama_with_attention_mask_trains_and_keeps_masks():
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsec.finetune import DistillModel

    torch.manual_seed(0)
    cfg_ = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg_).eval()
    ids = data(8, 10)
    mask = torch.ones_like(ids)
    mask[1::2, 7:] = 0  # right padding on every other row
    example = {"input_ids": ids[:2].clone(), "attention_mask": mask[:2].clone()}
    teacher_cap = capture(copy.deepcopy(model), example)
    student_cap = capture(copy.deepcopy(model), example)
    run_passes(student_cap.graph_module, [make_pass("prune-magnitude", sparsity=0.5)], PassContext())
    student = DistillModel(student_cap.graph_module, student_cap.constant_kwargs)
    teacher = DistillModel(teacher_cap.graph_module, teacher_cap.constant_kwargs)
    assert "attention_mask" in student.inputs and student.blocks == ["model.layers.0", "model.layers.1"]
    # the graph's logits match the eager model's on padded input (the mask reaches attention)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = teacher(ids, mask)[0]
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ref[keep], rtol=1e-4, atol=1e-4)
    hist = finetune(student, teacher, {"input_ids": ids, "attention_mask": mask},
                    cfg(steps=4, kl=1.0, squarehead=1.0, lr=1e-3))
    assert hist.mask_violations == 0 and len(mask_pairs(student.graph_module)) == 14
    assert hist[-1]["loss"] < hist[0]["loss"]
