"""Block-wise recovery: the graph cut into stages runs exactly like the graph, each block's error
falls, pruned weights never move, the teacher never changes, an interrupted run resumes to the
same weights, and bad settings are refused before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_lm import VOCAB, Net

from sparsec.capture import capture
from sparsec.finetune.blockwise import BlockwiseConfig, BlockwiseError, recover_blocks
from sparsec.finetune.stages import bind_inputs, split_at_blocks
from sparsec.finetune.trainer import mask_pairs
from sparsec.passes import PassContext, make_pass, run_passes
from sparsec.passes.taps import insert_taps, remove_taps, split_tapped


def windows(n: int = 16, seq: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq), generator=g)


def pair(sparsity: float = 0.7, layers: int = 3):
    torch.manual_seed(0)
    base = Net(16, layers).eval()
    ids = windows()[:2].clone()
    teacher = capture(copy.deepcopy(base), ids).graph_module
    student = capture(copy.deepcopy(base), ids).graph_module
    run_passes(student, [make_pass("prune-magnitude", sparsity=sparsity)], PassContext())
    return student, teacher


def cfg(**kw) -> BlockwiseConfig:
    base = dict(epochs=3, batch_size=4, lr=1e-2, progress=False)
    base.update(kw)
    return BlockwiseConfig(**base)


def state(gm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def run_chain(gm, kwargs):
    stages = split_at_blocks(gm)
    env = bind_inputs(gm, (), kwargs)
    with torch.no_grad():
        for stage in stages:
            env.update(stage.run(env))
    return stages, env


def test_stages_of_a_traced_model_reproduce_every_block_output():
    student, _ = pair()
    ids = windows(3, 8)
    stages, env = run_chain(student, {"input_ids": ids})
    assert [s.kind for s in stages] == ["glue", "block", "block", "block"]
    assert [s.name for s in stages if s.kind == "block"] == ["blocks.0", "blocks.1", "blocks.2"]
    insert_taps(student)
    with torch.no_grad():
        _, hidden = split_tapped(student(ids))
    remove_taps(student)
    for stage, h in zip([s for s in stages if s.kind == "block"], hidden):
        assert torch.equal(env[stage.output], h)
    # a stage holds the model's own parameters, so training it trains the model
    block = stages[1]
    assert {id(p) for p in block.parameters()} <= {id(p) for p in student.parameters()}


def test_stages_of_an_exported_llama_reproduce_every_block_output(tiny_llama):
    model, example = tiny_llama
    cap = capture(model, {"input_ids": example["input_ids"].repeat(2, 1)})
    gm = cap.graph_module
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    stages, env = run_chain(gm, {"input_ids": ids, **cap.constant_kwargs})
    blocks = [s for s in stages if s.kind == "block"]
    assert [s.name for s in blocks] == ["model.layers.0", "model.layers.1"]
    # block 1 reads block 0's output and the rotary tables / mask the glue computed once
    assert blocks[0].output in blocks[1].inputs and len(blocks[1].inputs) > 1
    insert_taps(gm)
    with torch.no_grad():
        _, hidden = split_tapped(gm(input_ids=ids, **cap.constant_kwargs))
    remove_taps(gm)
    for stage, h in zip(blocks, hidden):
        torch.testing.assert_close(env[stage.output], h, rtol=0, atol=0)


@pytest.mark.parametrize("inputs", ["student", "teacher"])
def test_each_block_error_falls_masks_hold_and_teacher_is_unchanged(inputs):
    student, teacher = pair(0.7)
    masks = {w: student.get_buffer(m).clone() for w, m in mask_pairs(student)}
    assert len(masks) == 7  # three blocks of two layers, and the head
    teacher_before, student_before = state(teacher), state(student)
    report = recover_blocks(student, teacher, windows(16), cfg(inputs=inputs))
    assert [r.name for r in report.records] == ["blocks.0", "blocks.1", "blocks.2"]
    for r in report.records:
        assert r.loss_after < 0.8 * r.loss_before, r
        assert r.steps == 3 * 4
    assert report.mask_violations == 0
    for w, m in masks.items():
        weight = student.get_parameter(w)
        assert torch.all(weight[m == 0] == 0)
        if w.startswith("blocks."):
            assert not torch.equal(weight, student_before[w]), f"{w} was not trained"
        else:  # the head lies after the last block: no block trains it
            assert torch.equal(weight, student_before[w])
    for k, v in teacher_before.items():
        assert torch.equal(v, teacher.state_dict()[k]), f"the teacher's {k} changed"


def test_student_inputs_carry_the_recovered_blocks_error_forward():
    # With student inputs a later block starts from the recovered student's activations, so its
    # error before training differs from the one measured on the teacher's inputs.
    s1, t1 = pair(0.7)
    s2, t2 = pair(0.7)
    a = recover_blocks(s1, t1, windows(16), cfg(inputs="student"))
    b = recover_blocks(s2, t2, windows(16), cfg(inputs="teacher"))
    assert a.records[0].loss_before == pytest.approx(b.records[0].loss_before)
    assert a.records[2].loss_before != pytest.approx(b.records[2].loss_before)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    straight_s, straight_t = pair(0.7)
    recover_blocks(straight_s, straight_t, windows(16), cfg())

    student, teacher = pair(0.7)

    class Interrupt(Exception):
        pass

    def stop_after_second(record):
        if record.block == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        recover_blocks(student, teacher, windows(16), cfg(checkpoint_dir=str(tmp_path)), on_block=stop_after_second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block-000.safetensors", "block-001.safetensors",
                                                          "blockwise.json"]
    fresh, teacher2 = pair(0.7)  # a new process: the pruned model again, the checkpoint on disk
    report = recover_blocks(fresh, teacher2, windows(16), cfg(checkpoint_dir=str(tmp_path)))
    assert [r.resumed for r in report.records] == [True, True, False]
    for k, v in state(straight_s).items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    # other settings are refused in that directory, with nothing changed
    before = state(fresh)
    with pytest.raises(BlockwiseError, match="other settings or data"):
        recover_blocks(fresh, teacher2, windows(16), cfg(checkpoint_dir=str(tmp_path), lr=1e-3))
    for k, v in before.items():
        assert torch.equal(v, fresh.state_dict()[k])


@pytest.mark.parametrize("kw, message", [
    (dict(epochs=0), "epochs must be a positive integer"),
    (dict(inputs="cached"), "inputs must be student or teacher"),
    (dict(sinks="norm:0.5"), "unknown sinks rule"),
    (dict(normalize="row"), "unknown SquareHead normalization"),
    (dict(lr=float("nan")), "lr must be a positive number"),
    (dict(batch_size=64), "larger than the 16 windows"),
])
def test_bad_settings_are_refused_before_anything_changes(kw, message):
    student, teacher = pair(0.7)
    before = state(student)
    with pytest.raises(BlockwiseError, match=message):
        recover_blocks(student, teacher, windows(16), cfg(**kw))
    for k, v in before.items():
        assert torch.equal(v, student.state_dict()[k])


def test_same_or_shared_teacher_and_bad_data_are_refused():
    student, teacher = pair(0.7)
    with pytest.raises(BlockwiseError, match="same graph"):
        recover_blocks(student, student, windows(16), cfg())
    with pytest.raises(BlockwiseError, match="token ids"):
        recover_blocks(student, teacher, windows(16).float(), cfg())
    with pytest.raises(BlockwiseError, match="Capture"):
        recover_blocks(Net(), teacher, windows(16), cfg())


def test_exported_llama_recovers_with_sink_exclusion(tiny_llama):
    model, example = tiny_llama
    ids = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(7))
    tcap = capture(copy.deepcopy(model), {"input_ids": ids[:2].clone()})
    scap = capture(copy.deepcopy(model), {"input_ids": ids[:2].clone()})
    run_passes(scap.graph_module, [make_pass("prune-magnitude", sparsity=0.6)], PassContext())
    report = recover_blocks(scap, tcap, ids, cfg(epochs=4, lr=3e-3, normalize="token", sinks="first"))
    assert report.mask_violations == 0
    assert all(r.loss_after < r.loss_before for r in report.records), report.table()
    with torch.no_grad():  # the recovered graph is still the model it was: taps and output intact
        out = scap.graph_module(input_ids=ids[:2], **scap.constant_kwargs)
    assert torch.isfinite(out.logits).all()


def test_tapped_models_get_their_taps_back():
    from sparsec.finetune import DistillModel
    from sparsec.passes.taps import tap_names

    student, teacher = pair(0.7)
    s, t = DistillModel(student), DistillModel(teacher)
    recover_blocks(s, t, windows(16), cfg(epochs=1))
    assert tap_names(student) == tap_names(teacher) == ["blocks.0", "blocks.1", "blocks.2"]
    logits, hidden = s(windows(2))
    assert len(hidden) == 3 and logits.shape == (2, 8, VOCAB)
