"""A per-layer keep schedule (G-Search / P-Sigmoid): at each site keep the top image tokens by suffix-text attention."""

from __future__ import annotations

import torch

from .tensor_ops import suffix_attention_to_image, topk_ascending


def schedule_keep(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, image_start: torch.Tensor,
                  n_image: int, keep: int, scale: float) -> torch.Tensor:
    """q, k [B, H, S, d] (layer l-1's attention inputs) -> kept [B, keep]: the image tokens still present that
    the suffix-text rows attend to most (head-mean, row-mean), ascending, so kept sets nest site to site."""
    return topk_ascending(suffix_attention_to_image(q, k, mask, image_start, n_image, scale), keep)


def schedule_sites(keeps: list[int]) -> list[tuple[int, int]]:
    """keep counts n_0..n_{L-1} -> [(layer, keep)] wherever the count drops."""
    return [(layer, keeps[layer]) for layer in range(1, len(keeps)) if keeps[layer] < keeps[layer - 1]]
