"""Mask helpers: exact counts, N:M groups, row-wise comparison groups, block masks."""

from __future__ import annotations

import pytest
import torch

from sparsec.passes.masks import (
    LayerSelectionError,
    block_keep_mask,
    check_nm,
    group_prune_counts,
    nm_keep_mask,
    parse_block,
    prune_count,
    rowwise_keep_mask,
    topk_keep_mask,
)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.6, 0.7, 0.95])
@pytest.mark.parametrize("groups,size", [(7, 13), (64, 64), (1, 5), (33, 128)])
def test_group_counts_sum_to_layer_count(sparsity, groups, size):
    counts = group_prune_counts(sparsity, groups, size)
    assert int(counts.sum()) == prune_count(sparsity, groups * size)
    assert int(counts.max() - counts.min()) <= 1
    assert (counts >= 0).all() and (counts <= size).all()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_rowwise_mask_compares_within_rows(sparsity):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(37, 50, generator=g).abs()
    keep = rowwise_keep_mask(scores, sparsity)
    assert int((~keep).sum()) == prune_count(sparsity, scores.numel())
    for r in range(scores.shape[0]):
        kept, pruned = scores[r][keep[r]], scores[r][~keep[r]]
        if len(kept) and len(pruned):
            assert pruned.max() <= kept.min()


def test_rowwise_mask_breaks_ties_by_index():
    scores = torch.ones(4, 8)  # all tied: quantized weights repeat values
    keep = rowwise_keep_mask(scores, 0.5)
    assert int((~keep).sum()) == 16
    assert (~keep[:, :4]).all() and keep[:, 4:].all()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8), (1, 2), (4, 4)])
def test_nm_mask_group_by_group(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    scores = torch.randn(9, 4 * m, generator=g).abs()
    keep = nm_keep_mask(scores, n, m)
    for r in range(scores.shape[0]):
        for c0 in range(0, scores.shape[1], m):
            group, kg = scores[r, c0:c0 + m], keep[r, c0:c0 + m]
            assert int(kg.sum()) == n
            if n < m:
                assert group[~kg].max() <= group[kg].min()


def test_nm_mask_exact_with_ties():
    keep = nm_keep_mask(torch.zeros(3, 16), 2, 4)
    assert (keep.reshape(3, 4, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("n,m,msg", [(3, 2, "n=3 > m=2"), (0, 4, "at least 1"), (1, 0, "positive")])
def test_check_nm_errors(n, m, msg):
    with pytest.raises(LayerSelectionError, match=msg):
        check_nm(n, m)


def test_nm_mask_refuses_indivisible_columns():
    with pytest.raises(LayerSelectionError, match="not divisible by m=4"):
        nm_keep_mask(torch.rand(2, 10), 2, 4)


@pytest.mark.parametrize("block", [(1, 16), (4, 4), (2, 8), (3, 5)])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_block_mask_exact_blocks_lowest_norm(block, norm):
    g = torch.Generator().manual_seed(7)
    br, bc = block
    w = torch.randn(12 * br, 6 * bc, generator=g)
    keep = block_keep_mask(w, 0.6, block, norm)
    tiles = keep.reshape(12, br, 6, bc).permute(0, 2, 1, 3).reshape(12 * 6, br * bc)
    # every block is all kept or all pruned, and exactly round(0.6 * blocks) are pruned
    assert ((tiles.all(1)) | (~tiles).all(1)).all()
    pruned = ~tiles.all(1)
    assert int(pruned.sum()) == prune_count(0.6, 72)
    wt = w.reshape(12, br, 6, bc).permute(0, 2, 1, 3).reshape(72, br * bc).double()
    score = wt.abs().sum(1) if norm == "l1" else wt.pow(2).sum(1).sqrt()
    assert score[pruned].max() <= score[~pruned].min()


def test_block_mask_edge_blocks():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(10, 21, generator=g)  # 1x16 blocks: a full block and a 5-wide edge block per row
    keep = block_keep_mask(w, 0.5, (1, 16))
    assert int((~keep[:, :16].all(1) & keep[:, :16].any(1)).sum()) == 0  # full blocks are whole
    pruned_blocks = int((~keep[:, :16].any(1)).sum()) + int((~keep[:, 16:].any(1)).sum())
    assert pruned_blocks == prune_count(0.5, 20)


@pytest.mark.parametrize("text", ["1x0", "4", "ax4", "1x2x3", "-1x4"])
def test_parse_block_errors(text):
    with pytest.raises(LayerSelectionError, match="ROWSxCOLS"):
        parse_block(text)


def test_topk_keep_mask_exact_under_ties():
    scores = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0])
    keep = topk_keep_mask(scores, 0.5)
    assert int((~keep).sum()) == 4
    assert keep[-2:].all() and (~keep[:3]).all()


def _sorted_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The definition: prune the round(sparsity * numel) first entries of a stable ascending sort."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores.reshape(-1).float(), stable=True)[:prune_count(sparsity, scores.numel())]] = False
    return keep.reshape(scores.shape)


@pytest.mark.parametrize("kind", ["normal", "abs", "few_levels", "signed_zeros", "nan_inf"])
def test_topk_keep_mask_is_the_stable_sort_mask(kind):
    # topk_keep_mask selects by a partition, not a sort: the same mask on random shapes,
    # sparsities and ties (repeated levels, +0/-0, NaN and inf scores)
    gen = torch.Generator().manual_seed(sum(map(ord, kind)))
    for trial in range(200):
        shape = tuple(int(v) for v in torch.randint(1, 40, (2,), generator=gen))
        s = torch.randn(shape, generator=gen)
        if kind == "abs":
            s = s.abs()
        elif kind == "few_levels":
            s = torch.randint(0, 4, shape, generator=gen).float()
        elif kind == "signed_zeros":
            s = torch.where(s > 0, torch.zeros_like(s), -torch.zeros_like(s))
        elif kind == "nan_inf":
            s[torch.rand(shape, generator=gen) < 0.2] = float("nan")
            s[torch.rand(shape, generator=gen) < 0.1] = float("inf")
        sparsity = [0.0, 0.5, 0.99][trial] if trial < 3 else float(torch.rand(1, generator=gen))
        assert torch.equal(topk_keep_mask(s, sparsity), _sorted_keep_mask(s, sparsity)), (shape, sparsity)
