"""The trainer on 2 CPU processes (gloo): DDP and FSDP match one process with the same global batch.

Each spawned process joins the group the way ``torchrun`` would make it (RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment), builds the same pruned student, and fine-tunes it with
``micro_batch_size=2`` per process; the reference is one process with ``grad_accum=2``, which
sees the same 4 sequences per step. Both strategies run in the same two processes to keep the
test short.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_lm import VOCAB, Net

from sparsec.capture import capture
from sparsec.finetune import FinetuneConfig, finetune
from sparsec.finetune.checkpoint import checkpoint_path, load_checkpoint
from sparsec.passes import PassContext, make_pass, run_passes


def build(rank: int = 0):
    torch.manual_seed(0)
    base = Net().eval()
    ids = torch.randint(0, VOCAB, (16, 8), generator=torch.Generator().manual_seed(1))
    teacher = capture(copy.deepcopy(base), ids[:2].clone()).graph_module
    student = capture(copy.deepcopy(base), ids[:2].clone()).graph_module
    run_passes(student, [make_pass("prune-magnitude", sparsity=0.6)], PassContext())
    if rank:
        # Ranks other than 0 start from different weights: the trainer must broadcast rank 0's.
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01 * rank)
    return student, teacher, ids


SETTINGS = dict(steps=4, micro_batch_size=2, lr=1e-2, kl=0.5, squarehead=1.0, warmup_steps=1, progress=False,
                device="cpu")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for strategy in ("ddp", "fsdp"):
            student, teacher, ids = build(rank)
            ckpt = os.path.join(out, f"ckpt-{strategy}")
            config = FinetuneConfig(**SETTINGS, strategy=strategy, checkpoint_dir=ckpt)
            hist = finetune(student, teacher, ids, config)
            state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            torch.save({"state": state, "losses": [r["loss"] for r in hist], "masks": hist.masks_checksum,
                        "violations": hist.mask_violations}, os.path.join(out, f"{strategy}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_and_fsdp_match_single_process(tmp_path):
    student, teacher, ids = build()
    ref = finetune(student, teacher, ids, FinetuneConfig(**SETTINGS, grad_accum=2, strategy="none"))
    ref_state = {k: v.detach().clone() for k, v in student.state_dict().items()}

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    for strategy in ("ddp", "fsdp"):
        for rank in range(2):
            got = torch.load(tmp_path / f"{strategy}-{rank}.pt", weights_only=True)
            assert got["violations"] == 0
            assert got["masks"] == ref.masks_checksum, f"{strategy} rank {rank}: masks differ"
            assert got["losses"] == pytest.approx([r["loss"] for r in ref], rel=1e-5), strategy
            for k, v in ref_state.items():
                torch.testing.assert_close(got["state"][k], v, rtol=1e-5, atol=1e-6, msg=f"{strategy} {k}")
        # rank 0 wrote a full (unsharded) checkpoint holding the same weights
        saved = load_checkpoint(checkpoint_path(tmp_path / f"ckpt-{strategy}"))
        assert saved["step"] == 4 and saved["data"]["global_batch"] == 4
        for k, v in ref_state.items():
            torch.testing.assert_close(saved["model"][f"graph_module.{k}"], v, rtol=1e-5, atol=1e-6)


def test_distributed_strategy_without_processes_is_a_clear_error(monkeypatch):
    from sparsec.finetune.distributed import DistributedSetupError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    student, teacher, ids = build()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(DistributedSetupError, match="torchrun"):
        finetune(student, teacher, ids, FinetuneConfig(**SETTINGS, strategy="fsdp"))
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
