"""PuMer's bipartite merge and counts on hand-made tensors whose answers can be worked out by hand."""

from __future__ import annotations

import torch

from vtrcompile.methods.pumer import bipartite_merge, pumer_counts, pumer_schedule, pumer_sites


def _keys(*rows):
    return torch.tensor(rows, dtype=torch.float32)[None]


def _e(*idx, n=6):
    v = torch.zeros(n)
    v[list(idx)] = 1.0 / len(idx)
    return v


def test_one_merge_goes_to_the_most_similar_pair():
    # a = tokens 0, 2, 4; b = tokens 1, 3, 5. Token 0 ~ token 1 (cos 0.995) is the best pair.
    keys = _keys([1, 0], [1, 0.1], [0, 1], [0.3, 1], [1, -1], [-1, 0])
    survivors, mix = bipartite_merge(keys, torch.arange(6)[None], 1)
    assert survivors.tolist() == [[1, 2, 3, 4, 5]]
    assert torch.allclose(mix[0, 0], _e(0, 1))  # b-token 1 = mean of itself and token 0
    for row, tok in zip(mix[0, 1:], [2, 3, 4, 5], strict=True):
        assert torch.equal(row, _e(tok))


def test_two_a_tokens_can_merge_into_one_b_token():
    # Tokens 0 and 4 both match token 1 best, better than token 2 matches token 3.
    keys = _keys([1, 0], [1, 0.1], [0, 1], [0.3, 1], [1, 0.05], [-1, 0])
    survivors, mix = bipartite_merge(keys, torch.arange(6)[None], 2)
    assert survivors.tolist() == [[1, 2, 3, 5]]
    assert torch.allclose(mix[0, 0], _e(0, 1, 4))


def test_merge_only_among_kept_tokens():
    keys = _keys([1, 0], [1, 0.1], [0, 1], [0.3, 1], [1, 0.05], [-1, 0])
    # Token 1 was pruned: a = [0, 3], b = [2, 4]; token 0's best partner is now token 4.
    survivors, mix = bipartite_merge(keys, torch.tensor([[0, 2, 3, 4]]), 1)
    assert survivors.tolist() == [[2, 3, 4]]
    assert torch.allclose(mix[0, 2], _e(0, 4))


def test_counts_and_schedule_follow_the_spec():
    assert pumer_counts(576, 0.1, 0.3) == (58, 173)
    assert pumer_counts(10, 0.1, 0.5) == (1, 4)  # merge capped at kept // 2
    assert pumer_sites(32) == [5, 13, 21]
    assert pumer_sites(12) == [2, 5, 8]
    assert pumer_sites(4) == [1, 2, 3]
    sched = pumer_schedule(576, 12, 0.1, 0.3)
    assert [s[0] for s in sched] == [2, 5, 8] and sched[0][1:] == (576, 58, 173)
    assert sched[1][1] == 576 - 58 - 173
