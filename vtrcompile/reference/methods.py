"""Eager references of FastV and G-Prune, written from shared/specs/methods.md (batch 1)."""

from __future__ import annotations

import torch

from .llava import (
    embed_prompt,
    image_features,
    image_start,
    last_row_attention,
    next_token_logits,
    run_layers,
    top_rows_ascending,
)


def _kept_rows(s: int, start: int, n: int, kept: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.arange(start), start + kept, torch.arange(start + n, s)])


@torch.no_grad()
def fastv_reference(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, layer: int, keep: int
                    ) -> torch.Tensor:
    """FastV at llm@K: score = head-mean attention of the last token at layer K-1; positions kept."""
    n_layers = len(model.model.language_model.layers)
    feats = image_features(model, pixel_values)
    h = embed_prompt(model, input_ids, feats)
    s, n, start = h.shape[1], feats.shape[1], image_start(model, input_ids)
    pos = torch.arange(s)
    h = run_layers(model, h, pos, range(layer - 1))
    scores = last_row_attention(model, layer - 1, h, pos)[0, start:start + n]
    h = run_layers(model, h, pos, range(layer - 1, layer))
    rows = _kept_rows(s, start, n, top_rows_ascending(scores, keep))
    h = run_layers(model, h[:, rows], rows, range(layer, n_layers))
    return next_token_logits(model, h)


def gprune_reference_scores(f: torch.Tensor) -> torch.Tensor:
    """f [N, D] -> s [N], the spec's formula line by line."""
    f = f.float()
    fn = f / f.norm(dim=1, keepdim=True)
    a = fn @ fn.T
    a[a < 0.5] = 0
    a = a / 0.03
    a[a.abs() < 1e-6] = -5000
    p = torch.softmax(a, dim=1)
    deg = torch.count_nonzero(p, dim=1).float()
    w = f.norm(dim=1)
    return (w @ torch.linalg.matrix_power(p, 5)) / deg


@torch.no_grad()
def gprune_reference(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, keep: int) -> torch.Tensor:
    """G-Prune at the projector: keep top-`keep` projected tokens by s, ascending, positions kept."""
    n_layers = len(model.model.language_model.layers)
    feats = image_features(model, pixel_values)
    h = embed_prompt(model, input_ids, feats)
    s, n, start = h.shape[1], feats.shape[1], image_start(model, input_ids)
    kept = top_rows_ascending(gprune_reference_scores(feats[0]), keep)
    rows = _kept_rows(s, start, n, kept)
    return next_token_logits(model, run_layers(model, h[:, rows], rows, range(n_layers)))
