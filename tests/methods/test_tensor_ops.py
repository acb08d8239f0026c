"""Hand-checkable cases for the fixed-size building blocks."""

from __future__ import annotations

import torch

from vtrcompile.methods.tensor_ops import (
    first_image_row,
    gather_seq_dims,
    head_mean_attention_rows,
    merge_image_block,
    renumbered_index,
    sequence_index,
    take_image_block,
    top_members,
    topk_ascending,
    topk_descending,
)


def test_sequence_index_by_hand():
    # S=8: 2 text, image block of N=4 at rows 2..5, 2 text. Keep image tokens 1 and 3.
    idx = sequence_index(torch.tensor([2]), torch.tensor([[1, 3]]), 8, n_image=4)
    assert idx.tolist() == [[0, 1, 3, 5, 6, 7]]


def test_sequence_index_keep_all_is_identity():
    idx = sequence_index(torch.tensor([3]), torch.arange(5)[None], 10, n_image=5)
    assert idx.tolist() == [list(range(10))]


def test_first_image_row_and_block():
    ids = torch.tensor([[4, 4, 9, 9, 9, 1]])
    start = first_image_row(ids, 9)
    assert start.tolist() == [2]
    x = torch.arange(6.0)[None, :, None]
    assert take_image_block(x, start, 3)[0, :, 0].tolist() == [2.0, 3.0, 4.0]


def test_topk_orders():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2]])
    assert topk_ascending(s, 3).tolist() == [[1, 2, 3]]
    assert topk_descending(s, 3).tolist() == [[1, 3, 2]]


def test_merge_image_block_equals_masked_scatter():
    ids = torch.tensor([[1, 7, 7, 7, 2, 3]])
    text = torch.randn(1, 6, 4)
    feats = torch.randn(3, 4)
    mask = (ids == 7)[..., None].expand_as(text)
    want = text.masked_scatter(mask, feats)
    assert torch.equal(merge_image_block(text, ids, feats, 7, 3), want)


def test_gather_seq_dims_mask_rows_and_columns():
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    idx = torch.tensor([[0, 2, 4]])
    got = gather_seq_dims(mask, idx, (2, 3))
    assert got.shape == (1, 1, 3, 3)
    assert torch.equal(got[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())


def test_renumbered_index():
    assert renumbered_index(torch.tensor([[0, 5, 9]])).tolist() == [[0, 1, 2]]


def test_head_mean_attention_rows_uniform_keys():
    q = torch.randn(1, 2, 1, 4)
    k = torch.zeros(1, 2, 5, 4)  # equal logits everywhere -> uniform attention
    out = head_mean_attention_rows(q, k, 0.5, None)
    assert torch.allclose(out, torch.full((1, 1, 5), 0.2))
    masked = head_mean_attention_rows(q, k, 0.5, torch.tensor([True, True, False, False, False])[None, None, None])
    assert torch.allclose(masked, torch.tensor([[[0.5, 0.5, 0.0, 0.0, 0.0]]]))


def test_head_mean_attention_rows_row_with_no_allowed_key_stays_finite():
    """A left-padding query row (batch engines) is masked everywhere: it comes out uniform, not NaN, and the other
    rows are what a -inf mask gives."""
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    allowed = torch.tensor([[False, False, False], [False, True, False], [False, True, True]])[None, None]
    out = head_mean_attention_rows(q, k, 0.5, allowed)
    assert torch.isfinite(out).all() and torch.allclose(out[0, 0], torch.full((3,), 1 / 3))
    logits = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~allowed, float("-inf"))
    assert torch.allclose(out[0, 1:], torch.softmax(logits, -1).mean(1)[0, 1:])


def test_top_members_takes_tied_scores_lowest_index_first():
    # m = 3 over [5, 1, 4, 4, 7, 4]: 7 and 5 are above the 3rd value (4), then one of the three tied 4s: index 2.
    s = torch.tensor([[5.0, 1.0, 4.0, 4.0, 7.0, 4.0]])
    assert top_members(s, 3).nonzero()[:, 1].tolist() == [0, 2, 4]
    # every row tied: the m lowest indices; -inf (the patch itself) is never taken while others remain
    s = torch.tensor([[0.5, float("-inf"), 0.5, 0.5]])
    assert top_members(s, 2)[0].tolist() == [True, False, True, False]


def test_top_members_equals_the_stable_top_k_on_random_rows():
    torch.manual_seed(0)
    s = torch.randn(2, 5, 40).round(decimals=1)  # rounding makes ties common
    got = top_members(s, 7)
    for row, mask in zip(s.reshape(-1, 40), got.reshape(-1, 40), strict=True):
        want = torch.sort(-row, stable=True).indices[:7]
        assert sorted(mask.nonzero()[:, 0].tolist()) == sorted(want.tolist())
