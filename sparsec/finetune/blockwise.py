"""Block-wise recovery: train each pruned block alone to reproduce the dense block's output.

After one-shot pruning, the cheapest recovery that still trains weights is local: for every
block in order, fit the student block's kept weights (masks fixed) so that, on calibration
windows, its output matches the teacher block's output under SquareHead's normalized MSE
(``L = mean((h_s - h_t)**2) / mean(h_t**2)``, ``losses.py``; with the sink and per-token options
of :func:`~sparsec.finetune.losses.squarehead_terms`). Only one block's activations and gradients
are alive at a time, so the cost is a few forward and backward passes of one block per window,
not of the whole model (EBFT, Guo et al., 2024, reports LLaMA-7B at 70% from this alone).

The blocks are cut out of the captured graph (``stages.py``), so this works for every graph the
tap pass understands. Each block's inputs come from one of two places (``inputs=``):

* ``"student"`` (default): the outputs of the student's blocks already recovered, so each block
  learns to correct the error that reaches it and errors do not pile up;
* ``"teacher"``: the dense model's own block inputs, so every block is an independent problem
  (they could run in parallel), at the price of never seeing the error of the blocks before it.

Contract:

* ``student`` is trained in place (its graph's parameters are the model's); masked weights stay
  exactly zero (checked: :attr:`BlockwiseReport.mask_violations`); the teacher is never changed;
* ``data`` is ``[N, seq_len]`` token ids (full windows, no padding), cut into steps of
  ``batch_size`` windows; every block sees every step ``epochs`` times, in an order fixed by
  ``seed``;
* with ``checkpoint_dir``, each recovered block's parameters are written there atomically as
  soon as it is done; a later call with the same settings and data (``resume=True``) loads the
  finished blocks, replays them forward (no training) and continues with the next one. Other
  settings or data in that directory are refused;
* bad settings raise :class:`BlockwiseError` before any weight or file is touched.

Example::

    report = recover_blocks(student_capture, teacher_capture, windows,
                            BlockwiseConfig(epochs=4, lr=1e-4, inputs="student"))
    print(report.table())      # per block: error before and after, seconds
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from sparsec.finetune.losses import (
    SQUAREHEAD_NORMALIZATIONS,
    LossInputError,
    check_sinks,
    squarehead_terms,
)
from sparsec.finetune.stages import Stage, bind_inputs, split_at_blocks
from sparsec.finetune.trainer import mask_violations
from sparsec.passes.taps import is_tapped, remove_taps

#: where a block's inputs come from (see the module docstring)
INPUT_SOURCES = ("student", "teacher")
_STATE_FILE = "blockwise.json"


class BlockwiseError(ValueError):
    """Settings, data or a checkpoint that block-wise recovery cannot use; says what to change."""


@dataclass
class BlockwiseConfig:
    """Every setting of a block-wise recovery run; ``validate()`` runs before anything is touched."""

    #: passes over the data per block
    epochs: int = 4
    #: windows per optimizer step
    batch_size: int = 4
    #: peak Adam learning rate; it decays to ``final_lr_ratio * lr`` over each block's steps (cosine)
    lr: float = 1e-4
    final_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    #: ``student`` or ``teacher``: where each block's inputs come from
    inputs: str = "student"
    #: SquareHead's normalizer (``layer`` or ``token``) and which positions it leaves out
    normalize: str = "layer"
    sinks: str = "none"
    seed: int = 0
    #: glob patterns of the blocks (empty: found automatically), as in ``insert-taps``
    blocks: str = ""
    checkpoint_dir: str | None = None
    resume: bool = True
    progress: bool = True

    def validate(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise BlockwiseError(message)

        need(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be a positive integer, got {self.epochs}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"batch_size must be a positive integer, got {self.batch_size}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}")
        need(0 <= self.final_lr_ratio <= 1, f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        need(0 <= self.weight_decay < math.inf, f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        need(self.inputs in INPUT_SOURCES, f"inputs must be {' or '.join(INPUT_SOURCES)}, got {self.inputs!r}")
        need(self.normalize in SQUAREHEAD_NORMALIZATIONS,
             f"unknown SquareHead normalization {self.normalize!r}; use {' or '.join(SQUAREHEAD_NORMALIZATIONS)}")
        try:
            check_sinks(self.sinks)
        except LossInputError as e:
            raise BlockwiseError(str(e)) from None

    def fingerprint(self, data: torch.Tensor) -> str:
        """What a checkpoint must agree on to be resumed: the settings that shape training and the data."""
        keep = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("checkpoint_dir", "resume", "progress")}
        h = hashlib.sha256(json.dumps(keep, sort_keys=True).encode())
        h.update(str(tuple(data.shape)).encode())
        h.update(data.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass
class BlockRecord:
    """One block: its normalized error on the data before and after training, and its cost."""

    block: int
    name: str
    loss_before: float
    loss_after: float
    steps: int
    seconds: float
    resumed: bool = False


@dataclass
class BlockwiseReport:
    """A run: one record per block in order, the total seconds, and pruned weights that moved (0)."""

    records: list[BlockRecord] = field(default_factory=list)
    seconds: float = 0.0
    mask_violations: int = 0

    def table(self) -> str:
        lines = ["| block | name | error before | error after | steps | seconds |", "|---:|---|---:|---:|---:|---:|"]
        for r in self.records:
            note = " (resumed)" if r.resumed else ""
            lines.append(f"| {r.block} | {r.name}{note} | {r.loss_before:.4f} | {r.loss_after:.4f} | {r.steps} | "
                         f"{r.seconds:.1f} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "mask_violations": self.mask_violations,
                "blocks": [dataclasses.asdict(r) for r in self.records]}


def _graph(model: Any, role: str) -> tuple[fx.GraphModule, dict[str, Any]]:
    """The GraphModule and constant inputs of a Capture, DistillModel or GraphModule."""
    gm = getattr(model, "graph_module", model)
    if not isinstance(gm, fx.GraphModule):
        raise BlockwiseError(f"the {role} must be a sparsec Capture, a DistillModel or a torch.fx.GraphModule; "
                             f"capture it first (sparsec.capture.capture)")
    return gm, dict(getattr(model, "constant_kwargs", {}) or {})


def _check_data(data: Any, batch_size: int) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.dtype != torch.long:
        raise BlockwiseError("data must be a [windows, seq_len] tensor of token ids (torch.long)")
    if data.shape[0] < 1 or data.shape[1] < 2:
        raise BlockwiseError(f"data has shape {tuple(data.shape)}; give at least one window of 2 or more tokens")
    if data.shape[0] < batch_size:
        raise BlockwiseError(f"batch_size={batch_size} is larger than the {data.shape[0]} windows given")
    return data


def _lr_factor(step: int, steps: int, final_ratio: float) -> float:
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))


class _Chain:
    """One model's stages walked over every batch of windows; values are freed after their last reader."""

    def __init__(self, gm: fx.GraphModule, constants: dict[str, Any], batches: list[torch.Tensor],
                 blocks: str) -> None:
        self.stages = split_at_blocks(gm, blocks)
        self.position = 0
        last_use: dict[str, int] = {}
        for s, stage in enumerate(self.stages):
            for name in stage.inputs:
                last_use[name] = s
        self.last_use = last_use
        takes_mask = "attention_mask" in inspect.signature(gm.forward).parameters
        self.envs = []
        for ids in batches:  # full windows: a graph that takes a mask gets all ones
            extra = {"attention_mask": torch.ones_like(ids)} if takes_mask and "attention_mask" not in constants else {}
            self.envs.append(bind_inputs(gm, (), {"input_ids": ids, **extra, **constants}))

    def block_stages(self) -> list[Stage]:
        return [s for s in self.stages if s.kind == "block"]

    def advance_to(self, stage: Stage) -> None:
        """Run every stage before ``stage`` that has not run yet (glue, or blocks run as they are)."""
        while self.stages[self.position] is not stage:
            self.run_current()

    @torch.no_grad()
    def run_current(self) -> None:
        stage = self.stages[self.position]
        for env in self.envs:
            env.update(stage.run(env))
        self.position += 1
        self._free()

    def _free(self) -> None:
        done = self.position - 1
        dead = [name for name, last in self.last_use.items() if last == done]
        for env in self.envs:
            for name in dead:
                env.pop(name, None)


def _block_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, config: BlockwiseConfig) -> torch.Tensor:
    return squarehead_terms([student_out], [teacher_out], normalize=config.normalize, sinks=config.sinks)[0]


def recover_blocks(student: Any, teacher: Any, data: torch.Tensor, config: BlockwiseConfig | None = None,
                   on_block: Callable[[BlockRecord], None] | None = None) -> BlockwiseReport:
    """Recover ``student`` block by block against ``teacher`` on ``data``; see the module docstring.

    ``student`` and ``teacher`` are sparsec Captures (or GraphModules, or DistillModels) of the
    same architecture, the student pruned with masks in its graph. ``on_block`` is called with
    each block's record as soon as the block is done (progress reporting).
    """
    config = config or BlockwiseConfig()
    config.validate()
    data = _check_data(data, config.batch_size)
    s_gm, s_const = _graph(student, "student")
    t_gm, t_const = _graph(teacher, "teacher")
    if s_gm is t_gm:
        raise BlockwiseError("teacher and student are the same graph; give the teacher its own copy of the model")
    shared = {id(p) for p in s_gm.parameters()} & {id(p) for p in t_gm.parameters()}
    if shared:
        raise BlockwiseError(f"teacher and student share {len(shared)} parameter tensor(s); capture the teacher "
                             f"from a copy of the model (copy.deepcopy) so training the student leaves it fixed")
    # Stages are cut from the untapped graphs; taps are put back afterwards.
    retap = [(gm, gm.meta.get("sparsec.taps")) for gm in (s_gm, t_gm) if is_tapped(gm)]
    for gm, _ in retap:
        remove_taps(gm)
    try:
        return _Recovery(s_gm, s_const, t_gm, t_const, data, config, on_block).run()
    finally:
        from sparsec.passes.taps import insert_taps

        for gm, names in retap:  # the same blocks as before, by their exact names
            insert_taps(gm, ",".join(names))


class _Recovery:
    def __init__(self, s_gm: fx.GraphModule, s_const: dict, t_gm: fx.GraphModule, t_const: dict,
                 data: torch.Tensor, config: BlockwiseConfig, on_block: Callable | None) -> None:
        self.config, self.on_block = config, on_block
        self.s_gm = s_gm
        batches = [data[i: i + config.batch_size] for i in range(0, data.shape[0], config.batch_size)]
        self.teacher = _Chain(t_gm, t_const, batches, config.blocks)
        self.student = _Chain(s_gm, s_const, batches, config.blocks)
        t_blocks, s_blocks = self.teacher.block_stages(), self.student.block_stages()
        if len(t_blocks) != len(s_blocks):
            raise BlockwiseError(f"the student has {len(s_blocks)} blocks and the teacher {len(t_blocks)}; "
                                 f"block-wise recovery pairs them one to one")
        self.pairs = list(zip(s_blocks, t_blocks))
        self.fingerprint = config.fingerprint(data)
        self.done = self._read_state()

    # -- checkpoints ------------------------------------------------------------------------------

    def _dir(self) -> Path | None:
        return Path(self.config.checkpoint_dir) if self.config.checkpoint_dir else None

    def _read_state(self) -> dict[int, dict]:
        d = self._dir()
        if d is None or not self.config.resume or not (d / _STATE_FILE).exists():
            return {}
        try:
            state = json.loads((d / _STATE_FILE).read_text())
        except (OSError, ValueError) as e:
            raise BlockwiseError(f"cannot read {d / _STATE_FILE} ({e}); remove the directory or use another "
                                 f"checkpoint_dir") from None
        if state.get("fingerprint") != self.fingerprint:
            raise BlockwiseError(f"{d} holds block-wise recovery of other settings or data; use another "
                                 f"checkpoint_dir, or resume=False to start over there")
        done = {int(r["block"]): r for r in state.get("blocks", [])}
        for index in done:
            if not (d / f"block-{index:03d}.safetensors").exists():
                raise BlockwiseError(f"{d} lists block {index} as done but its weights file is missing; "
                                     f"remove the directory or use another checkpoint_dir")
        return done

    def _params(self, stage: Stage) -> dict[str, torch.nn.Parameter]:
        return dict(stage.module.named_parameters())

    def _save_block(self, stage: Stage, record: BlockRecord, records: list[BlockRecord]) -> None:
        from safetensors.torch import save_file

        d = self._dir()
        if d is None:
            return
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"block-{record.block:03d}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({k: v.detach().contiguous() for k, v in self._params(stage).items()}, str(tmp))
        os.replace(tmp, path)
        state = {"fingerprint": self.fingerprint, "blocks": [dataclasses.asdict(r) for r in records]}
        tmp = d / f".{_STATE_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, d / _STATE_FILE)

    def _load_block(self, stage: Stage, index: int) -> None:
        from safetensors.torch import load_file

        path = self._dir() / f"block-{index:03d}.safetensors"
        try:
            saved = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a damaged file, reported in one line
            raise BlockwiseError(f"cannot read {path} ({e}); remove the directory or use another "
                                 f"checkpoint_dir") from None
        params = self._params(stage)
        if set(saved) != set(params) or any(saved[k].shape != params[k].shape for k in params):
            raise BlockwiseError(f"{path} does not hold this block's parameters; remove the directory or use "
                                 f"another checkpoint_dir")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])

    # -- the walk ---------------------------------------------------------------------------------

    def run(self) -> BlockwiseReport:
        from tqdm.auto import tqdm

        report = BlockwiseReport()
        t0 = time.perf_counter()
        bar = tqdm(total=len(self.pairs), desc="block-wise recovery", disable=not self.config.progress,
                   dynamic_ncols=True)
        try:
            for index, (s_stage, t_stage) in enumerate(self.pairs):
                self.teacher.advance_to(t_stage)
                if self.config.inputs == "teacher":  # taken before the teacher's block frees them
                    inputs = [self._teacher_values(s_stage, env) for env in self.teacher.envs]
                self.teacher.run_current()
                targets = [env[t_stage.output] for env in self.teacher.envs]
                if self.config.inputs == "student":
                    self.student.advance_to(s_stage)
                    inputs = [{n: env[n] for n in s_stage.inputs} for env in self.student.envs]
                if index in self.done:
                    self._load_block(s_stage, index)
                    saved = self.done[index]
                    record = BlockRecord(index, s_stage.name, saved["loss_before"], saved["loss_after"],
                                         saved["steps"], saved["seconds"], resumed=True)
                else:
                    record = self._train(index, s_stage, inputs, targets)
                report.records.append(record)
                if not record.resumed:
                    self._save_block(s_stage, record, report.records)
                if self.config.inputs == "student":
                    self.student.run_current()
                if self.on_block is not None:
                    self.on_block(record)
                bar.update(1)
                bar.set_postfix(block=index, before=f"{record.loss_before:.4f}", after=f"{record.loss_after:.4f}")
        finally:
            bar.close()
        report.seconds = time.perf_counter() - t0
        report.mask_violations = mask_violations(self.s_gm)
        if report.mask_violations:
            raise BlockwiseError(f"{report.mask_violations} pruned weight(s) became nonzero during block-wise "
                                 f"recovery; the mask multiplication is missing from the graph")
        return report

    def _teacher_values(self, stage: Stage, env: dict[str, Any]) -> dict[str, Any]:
        missing = [n for n in stage.inputs if n not in env]
        if missing:
            raise BlockwiseError(f"block {stage.name!r} reads {missing}, which the teacher's graph does not "
                                 f"compute under those names; capture teacher and student the same way")
        return {n: env[n] for n in stage.inputs}

    @torch.no_grad()
    def _error(self, stage: Stage, inputs: list[dict], targets: list[torch.Tensor]) -> float:
        total = 0.0
        for env, target in zip(inputs, targets):
            out = stage.run(env)[stage.output]
            total += float(_block_loss(out, target, self.config))
        return total / len(targets)

    def _train(self, index: int, stage: Stage, inputs: list[dict], targets: list[torch.Tensor]) -> BlockRecord:
        c = self.config
        t0 = time.perf_counter()
        before = self._error(stage, inputs, targets)
        params = [p for p in stage.parameters() if p.requires_grad and p.is_floating_point()]
        steps = c.epochs * len(targets)
        if params:
            optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                         lambda s: _lr_factor(s, steps, c.final_lr_ratio))
            gen = torch.Generator().manual_seed(c.seed * 1_000_003 + index)
            for _ in range(c.epochs):
                for b in torch.randperm(len(targets), generator=gen).tolist():
                    out = stage.run(inputs[b])[stage.output]
                    loss = _block_loss(out, targets[b], c)
                    if not torch.isfinite(loss):
                        raise BlockwiseError(f"block {stage.name!r}: the loss became {float(loss)}; lower lr "
                                             f"(now {c.lr})")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
            for p in params:
                p.grad = None
        after = self._error(stage, inputs, targets)
        return BlockRecord(index, stage.name, before, after, steps if params else 0, time.perf_counter() - t0)
