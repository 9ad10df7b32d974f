"""Running the trainer on several processes: DDP or FSDP, launched by ``torchrun``.

``torchrun --nproc-per-node N script.py`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; the trainer
then joins the process group itself (``nccl`` on GPUs, ``gloo`` on CPU) unless the caller already
did. Each rank reads its own slice of every global batch (``batches.py``), so ``N`` processes
with micro-batch ``b`` train exactly like one process with ``N`` times the gradient
accumulation.

* ``ddp``: ``DistributedDataParallel`` averages gradients across ranks.
* ``fsdp``: FSDP2 ``fully_shard`` on the whole student: parameters, gradients and optimizer
  state are sharded across ranks and gathered for each forward/backward. The graph reads its
  weights from the root module (``get_attr``), not through submodule calls, so the root is the
  one sharding unit. A copy is sharded and the trained weights are gathered back into the
  caller's student at the end, so it stays an ordinary module.

Before wrapping, every parameter and buffer (mask buffers included) is broadcast from rank 0,
so all ranks start from the same weights and the same masks whatever each process loaded.
The frozen teacher is replicated, not wrapped: it has no gradients to reduce.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

STRATEGIES = ("auto", "none", "ddp", "fsdp")


class DistributedSetupError(ValueError):
    """A distributed setting that cannot work here; the message says what to change."""


@dataclass
class DistContext:
    """Where this process sits: strategy, rank, world size and the device it trains on."""

    strategy: str = "none"
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.strategy in ("ddp", "fsdp")

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average a dict of floats over ranks (for logging); identity when single-process."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        t /= self.world_size
        return dict(zip(keys, t.tolist()))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DistributedSetupError("device=cuda but no CUDA GPU is visible; use device=cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise DistributedSetupError(f"unknown device {device!r}; use cpu, cuda or auto")
    return torch.device(device)


def setup(strategy: str = "auto", device: str = "auto") -> DistContext:
    """Join (or start) the process group when running under torchrun; see the module docstring."""
    if strategy not in STRATEGIES:
        raise DistributedSetupError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    dev = resolve_device(device)
    launched = dist.is_available() and (dist.is_initialized() or _env_world() > 1)
    if strategy == "none" or (strategy == "auto" and not launched):
        return DistContext("none", 0, 1, dev)
    if not launched:
        raise DistributedSetupError(f"strategy={strategy} needs several processes: launch with torchrun "
                                    f"--nproc-per-node N (or initialize torch.distributed first)")
    here = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        here = True
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(1, torch.cuda.device_count())))
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    chosen = "ddp" if strategy == "auto" else strategy
    return DistContext(chosen, dist.get_rank(), dist.get_world_size(), dev, here)


def broadcast_state(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers (masks included) to every rank."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def wrap(module: nn.Module, ctx: DistContext) -> nn.Module:
    """The student as it trains under ``ctx.strategy`` (the module itself when single-process)."""
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device] if ctx.device.type == "cuda" else None
        # Masks are fixed buffers, identical after broadcast_state; re-broadcasting them on
        # every forward would only cost time.
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Shard a copy: fully_shard turns the module's parameters into DTensors for good, and the
        # caller's student must stay an ordinary module (usable after the process group is gone).
        # unshard_into() copies the trained weights back.
        shard = copy.deepcopy(module)
        fully_shard(shard)
        return shard
    return module


def unshard_into(model: nn.Module, module: nn.Module, ctx: DistContext) -> None:
    """After FSDP training, gather ``model``'s full weights into the plain ``module`` (collective)."""
    if ctx.strategy != "fsdp":
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    module.load_state_dict(full)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, ctx: DistContext, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps that are not the last."""
    if sync or not ctx.distributed:
        yield
    elif ctx.strategy == "ddp":
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
