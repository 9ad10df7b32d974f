"""Distillation-aware sparse fine-tuning: ``finetune(student, teacher, data, config) -> History``.

The recipe of Kurtic et al. (2023): a frozen dense teacher, a pruned student whose masks stay
fixed (or grow on a gradual schedule), AdamW (weight decay 0 by default), linear warmup then
linear decay, and the loss ``a * CE + b * KL + c * SquareHead`` (``losses.py``)::

    from sparsec.finetune import FinetuneConfig, finetune
    history = finetune(student_capture, teacher_capture, token_windows,
                       FinetuneConfig(steps=200, lr=1e-4, squarehead=1.0, checkpoint_dir="ckpt"))
    history[-1]          # {"step": 200, "lr": ..., "loss": ..., "ce": ..., "squarehead": ...}

Contract:

* the student is trained in place (its parameters are the captured graph's, which are the
  eager model's when an eager module or a Capture is given); the teacher is never changed;
* pruned weights stay exactly zero: the graph multiplies every masked weight by its mask, so
  their gradients, Adam moments and updates are zero; this is checked after training
  (:attr:`History.mask_violations`, an error if nonzero);
* with ``checkpoint_dir`` a checkpoint is written atomically every ``checkpoint_every`` steps
  and at the end; a new run with the same directory and ``resume=True`` continues from it
  exactly (weights, masks, optimizer, learning-rate schedule, RNG and data position);
* bad input (empty data, teacher/student whose block outputs differ, blocks matching nothing,
  a damaged checkpoint) raises before any weight or file is changed.

One optimizer step runs ``grad_accum`` micro-batches of ``micro_batch_size`` sequences on each
of ``world_size`` processes (``distributed.py``); the loss of each micro-batch is divided by
``grad_accum`` and gradients are averaged over processes, so the step follows the mean loss
of its micro-batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from sparsec.finetune import distributed as D
from sparsec.finetune.batches import TokenData
from sparsec.finetune.checkpoint import (
    CheckpointError,
    check_data_state,
    check_model_state,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from sparsec.finetune.losses import LossWeights, distillation_loss
from sparsec.finetune.model import DistillModel, ModelInputError, as_distill_model, check_pair
from sparsec.finetune.schedules import CubicSchedule, GradualMagnitudePruning
from sparsec.ir import meta
from sparsec.ir.device import move_module
from sparsec.ir.layers import find_layers
from sparsec.passes.masks import DEFAULT_IGNORE, apply_mask, mask_buffer_name
from sparsec.passes.taps import is_tapped, remove_taps


class FinetuneError(ValueError):
    """Settings or a run state that fine-tuning cannot work with; the message says what to change."""


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run. ``validate()`` runs before anything is touched."""

    steps: int = 100
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    #: the learning rate decays linearly from ``lr`` (after warmup) to ``final_lr_ratio * lr``
    final_lr_ratio: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = None
    ce: float = 1.0
    kl: float = 0.0
    squarehead: float = 1.0
    temperature: float = 1.0
    #: SquareHead's normalizer: ``layer`` (the authors') or ``token`` (see ``losses.py``)
    squarehead_normalize: str = "layer"
    #: positions SquareHead leaves out: ``none``, ``first`` or ``norm:K`` (see ``losses.py``)
    squarehead_sinks: str = "none"
    bf16: bool = False
    seed: int = 0
    #: comma-separated glob patterns of the blocks to tap (empty: found automatically)
    blocks: str = ""
    device: str = "auto"
    strategy: str = "auto"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = True
    #: end this run after this optimizer step (a checkpoint is written there); a later run with
    #: resume=True continues to ``steps`` as if never interrupted. None runs to ``steps``.
    stop_at: int | None = None
    progress: bool = True
    #: gradual magnitude pruning during training (``schedules.py``); None keeps the masks fixed
    gradual: CubicSchedule | None = None
    prune_layers: str = ""
    prune_ignore: str = DEFAULT_IGNORE

    def validate(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise FinetuneError(message)

        need(isinstance(self.steps, int) and self.steps >= 1,
             f"steps must be a positive integer, got {self.steps}")
        need(self.micro_batch_size >= 1, f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}")
        need(0 <= self.weight_decay < math.inf, f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        need(0 <= self.warmup_steps < self.steps, f"warmup_steps must be in [0, steps={self.steps}), "
             f"got {self.warmup_steps}")
        need(0 <= self.final_lr_ratio <= 1, f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0,
             f"max_grad_norm must be positive or None, got {self.max_grad_norm}")
        need(self.stop_at is None or 1 <= self.stop_at <= self.steps,
             f"stop_at must be in [1, steps={self.steps}] or None, got {self.stop_at}")
        need(self.stop_at is None or self.checkpoint_dir is not None,
             "stop_at needs checkpoint_dir, or the stopped run could not be resumed")
        need(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        need(self.checkpoint_every == 0 or self.checkpoint_dir is not None,
             "checkpoint_every needs checkpoint_dir")
        need(self.strategy in D.STRATEGIES,
             f"unknown strategy {self.strategy!r}; use one of {', '.join(D.STRATEGIES)}")
        self.loss_weights()

    def loss_weights(self) -> LossWeights:
        return LossWeights(ce=self.ce, kl=self.kl, squarehead=self.squarehead, temperature=self.temperature,
                           squarehead_normalize=self.squarehead_normalize,
                           squarehead_sinks=self.squarehead_sinks)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return out


@dataclass
class History:
    """What a run did: one record per optimizer step (``step``, ``lr``, ``loss`` and each loss
    component averaged over the step's micro-batches and processes, ``seconds`` since start)."""

    records: list[dict[str, float]] = field(default_factory=list)
    #: step the run started from (0, or the step of the checkpoint it resumed)
    start_step: int = 0
    seconds: float = 0.0
    #: pruned positions holding a nonzero weight after training (0 unless something is broken)
    mask_violations: int = 0
    #: sha256 prefix over every mask buffer, equal on every rank of a distributed run
    masks_checksum: str = ""
    checkpoint: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, float]]:
        return iter(self.records)

    def __getitem__(self, index: int) -> dict[str, float]:
        return self.records[index]


def lr_factor(step: int, steps: int, warmup: int, final_ratio: float) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based): linear warmup
    over ``warmup`` steps (the first step already moves), then linear decay toward
    ``final_ratio`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    remaining = (steps - step) / max(1, steps - warmup)
    return final_ratio + (1.0 - final_ratio) * remaining


def mask_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """``(weight name, mask buffer name)`` of every masked layer of ``gm``, each once."""
    pairs = {}
    for node in gm.graph.nodes:
        if meta.MASK in node.meta and meta.LAYER in node.meta:
            pairs.setdefault(node.meta[meta.LAYER].weight, node.meta[meta.MASK])
    return sorted(pairs.items())


def mask_violations(gm: fx.GraphModule) -> int:
    """Pruned positions (mask 0) whose weight is not exactly zero."""
    bad = 0
    for weight, mask in mask_pairs(gm):
        w = D.full_tensor(gm.get_parameter(weight)).detach()
        m = D.full_tensor(gm.get_buffer(mask))
        bad += int(((m == 0) & (w != 0)).sum())
    return bad


def masks_checksum(gm: fx.GraphModule) -> str:
    h = hashlib.sha256()
    for weight, mask in mask_pairs(gm):
        h.update(weight.encode())
        h.update((D.full_tensor(gm.get_buffer(mask)) != 0).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _set_mode(module: torch.nn.Module, training: bool) -> None:
    # Graphs from torch.export refuse train()/eval(); they compute the eval-mode function anyway.
    try:
        module.train(training)
    except NotImplementedError:
        pass


def finetune(student: Any, teacher: Any, data: Any, config: FinetuneConfig | None = None) -> History:
    """Fine-tune ``student`` against ``teacher`` on ``data``; see the module docstring.

    ``student``/``teacher``: a :class:`~sparsec.finetune.model.DistillModel`, a sparsec
    ``Capture``, a GraphModule or an eager module (tapped automatically, ``config.blocks``);
    ``teacher`` may be None when ``kl`` and ``squarehead`` are 0. ``data``: ``[N, seq_len]``
    token ids or ``{"input_ids", "attention_mask"}`` (see ``batches.py``).
    """
    config = config or FinetuneConfig()
    config.validate()
    tokens = TokenData.from_any(data)
    ctx = D.setup(config.strategy, config.device)
    try:
        return _Run(student, teacher, tokens, config, ctx).train()
    finally:
        ctx.close()


class _Run:
    def __init__(self, student: Any, teacher: Any, tokens: TokenData, config: FinetuneConfig,
                 ctx: D.DistContext) -> None:
        self.config, self.tokens, self.ctx = config, tokens, ctx
        self.weights = config.loss_weights()
        if config.gradual is not None and ctx.strategy == "fsdp":
            raise FinetuneError("gradual pruning needs every weight on every rank; use strategy=ddp (or one "
                                "process) with a gradual schedule, or prune first and train with fixed masks")
        if self.weights.needs_teacher and teacher is None:
            raise FinetuneError("kl and squarehead need a teacher; give one, or set kl=0 and squarehead=0")
        tapped_here: list[fx.GraphModule] = []
        try:
            self.student = self._wrap(student, "student", tapped_here)
            self.teacher = None
            if self.weights.needs_teacher:
                self.teacher = self._wrap(teacher, "teacher", tapped_here)
                if self.weights.squarehead > 0:
                    check_pair(self.student, self.teacher, self.tokens.input_ids[:2])
                elif self.student.graph_module is self.teacher.graph_module:
                    raise ModelInputError("teacher and student are the same model; give the teacher its own "
                                          "copy")
            self.resume_state = self._read_checkpoint()
        except Exception:
            for gm in tapped_here:  # leave the caller's graphs as they were
                remove_taps(gm)
            raise

    def _wrap(self, model: Any, role: str, tapped_here: list[fx.GraphModule]) -> DistillModel:
        gm = getattr(model, "graph_module", model)
        was = isinstance(gm, fx.GraphModule) and is_tapped(gm)
        wrapped = as_distill_model(model, self.tokens.input_ids[:2], self.config.blocks, role)
        if isinstance(gm, fx.GraphModule) and not was:
            tapped_here.append(wrapped.graph_module)
        return wrapped

    # -- checkpoints ------------------------------------------------------------------------------

    def _data_state(self) -> dict[str, Any]:
        c = self.config
        return {"fingerprint": self.tokens.fingerprint(), "seed": c.seed,
                "global_batch": c.micro_batch_size * c.grad_accum * self.ctx.world_size}

    def _read_checkpoint(self) -> dict[str, Any] | None:
        c = self.config
        if not (c.checkpoint_dir and c.resume):
            return None
        path = checkpoint_path(c.checkpoint_dir)
        if not path.exists():
            return None
        state = load_checkpoint(path)
        check_data_state(path, state["data"], self._data_state())
        if state["step"] > c.steps:
            raise CheckpointError(f"checkpoint {path} is at step {state['step']}, beyond steps={c.steps}; "
                                  f"raise steps or use a new checkpoint directory")
        # A gradual schedule creates mask buffers on its first pruning step; a checkpoint taken
        # after it holds masks the fresh student lacks. They are attached only once the whole
        # checkpoint is known to fit, so a refused checkpoint changes nothing.
        gm = self.student.graph_module
        have = dict(gm.named_buffers())
        missing = []
        for layer in find_layers(gm):
            key = f"graph_module.{mask_buffer_name(layer)}"
            if mask_buffer_name(layer) not in have and key in state["model"] and layer.weight not in {
                    m.weight for m, _ in missing}:
                missing.append((layer, key))
        expected = dict(self.student.state_dict())
        expected.update({key: gm.get_parameter(layer.weight) for layer, key in missing})
        check_model_state(path, state["model"], expected)
        for layer, key in missing:
            apply_mask(gm, layer, layer.as_matrix(state["model"][key]) != 0)
        return state

    def _state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
               history: list[dict[str, float]]) -> dict[str, Any] | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        if self.ctx.distributed:
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd = get_model_state_dict(model, options=opts)
            optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
        else:
            model_sd = {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
            opts = StateDictOptions(full_state_dict=True)
            optim_sd = _to_cpu(get_optimizer_state_dict(model, optimizer, options=opts))
        if not self.ctx.is_main:
            return None
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"step": step, "model": model_sd, "optimizer": optim_sd,
                "lr_scheduler": scheduler.state_dict(), "rng": rng, "data": self._data_state(),
                "config": _plain(self.config.to_dict()), "history": list(history)}

    def _save(self, *args: Any) -> str | None:
        state = self._state(*args)
        path = None
        if state is not None:
            path = str(save_checkpoint(checkpoint_path(self.config.checkpoint_dir), state))
        self.ctx.barrier()
        return path

    # -- training ---------------------------------------------------------------------------------

    def train(self) -> History:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from tqdm.auto import tqdm

        c, ctx = self.config, self.ctx
        student, teacher = self.student, self.teacher
        # captured graphs record devices in their nodes (positions, masks): move those too
        move_module(student, ctx.device)
        _set_mode(student, True)
        if teacher is not None:
            move_module(teacher, ctx.device)
            _set_mode(teacher, False)
        state = self.resume_state
        start = 0
        records: list[dict[str, float]] = []
        if state is not None:
            student.load_state_dict(state["model"])
            start = int(state["step"])
            records = list(state["history"])
        D.broadcast_state(student, ctx)
        model = D.wrap(student, ctx)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise FinetuneError("the student has no trainable parameter (all requires_grad=False)")
        optimizer = torch.optim.AdamW(params, lr=c.lr, betas=c.adam_betas, eps=c.adam_eps,
                                      weight_decay=c.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, c.steps, c.warmup_steps, c.final_lr_ratio))
        if state is not None:
            set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
            scheduler.load_state_dict(state["lr_scheduler"])
            torch.set_rng_state(state["rng"]["torch"])
            if "cuda" in state["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        gradual = None
        if c.gradual is not None:
            s = c.gradual
            gradual = GradualMagnitudePruning(student.graph_module, s.final_sparsity, s.initial_sparsity,
                                              s.start_step, s.num_prunings, s.frequency, c.prune_layers,
                                              c.prune_ignore, optimizer=optimizer)
        autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=c.bf16)
        bar = tqdm(total=c.steps, initial=start, desc="finetune", disable=not (c.progress and ctx.is_main),
                   dynamic_ncols=True)
        t0 = time.perf_counter()
        saved_path = None
        try:
            end = c.steps if c.stop_at is None else max(start, c.stop_at)
            for step in range(start, end):
                if gradual is not None:
                    gradual.step(step)
                lr = optimizer.param_groups[0]["lr"]
                parts = self._step(model, optimizer, step, autocast)
                scheduler.step()
                record = {"step": step + 1, "lr": lr, **parts, "seconds": time.perf_counter() - t0}
                records.append(record)
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in parts.items()})
                last = step + 1 == end
                due = c.checkpoint_every and (step + 1) % c.checkpoint_every == 0
                if c.checkpoint_dir and (last or due):
                    saved_path = self._save(model, optimizer, scheduler, step + 1, records)
        finally:
            bar.close()
        D.unshard_into(model, student, ctx)
        history = History(records, start, time.perf_counter() - t0, checkpoint=saved_path)
        history.mask_violations = mask_violations(student.graph_module)
        history.masks_checksum = masks_checksum(student.graph_module)
        if history.mask_violations:
            raise FinetuneError(f"{history.mask_violations} pruned weight(s) became nonzero during training; "
                                f"the mask multiplication is missing from the graph")
        return history

    def _step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
              autocast: Any) -> dict[str, float]:
        c, ctx = self.config, self.ctx
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(c.grad_accum):
            ids, am = self.tokens.micro_batch(step, micro, micro_batch=c.micro_batch_size,
                                              grad_accum=c.grad_accum, rank=ctx.rank,
                                              world_size=ctx.world_size, seed=c.seed)
            ids = ids.to(ctx.device)
            am = am.to(ctx.device) if am is not None else None
            with D.gradient_sync(model, ctx, sync=micro == c.grad_accum - 1):
                t_logits, t_hidden = None, ()
                if self.teacher is not None:
                    with torch.no_grad(), autocast:
                        t_logits, t_hidden = self.teacher(ids, am)
                with autocast:
                    s_logits, s_hidden = model(ids, am)
                    loss = distillation_loss(self.weights, ids, s_logits, s_hidden, t_logits, t_hidden, am)
                if not torch.isfinite(loss.total):
                    raise FinetuneError(f"the loss became {float(loss.total.detach())} at step {step + 1}; lower lr "
                                        f"(now {c.lr}) or check the data and the teacher")
                (loss.total / c.grad_accum).backward()
            for k, v in loss.parts.items():
                sums[k] = sums.get(k, 0.0) + v
        if c.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                                  c.max_grad_norm)
            # summed like the loss parts, which are divided by grad_accum below
            sums["grad_norm"] = D.full_tensor(norm).detach() * c.grad_accum
        optimizer.step()
        parts = {k: float(v) / c.grad_accum for k, v in sums.items()}
        return ctx.mean(parts)


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def _plain(x: Any) -> Any:
    """Config values as the plain types ``torch.load(weights_only=True)`` reads back."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)
