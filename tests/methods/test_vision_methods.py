"""PruMerge, PruMerge+ and VisionZip pieces on hand-made tensors."""

from __future__ import annotations

import torch

from vtrcompile.methods.prumerge import cls_attention, grid_indices, key_neighbour_merge, leftover_token
from vtrcompile.methods.visionzip import contextual_positions, visionzip_features


def test_cls_attention_is_a_softmax_over_all_tokens():
    q = torch.zeros(1, 4, 2)
    k = torch.zeros(1, 4, 2)
    a = cls_attention(q, k)  # equal logits: 1/4 each, CLS column dropped
    assert torch.allclose(a, torch.full((1, 3), 0.25))


def test_key_neighbour_merge_with_few_patches_uses_all_others():
    # N = 4 < 32 neighbours: every other patch joins, weighted by a; the token itself never does.
    x = torch.eye(4)[None]
    k = torch.randn(1, 4, 3)
    a = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    y = key_neighbour_merge(x, k, a, torch.tensor([[2, 0]]))
    assert torch.allclose(y[0, 0], torch.tensor([0.1, 0.2, 1.0, 0.4]))
    assert torch.allclose(y[0, 1], torch.tensor([1.0, 0.2, 0.3, 0.4]))
    e = leftover_token(x, a, torch.tensor([[2, 0]]))
    assert torch.allclose(e[0, 0], torch.tensor([0.0, 0.2, 0.0, 0.4]))


def test_prumerge_plus_grid_for_llava_geometry():
    g = grid_indices(576, 1 / 8)
    assert len(g) == 72 and g[0] == 4 and g[-1] == 572
    assert contextual_positions(523, 10)[0] == list(range(0, 520, 52))


def test_visionzip_by_hand():
    # 6 tokens (CLS + 5), 1 head. The CLS query attends most to token 3 -> dominant = [CLS, 3].
    # Remaining [1, 2, 4, 5], step 2 -> targets [1, 4]; token 2's key is closest to 4, token 5's to 1.
    q = torch.zeros(1, 1, 6, 2)
    q[0, 0, 0] = torch.tensor([5.0, 0.0])
    k_att = torch.zeros(1, 1, 6, 2)
    k_att[0, 0, 3] = torch.tensor([1.0, 0.0])
    keys = torch.tensor([[0, 1], [1, 0], [0.1, 1], [1, 1], [0, 1], [1, 0.1]], dtype=torch.float32)[None]
    h = torch.arange(6.0)[None, :, None].expand(1, 6, 2).clone()
    out = visionzip_features(h, q, k_att, keys, 1.0, dominant=2, contextual=2)
    assert out[0, :, 0].tolist() == [0.0, 3.0, 1.0 + 5.0, 4.0 + 2.0]
