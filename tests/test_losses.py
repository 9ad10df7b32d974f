"""The fine-tuning losses against hand-computed values and float64 references, padding included."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsec.finetune.losses import (
    SQUAREHEAD_EPS,
    LossInputError,
    LossWeights,
    causal_lm_ce,
    distillation_loss,
    kl_distillation,
    squarehead,
    squarehead_terms,
)


def test_squarehead_by_hand():
    # One layer, batch 1, two tokens, hidden 2: student [[1, 2], [3, 4]], teacher [[1, 0], [1, 2]].
    hs = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    ht = torch.tensor([[[1.0, 0.0], [1.0, 2.0]]])
    # squared errors 0, 4, 4, 4 -> mean 3; teacher squares 1, 0, 1, 4 -> mean 1.5
    expected = 3.0 / (1.5 + SQUAREHEAD_EPS)
    assert squarehead([hs], [ht]).item() == pytest.approx(expected, rel=1e-6)


def test_squarehead_sums_layers_and_skips_padding():
    # Layer 1 as above; layer 2 doubles the student error. The padded third token holds huge
    # values that would dominate if it were counted.
    hs1 = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])
    ht1 = torch.tensor([[[1.0, 0.0], [1.0, 2.0], [-50.0, 70.0]]])
    hs2 = torch.tensor([[[1.0, 4.0], [5.0, 6.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # layer 2 errors: 0, 16, 16, 16 -> mean 12; teacher mean square 1.5
    terms = squarehead_terms([hs1, hs2], [ht1, ht1], mask)
    assert terms.tolist() == pytest.approx([3.0 / 1.5, 12.0 / 1.5], rel=1e-5)
    assert squarehead([hs1, hs2], [ht1, ht1], mask).item() == pytest.approx(2.0 + 8.0, rel=1e-5)


def test_squarehead_per_token_normalization_by_hand():
    # Same tokens as above plus a padded one: token 1 errors 0, 4 over teacher energy (1 + 0) / 2;
    # token 2 errors 4, 4 over (1 + 4) / 2. Per token: 2 / 0.5 = 4 and 4 / 2.5 = 1.6; mean 2.8.
    hs = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])
    ht = torch.tensor([[[1.0, 0.0], [1.0, 2.0], [-50.0, 70.0]]])
    mask = torch.tensor([[1, 1, 0]])
    got = squarehead([hs], [ht], mask, normalize="token").item()
    assert got == pytest.approx((2.0 / 0.5 + 4.0 / 2.5) / 2, rel=1e-5)
    # one huge-energy token (an attention sink) no longer sets the scale of the others' errors
    sink = torch.tensor([[[1000.0, 0.0], [1.0, 2.0]]])
    student = sink + torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    per_layer = squarehead([student], [sink]).item()
    per_token = squarehead([student], [sink], normalize="token").item()
    assert per_layer == pytest.approx(0.5 / ((1e6 + 5) / 4 + SQUAREHEAD_EPS), rel=1e-5)
    assert per_token == pytest.approx((0.0 + 1.0 / 2.5) / 2, rel=1e-5)
    with pytest.raises(LossInputError, match="unknown SquareHead normalization 'row'"):
        squarehead([hs], [ht], normalize="row")
    with pytest.raises(LossInputError, match="squarehead_normalize must be layer or token"):
        LossWeights(squarehead_normalize="row")


def test_squarehead_matches_float64_reference_with_padding():
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(3, 7, 16, generator=g) for _ in range(4)]
    ht = [torch.randn(3, 7, 16, generator=g) * (i + 1) for i in range(4)]
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    ref = 0.0
    for s, t in zip(hs, ht):
        keep = mask.bool()
        s64, t64 = s.double()[keep], t.double()[keep]
        ref += ((s64 - t64) ** 2).mean().item() / ((t64 ** 2).mean().item() + SQUAREHEAD_EPS)
    assert squarehead(hs, ht, mask).item() == pytest.approx(ref, rel=1e-5)


def test_kl_by_hand_two_tokens():
    # Vocabulary of 2. Token 1: student logits (0, 0) -> q = (1/2, 1/2); teacher (log 3, 0) -> p = (3/4, 1/4).
    # KL(p || q) = 3/4 log(3/2) + 1/4 log(1/2). Token 2: identical logits -> 0. Mean over 2 tokens.
    s = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    t = torch.tensor([[[math.log(3.0), 0.0], [1.0, 2.0]]])
    kl1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kl_distillation(s, t).item() == pytest.approx(kl1 / 2, rel=1e-5)
    # Padding the second token leaves only the first.
    assert kl_distillation(s, t, torch.tensor([[1, 0]])).item() == pytest.approx(kl1, rel=1e-5)


def test_kl_temperature_convention_matches_authors_formula():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 5, 11, generator=g)
    t = torch.randn(2, 5, 11, generator=g) * 2
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    temp = 2.5
    keep = mask.bool()
    p = F.softmax(t.double()[keep] / temp, -1)
    log_q = F.log_softmax(s.double()[keep] / temp, -1)
    ref = (p * (p.log() - log_q)).sum() * temp ** 2 / keep.sum()
    assert kl_distillation(s, t, mask, temperature=temp).item() == pytest.approx(ref.item(), rel=1e-5)
    assert kl_distillation(t, t, mask, temperature=temp).item() == pytest.approx(0.0, abs=1e-6)


def test_ce_by_hand_and_padding():
    # Vocabulary 3, sequence [0, 2, 1, pad]: predictions at positions 0 and 1 count; position 2
    # predicts a padded token and is skipped unless no mask is given.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 5.0, 0.0], [9.0, 9.0, 9.0]]])
    ids = torch.tensor([[0, 2, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    ce_pos0 = math.log(3.0)  # uniform, target 2
    ce_pos1 = -math.log(1.0 / (math.exp(2.0) + 2.0))  # target 1 with logit 0
    assert causal_lm_ce(logits, ids, mask).item() == pytest.approx((ce_pos0 + ce_pos1) / 2, rel=1e-5)
    ce_pos2 = -math.log(1.0 / (2.0 + math.exp(5.0)))  # logits (0, 5, 0), target 0
    assert causal_lm_ce(logits, ids).item() == pytest.approx((ce_pos0 + ce_pos1 + ce_pos2) / 3, rel=1e-5)


def test_total_is_weighted_sum_and_components_are_reported():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 13, (2, 6), generator=g)
    s_logits = torch.randn(2, 6, 13, generator=g, requires_grad=True)
    t_logits = torch.randn(2, 6, 13, generator=g)
    s_h = [torch.randn(2, 6, 4, generator=g, requires_grad=True) for _ in range(3)]
    t_h = [torch.randn(2, 6, 4, generator=g) for _ in range(3)]
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    w = LossWeights(ce=0.5, kl=2.0, squarehead=3.0, temperature=1.5)
    out = distillation_loss(w, ids, s_logits, s_h, t_logits, t_h, mask)
    ce = causal_lm_ce(s_logits, ids, mask).item()
    kl = kl_distillation(s_logits, t_logits, mask, 1.5).item()
    sq = squarehead(s_h, t_h, mask).item()
    assert out.parts["ce"].item() == pytest.approx(ce)
    assert out.parts["kl"].item() == pytest.approx(kl)
    assert out.parts["squarehead"].item() == pytest.approx(sq)
    assert out.total.item() == pytest.approx(0.5 * ce + 2.0 * kl + 3.0 * sq, rel=1e-6)
    out.total.backward()
    assert s_logits.grad is not None and s_h[0].grad is not None
    ce_only = distillation_loss(LossWeights(ce=1.0, kl=0.0, squarehead=0.0), ids, s_logits)
    assert set(ce_only.parts) == {"ce", "loss"}


def test_bad_inputs_are_refused():
    h = [torch.randn(1, 3, 4)]
    with pytest.raises(LossInputError, match="same number of blocks"):
        squarehead(h * 2, h)
    with pytest.raises(LossInputError, match="hidden size"):
        squarehead([torch.randn(1, 3, 5)], h)
    with pytest.raises(LossInputError, match="selects no token"):
        squarehead(h, h, torch.zeros(1, 3))
    with pytest.raises(LossInputError, match="vocabulary"):
        kl_distillation(torch.randn(1, 3, 5), torch.randn(1, 3, 6))
    with pytest.raises(LossInputError, match="all loss weights are 0"):
        LossWeights(ce=0, kl=0, squarehead=0)
    with pytest.raises(LossInputError, match="temperature"):
        LossWeights(temperature=0)


def test_sink_exclusion_changes_which_positions_count():
    # Teacher: token 0 is a massive-activation sink (norm 1000), tokens 1-3 are ordinary.
    g = torch.Generator().manual_seed(4)
    ht = torch.randn(2, 4, 8, generator=g)
    ht[:, 0, 0] = 1000.0
    hs = ht + 0.1 * torch.randn(2, 4, 8, generator=g)
    hs[:, 0, 0] += 50.0  # a large error on the sink alone
    rest_s, rest_t = hs[:, 1:].double(), ht[:, 1:].double()
    expected = ((rest_s - rest_t) ** 2).mean() / ((rest_t ** 2).mean() + SQUAREHEAD_EPS)
    for rule in ("first", "norm:20"):
        got = squarehead([hs], [ht], sinks=rule)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5), rule
    # kept in, the sink sets the normalizer: the ordinary tokens' error all but vanishes
    whole = squarehead([hs], [ht])
    assert whole.item() != pytest.approx(expected.item(), rel=0.1)
    # per-token normalization without sinks counts the sink as one token among four
    per_token = squarehead([hs], [ht], normalize="token", sinks="first")
    by_token = ((rest_s - rest_t) ** 2).mean(-1) / ((rest_t ** 2).mean(-1) + SQUAREHEAD_EPS)
    assert per_token.item() == pytest.approx(by_token.mean().item(), rel=1e-5)


def test_sink_rule_that_leaves_no_token_or_is_malformed_is_refused():
    ht = torch.ones(1, 1, 4)
    with pytest.raises(LossInputError, match="leave no token"):
        squarehead([ht], [ht], sinks="first")
    for bad in ("last", "norm:1", "norm:x", "norm:inf"):
        with pytest.raises(LossInputError, match="unknown sinks rule"):
            squarehead([ht], [ht], sinks=bad)
    with pytest.raises(LossInputError, match="unknown sinks rule"):
        LossWeights(squarehead_sinks="norm:0")
