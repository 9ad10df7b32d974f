"""Fine-tuning checkpoints: everything needed to continue a run exactly where it stopped.

One file (``torch.save`` of plain containers and tensors; loaded with ``weights_only=True``, so
opening a checkpoint never runs pickled code) holds:

==================  ==========================================================================
``model``           full state dict of the student: weights *and* mask buffers
``optimizer``       full optimizer state (AdamW moments), keyed by parameter name
``lr_scheduler``    the learning-rate schedule's position
``rng``             torch (and CUDA) generator states
``step``            optimizer steps completed: with the seed, the data position (``batches.py``)
``data``            fingerprint of the data, global batch and seed: a resume on other data or
                    with another global batch is refused, since it could not continue exactly
``config``          the run's settings, for the record
``history``         the per-step loss records so far
==================  ==========================================================================

Writes are atomic: the file is written under a temporary name in the same directory, flushed to
disk and renamed over the old one, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sparsec.errors import first_line

FORMAT = "sparsec.finetune.checkpoint"
VERSION = 1
FILENAME = "last.pt"

_REQUIRED = ("format", "version", "step", "model", "optimizer", "lr_scheduler", "rng", "data", "config",
             "history")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit this run; nothing was changed."""


def checkpoint_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / FILENAME


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (the keys of the module docstring) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"internal: checkpoint state lacks {missing}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`save_checkpoint`; CPU tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure to read is one message
        first = first_line(e, limit=200)
        raise CheckpointError(f"checkpoint {path} cannot be read ({first}); it is damaged or not a sparsec "
                              f"fine-tuning checkpoint: delete it or resume from another directory") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sparsec fine-tuning checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('version')}, this sparsec "
                              f"reads version {VERSION}")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it is damaged: delete it or resume from "
                              f"another directory")
    return state


def check_model_state(path: Path, saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose tensors do not fit the model (other architecture or size)."""
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"checkpoint {path} does not fit this student ({detail}); it was written for "
                              f"another model")
    for name, tensor in current.items():
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, the "
                                  f"student's is {tuple(tensor.shape)}; it was written for another model")


def check_data_state(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to continue on other data, another global batch or another seed."""
    for key, what in (("fingerprint", "data"), ("global_batch", "global batch"), ("seed", "seed")):
        if saved.get(key) != current.get(key):
            raise CheckpointError(f"checkpoint {path} was written with another {what} ({saved.get(key)!r}, "
                                  f"now {current.get(key)!r}); resume with the same {what} or use a new "
                                  f"checkpoint directory")
