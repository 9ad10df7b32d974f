"""Gradual magnitude pruning (Zhu & Gupta, 2017): raise sparsity step by step during fine-tuning.

The cubic schedule prunes fast while many redundant weights remain and slowly near the end::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3,   t in {t0, t0 + dt, ..., t0 + n*dt}

from ``s_i`` at step ``t0`` to ``s_f`` at step ``t0 + n*dt``; before ``t0`` nothing is pruned and
after the last pruning step the masks stay fixed at ``s_f``. The training loop drives it::

    schedule = GradualMagnitudePruning(gm, final_sparsity=0.7, start_step=0, num_prunings=10,
                                       frequency=100, optimizer=opt)
    for step in range(steps):
        schedule.step(step)          # recomputes the masks on pruning steps, returns True then
        loss = loss_fn(gm(batch))
        loss.backward(); opt.step(); opt.zero_grad()

At each pruning step every chosen layer keeps its largest ``|w|`` (exactly
``round(s_t * numel)`` pruned, ties broken by index) and the masks are attached with
:func:`sparsec.passes.masks.apply_masks`, so the graph multiplies each weight by its mask and
gradients of pruned weights are exactly zero. Weights pruned at an earlier step stay pruned
(sparsity only grows). When ``optimizer`` is given, its per-weight state (Adam's moments) is
zeroed at newly pruned positions, so momentum accumulated before the prune cannot move a pruned
weight away from zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from sparsec.ir import meta
from sparsec.ir.layers import layer_nodes
from sparsec.passes.masks import (
    DEFAULT_IGNORE,
    LayerSelectionError,
    apply_masks,
    check_finite,
    current_mask,
    masked_fraction,
    select_layers,
    topk_keep_mask,
)


class ScheduleError(ValueError):
    """Impossible schedule settings; the message says which value to change."""


@dataclass(frozen=True)
class CubicSchedule:
    """The cubic sparsity schedule alone (no model): which steps prune, and to what sparsity."""

    final_sparsity: float
    initial_sparsity: float = 0.0
    start_step: int = 0
    num_prunings: int = 10
    frequency: int = 100

    def __post_init__(self) -> None:
        if not (0.0 <= self.final_sparsity < 1.0):
            raise ScheduleError(f"final_sparsity must be in [0, 1), got {self.final_sparsity}")
        if not (0.0 <= self.initial_sparsity <= self.final_sparsity):
            raise ScheduleError(f"initial_sparsity must be in [0, final_sparsity={self.final_sparsity}], "
                                f"got {self.initial_sparsity}")
        if self.start_step < 0:
            raise ScheduleError(f"start_step must be >= 0, got {self.start_step}")
        if self.num_prunings < 1:
            raise ScheduleError(f"num_prunings (n) must be >= 1, got {self.num_prunings}")
        if self.frequency < 1:
            raise ScheduleError(f"frequency (dt, steps between prunings) must be >= 1, got {self.frequency}")

    @property
    def end_step(self) -> int:
        return self.start_step + self.num_prunings * self.frequency

    def pruning_steps(self) -> list[int]:
        """``[t0, t0 + dt, ..., t0 + n*dt]``: the steps at which masks are recomputed."""
        return [self.start_step + k * self.frequency for k in range(self.num_prunings + 1)]

    def is_pruning_step(self, step: int) -> bool:
        return self.start_step <= step <= self.end_step and (step - self.start_step) % self.frequency == 0

    def sparsity_at(self, step: int) -> float:
        """Target sparsity in force at ``step``: 0 before ``t0``, the cubic value of the last
        pruning step at or before ``step`` in between, ``s_f`` from ``t0 + n*dt`` on."""
        if step < self.start_step:
            return 0.0
        last = min(step, self.end_step)
        last -= (last - self.start_step) % self.frequency
        progress = (last - self.start_step) / (self.num_prunings * self.frequency)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3


class GradualMagnitudePruning:
    """Drive a :class:`CubicSchedule` on a captured graph: ``step(i)`` recomputes the magnitude
    masks of the chosen layers on pruning steps (see the module docstring).

    ``layers`` / ``ignore`` choose layers as the pruning passes do (default: every weighted layer
    but lm_head and embeddings). ``optimizer``, when given, has its state zeroed at newly pruned
    positions. Construction validates everything and changes nothing.
    """

    def __init__(self, gm: fx.GraphModule, final_sparsity: float, initial_sparsity: float = 0.0,
                 start_step: int = 0, num_prunings: int = 10, frequency: int = 100, layers: str = "",
                 ignore: str = DEFAULT_IGNORE, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.schedule = CubicSchedule(final_sparsity, initial_sparsity, start_step, num_prunings, frequency)
        self.gm = gm
        self.layers = select_layers(gm, layers, ignore)
        if not self.layers:
            raise LayerSelectionError("gradual pruning chose no layer; check layers=/ignore=")
        self.optimizer = optimizer
        self.current_sparsity = 0.0
        self.history: list[tuple[int, float]] = []

    def sparsity_at(self, step: int) -> float:
        return self.schedule.sparsity_at(step)

    def step(self, step_index: int) -> bool:
        """Recompute the masks if ``step_index`` is a pruning step; True when masks were updated."""
        if not self.schedule.is_pruning_step(step_index):
            return False
        target = self.schedule.sparsity_at(step_index)
        check_finite(self.gm, self.layers)
        keeps = {}
        for layer in self.layers:
            w = layer.matrix(self.gm).detach().abs().float()
            old = current_mask(self.gm, layer)
            if old is not None:
                # Already-pruned weights sort first, so they stay pruned whatever the ties.
                w = torch.where(old, w, torch.full_like(w, -1.0))
            keeps[layer.name] = topk_keep_mask(w, target)
        apply_masks(self.gm, [(layer, keeps[layer.name]) for layer in self.layers])
        nodes = layer_nodes(self.gm)
        for layer in self.layers:
            self._reset_optimizer_state(layer, keeps[layer.name])
            nodes[layer.name].meta[meta.PRUNE] = {
                "criterion": "gradual-magnitude", "target": target, "step": step_index,
                "final": self.schedule.final_sparsity, "sparsity": masked_fraction(self.gm, layer),
            }
        self.current_sparsity = target
        self.history.append((step_index, target))
        return True

    def _reset_optimizer_state(self, layer, keep: torch.Tensor) -> None:
        if self.optimizer is None:
            return
        weight = self.gm.get_parameter(layer.weight)
        state = self.optimizer.state.get(weight)
        if not state:
            return
        mask = layer.to_param_layout(keep.to(weight.dtype), weight.shape)
        with torch.no_grad():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                    value.mul_(mask.to(value.dtype))
