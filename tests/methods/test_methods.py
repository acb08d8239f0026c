"""FastV and G-Prune tensor functions against hand-worked cases and the eager references."""

from __future__ import annotations

import torch

from vtrcompile.methods.fastv import fastv_keep, fastv_scores
from vtrcompile.methods.gprune import gprune_keep, gprune_scores
from vtrcompile.reference.methods import gprune_reference_scores


def test_fastv_picks_the_keys_the_last_query_matches():
    # One head, S=6, image rows 1..4. The last query aligns with keys 2 and 4.
    q = torch.zeros(1, 1, 6, 2)
    q[0, 0, -1] = torch.tensor([10.0, 0.0])
    k = torch.zeros(1, 1, 6, 2)
    k[0, 0, 2] = torch.tensor([1.0, 0.0])
    k[0, 0, 4] = torch.tensor([0.9, 0.0])
    start = torch.tensor([1])
    s = fastv_scores(q, k, None, start, n_image=4, scale=1.0)
    assert s.shape == (1, 4)
    assert fastv_keep(q, k, None, start, 4, 2, 1.0).tolist() == [[1, 3]]  # rows 2 and 4, image-relative


def test_gprune_scores_match_reference_formula():
    torch.manual_seed(0)
    f = torch.randn(1, 30, 16)
    f[0, :10] += 3.0  # a cluster of similar tokens, so the threshold keeps some edges
    assert torch.allclose(gprune_scores(f)[0], gprune_reference_scores(f[0]), rtol=1e-5, atol=1e-6)


def test_gprune_scores_equal_the_spec_steps_bit_for_bit():
    """The selector folds the spec's two masking steps into one select: the scores must not change at all."""
    def spec_steps(features):
        f = features.float()
        w = f.norm(dim=-1)
        a = (f / w[..., None]) @ (f / w[..., None]).transpose(1, 2)
        a = a.clone()
        a[a < 0.5] = 0
        a = a / 0.03
        a[a.abs() < 1e-6] = -5000
        p = torch.softmax(a, dim=-1)
        v = w[:, None, :]
        for _ in range(5):
            v = v @ p
        return v[:, 0, :] / (p != 0).sum(dim=-1).to(torch.float32)

    for seed in range(6):
        torch.manual_seed(seed)
        f = torch.randn(1, 200, 32) + (2.0 * torch.randn(1, 1, 32) if seed % 2 else 0.0)
        f[0, 3] = 1.5 * f[0, 9]  # a duplicated direction
        assert torch.equal(gprune_scores(f), spec_steps(f))


def test_gprune_isolated_tokens_score_by_norm():
    # Orthogonal features: no edges above 0.5 except self, so P = I, deg = 1 and s = ||F_i||.
    f = torch.eye(4)[None] * torch.tensor([1.0, 3.0, 2.0, 0.5])[None, :, None]
    assert torch.allclose(gprune_scores(f)[0], torch.tensor([1.0, 3.0, 2.0, 0.5]))
    assert gprune_keep(f.reshape(4, 4), batch=1, n_image=4, keep=2).tolist() == [[1, 2]]
