"""Token data for fine-tuning, and the deterministic order batches are drawn in.

The data is a set of ``N`` sequences of equal length ``S`` (pad shorter ones and give an
attention mask). Training reads it as an endless stream of epochs: epoch ``e`` is a permutation
of the ``N`` rows drawn from ``seed + e``, and stream position ``p`` is row ``perm_{p // N}[p % N]``.
Optimizer step ``s`` consumes stream positions ``[s * G, (s + 1) * G)`` with the global batch
``G = micro_batch * grad_accum * world_size``; micro-step ``j`` of rank ``r`` takes the
``micro_batch`` positions starting at ``s * G + (j * world_size + r) * micro_batch``.

So the whole data position is one number (the step), resuming needs nothing but the step and
the seed, and a run on ``W`` processes sees, step by step, exactly the rows a single process
with ``grad_accum * W`` micro-steps would see.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


class DataInputError(ValueError):
    """Fine-tuning data that is empty, ragged, or not token ids."""


@dataclass
class TokenData:
    """``input_ids`` ``[N, S]`` (int64) and an optional ``attention_mask`` of the same shape."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None

    @classmethod
    def from_any(cls, data: Any) -> TokenData:
        """Accept a ``[N, S]`` integer tensor, a mapping with ``input_ids`` (and optionally
        ``attention_mask``), or a :class:`TokenData`. Raises :class:`DataInputError`."""
        if isinstance(data, TokenData):
            return cls(data.input_ids, data.attention_mask)._checked()
        if isinstance(data, torch.Tensor):
            return cls(data)._checked()
        if isinstance(data, Mapping):
            if "input_ids" not in data:
                raise DataInputError(f"the data mapping has no 'input_ids' (keys: {sorted(data)})")
            return cls(torch.as_tensor(data["input_ids"]), data.get("attention_mask"))._checked()
        raise DataInputError(f"fine-tuning data must be a [N, seq_len] tensor of token ids or a mapping with "
                             f"'input_ids' (and 'attention_mask'); got {type(data).__name__}")

    def _checked(self) -> TokenData:
        ids = self.input_ids
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise DataInputError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        if ids.dim() != 2:
            raise DataInputError(f"input_ids must be [N, seq_len], got shape {tuple(ids.shape)}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise DataInputError(f"the fine-tuning data is empty (shape {tuple(ids.shape)}); give at least "
                                 f"one sequence of at least 2 tokens")
        if ids.shape[1] < 2:
            raise DataInputError("sequences need at least 2 tokens for next-token prediction")
        if (ids < 0).any():
            raise DataInputError("input_ids contains negative token ids")
        self.input_ids = ids.to(torch.long).contiguous()
        if self.attention_mask is not None:
            am = torch.as_tensor(self.attention_mask)
            if tuple(am.shape) != tuple(ids.shape):
                raise DataInputError(f"attention_mask shape {tuple(am.shape)} differs from input_ids "
                                     f"{tuple(ids.shape)}")
            am = am.to(torch.long)
            if not ((am == 0) | (am == 1)).all():
                raise DataInputError("attention_mask must hold only 0 (padding) and 1 (token)")
            if (am.sum(dim=1) < 2).any():
                raise DataInputError("every sequence needs at least 2 real tokens (attention_mask ones)")
            self.attention_mask = am.contiguous()
        return self

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def fingerprint(self) -> str:
        """A short hash of the data, stored in checkpoints so a resume on other data is refused."""
        h = hashlib.sha256()
        h.update(str(tuple(self.input_ids.shape)).encode())
        h.update(self.input_ids.numpy().tobytes())
        if self.attention_mask is not None:
            h.update(self.attention_mask.numpy().tobytes())
        return h.hexdigest()[:16]

    def rows(self, positions: range, seed: int) -> torch.Tensor:
        """Row indices of stream ``positions`` (see the module docstring)."""
        n = len(self)
        out = torch.empty(len(positions), dtype=torch.long)
        cache: dict[int, torch.Tensor] = {}
        for i, p in enumerate(positions):
            epoch = p // n
            if epoch not in cache:
                cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            out[i] = cache[epoch][p % n]
        return out

    def micro_batch(self, step: int, micro: int, *, micro_batch: int, grad_accum: int, rank: int = 0,
                    world_size: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(input_ids, attention_mask)`` of micro-step ``micro`` of optimizer step ``step`` on ``rank``."""
        global_batch = micro_batch * grad_accum * world_size
        start = step * global_batch + (micro * world_size + rank) * micro_batch
        idx = self.rows(range(start, start + micro_batch), seed)
        am = self.attention_mask[idx] if self.attention_mask is not None else None
        return self.input_ids[idx], am
