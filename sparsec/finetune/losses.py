"""The fine-tuning losses: task cross entropy, logit distillation (KL) and SquareHead.

All three count only real tokens: ``attention_mask`` (``[batch, seq]``, 1 = token, 0 = padding)
selects the positions, and ``None`` means every position is real.

* :func:`causal_lm_ce`: next-token cross entropy, ``logits[:, t]`` predicting ``ids[:, t + 1]``,
  averaged over the pairs where both tokens are real.
* :func:`kl_distillation`: the convention of the SquareHead authors' code (Kurtic et al., 2023),
  ``F.kl_div(log_softmax(s / T), log_softmax(t / T), log_target=True, reduction="sum") * T**2``
  divided by the number of real tokens. ``F.kl_div(input, target)`` is ``KL(target || input)``,
  so this is ``KL(p_teacher || p_student)`` per token (the teacher's distribution weights the
  log-ratio, as in Hinton et al.'s distillation), summed over the vocabulary, averaged over
  tokens and scaled by ``T**2`` so that its gradients keep their size as ``T`` changes. At the
  authors' ``T = 1`` the scale is 1.
* :func:`squarehead`: for every block output ``l = 1..L`` (the embedding output is not one),
  ``L_l = mean((h_s - h_t)**2) / (mean(h_t**2) + eps)`` with both means over the real tokens
  and the hidden dimension, and the layer terms SUMMED (not averaged) over ``l``. The
  normalization by the teacher's own energy makes every layer count alike, whatever the scale
  of its residual stream. ``normalize="token"`` (not the authors') normalizes each real token
  by its own teacher energy instead, ``mean_t[ mean_d((h_s - h_t)**2) / (mean_d(h_t**2) + eps) ]``:
  in Llama-family models the first token of every window carries "massive activations" (in
  SmolLM2-135M one channel near 26,700 from block 11 on, 92-99.6% of a 128-token window's sum of
  squares), so the per-layer normalizer is that one token's energy and the other tokens' errors
  are divided by a number about a hundred times their own.
  ``sinks`` leaves such positions out of SquareHead altogether: ``"first"`` the first token of
  every sequence, ``"norm:K"`` every token whose teacher hidden-state norm exceeds ``K`` times the
  median norm of its sequence, ``"none"`` (the authors') keeps every real token.

:func:`distillation_loss` combines them, ``total = a * CE + b * KL + c * SquareHead``, and
returns every component (detached) for logging; components with weight 0 are not computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

#: added to the teacher's mean square in SquareHead, so an all-zero teacher layer cannot divide by 0
SQUAREHEAD_EPS = 1e-6


class LossInputError(ValueError):
    """Teacher and student outputs that cannot be compared (shapes, tap counts, empty masks)."""


def _token_mask(attention_mask: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor:
    """Bool ``[batch, seq]`` mask of real tokens."""
    if attention_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(attention_mask.shape) != tuple(shape):
        raise LossInputError(f"attention_mask has shape {tuple(attention_mask.shape)}, the outputs have "
                             f"[batch, seq] = {tuple(shape)}")
    return attention_mask.to(device=device) != 0


def causal_lm_ce(logits: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross entropy over real (input, target) pairs; float32 math."""
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise LossInputError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    real = _token_mask(attention_mask, input_ids.shape, logits.device)
    pairs = real[:, :-1] & real[:, 1:]
    if not pairs.any():
        raise LossInputError("no real (input, next token) pair in this batch: every sequence is shorter "
                             "than 2 real tokens")
    return F.cross_entropy(logits[:, :-1][pairs].float(), input_ids[:, 1:][pairs])


def kl_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """``T**2 * KL(p_teacher || p_student)`` per real token (see the module docstring)."""
    if temperature <= 0:
        raise LossInputError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise LossInputError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} differ; teacher and student need the same "
                             f"vocabulary")
    real = _token_mask(attention_mask, student_logits.shape[:2], student_logits.device)
    count = int(real.sum())
    if count == 0:
        raise LossInputError("the attention mask selects no token")
    s = F.log_softmax(student_logits[real].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[real].float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum") * (temperature ** 2) / count


#: how SquareHead normalizes: one teacher energy per layer (the authors'), or one per token
SQUAREHEAD_NORMALIZATIONS = ("layer", "token")


def check_sinks(rule: str) -> float | None:
    """Validate a ``sinks`` rule (``none``, ``first`` or ``norm:K`` with K > 1); returns K or None."""
    if rule in ("none", "first"):
        return None
    if rule.startswith("norm:"):
        try:
            k = float(rule[5:])
        except ValueError:
            k = float("nan")
        if k > 1 and math.isfinite(k):
            return k
    raise LossInputError(f"unknown sinks rule {rule!r}; use none, first, or norm:K with K > 1 (e.g. norm:20: "
                         f"leave out tokens whose teacher norm exceeds 20x their sequence's median)")


def sink_positions(teacher_hidden: torch.Tensor, rule: str) -> torch.Tensor:
    """Bool ``[batch, seq]``: the positions ``rule`` leaves out of SquareHead (module docstring)."""
    k = check_sinks(rule)
    sinks = torch.zeros(teacher_hidden.shape[:2], dtype=torch.bool, device=teacher_hidden.device)
    if rule == "first":
        sinks[:, 0] = True
    elif k is not None:
        norms = teacher_hidden.detach().float().norm(dim=-1)
        sinks = norms > k * norms.median(dim=1, keepdim=True).values
    return sinks


def squarehead_terms(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                     attention_mask: torch.Tensor | None = None, eps: float = SQUAREHEAD_EPS,
                     normalize: str = "layer", sinks: str = "none") -> torch.Tensor:
    """The per-layer terms ``L_l`` as a 1-D tensor of length L (see the module docstring)."""
    check_sinks(sinks)
    if normalize not in SQUAREHEAD_NORMALIZATIONS:
        raise LossInputError(f"unknown SquareHead normalization {normalize!r}; use "
                             f"{' or '.join(SQUAREHEAD_NORMALIZATIONS)}")
    if len(student_hidden) != len(teacher_hidden):
        raise LossInputError(f"the student exposes {len(student_hidden)} block outputs and the teacher "
                             f"{len(teacher_hidden)}; SquareHead needs the same number of blocks")
    if not student_hidden:
        raise LossInputError("no block outputs to compare; run insert-taps on teacher and student")
    terms = []
    for index, (hs, ht) in enumerate(zip(student_hidden, teacher_hidden)):
        if hs.shape != ht.shape:
            raise LossInputError(f"block {index}: student hidden state {tuple(hs.shape)} and teacher "
                                 f"{tuple(ht.shape)} differ (hidden size or sequence length)")
        real = _token_mask(attention_mask, hs.shape[:2], hs.device)
        if sinks != "none":
            real = real & ~sink_positions(ht, sinks)
        if not real.any():
            raise LossInputError("the attention mask selects no token" if sinks == "none" else
                                 f"the attention mask and sinks={sinks} leave no token")
        s, t = hs[real].float(), ht[real].float()  # [tokens, hidden]
        if normalize == "layer":
            terms.append((s - t).pow(2).mean() / (t.pow(2).mean() + eps))
        else:
            terms.append(((s - t).pow(2).mean(-1) / (t.pow(2).mean(-1) + eps)).mean())
    return torch.stack(terms)


def squarehead(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
               attention_mask: torch.Tensor | None = None, eps: float = SQUAREHEAD_EPS,
               normalize: str = "layer", sinks: str = "none") -> torch.Tensor:
    """SquareHead: the per-layer normalized MSE terms, summed over layers."""
    return squarehead_terms(student_hidden, teacher_hidden, attention_mask, eps, normalize, sinks).sum()


@dataclass(frozen=True)
class LossWeights:
    """``total = ce * CE + kl * KL + squarehead * SquareHead``; the authors' MPT runs used
    ``ce=1, kl=0, squarehead=1, temperature=1``."""

    ce: float = 1.0
    kl: float = 0.0
    squarehead: float = 1.0
    temperature: float = 1.0
    #: ``layer`` (the authors') or ``token``: see the module docstring
    squarehead_normalize: str = "layer"
    #: positions SquareHead leaves out: ``none`` (the authors'), ``first`` or ``norm:K``
    squarehead_sinks: str = "none"

    def __post_init__(self) -> None:
        for name in ("ce", "kl", "squarehead"):
            value = getattr(self, name)
            if not (0.0 <= value < math.inf):
                raise LossInputError(f"loss weight {name} must be a finite number >= 0, got {value}")
        if self.ce == self.kl == self.squarehead == 0:
            raise LossInputError("all loss weights are 0; give ce, kl or squarehead a positive weight")
        if not 0 < self.temperature < math.inf:
            raise LossInputError(f"temperature must be a finite positive number, got {self.temperature}")
        if self.squarehead_normalize not in SQUAREHEAD_NORMALIZATIONS:
            raise LossInputError(f"squarehead_normalize must be {' or '.join(SQUAREHEAD_NORMALIZATIONS)}, "
                                 f"got {self.squarehead_normalize!r}")
        check_sinks(self.squarehead_sinks)

    @property
    def needs_teacher(self) -> bool:
        return self.kl > 0 or self.squarehead > 0


@dataclass
class LossComponents:
    """The total (differentiable) and every weighted-in component, unweighted and detached
    (tensors, so that logging them forces no device synchronisation until it is read)."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def distillation_loss(weights: LossWeights, input_ids: torch.Tensor, student_logits: torch.Tensor,
                      student_hidden: Sequence[torch.Tensor] = (), teacher_logits: torch.Tensor | None = None,
                      teacher_hidden: Sequence[torch.Tensor] = (),
                      attention_mask: torch.Tensor | None = None) -> LossComponents:
    """``a * CE + b * KL + c * SquareHead`` with each nonzero-weighted component reported."""
    total = student_logits.new_zeros((), dtype=torch.float32)
    parts: dict[str, torch.Tensor] = {}
    if weights.ce > 0:
        ce = causal_lm_ce(student_logits, input_ids, attention_mask)
        total = total + weights.ce * ce
        parts["ce"] = ce.detach()
    if weights.kl > 0:
        if teacher_logits is None:
            raise LossInputError("the KL term needs the teacher's logits")
        kl = kl_distillation(student_logits, teacher_logits, attention_mask, weights.temperature)
        total = total + weights.kl * kl
        parts["kl"] = kl.detach()
    if weights.squarehead > 0:
        sq = squarehead(student_hidden, teacher_hidden, attention_mask, normalize=weights.squarehead_normalize,
                        sinks=weights.squarehead_sinks)
        total = total + weights.squarehead * sq
        parts["squarehead"] = sq.detach()
    parts["loss"] = total.detach()
    return LossComponents(total, parts)
