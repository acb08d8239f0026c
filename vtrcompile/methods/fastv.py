"""FastV (pkunlp-icler/FastV): keep the image tokens the last prompt token attends to most at llm@K-1."""

from __future__ import annotations

import torch

from .tensor_ops import head_mean_attention_rows, take_image_block, topk_ascending


def fastv_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, image_start: torch.Tensor,
                 n_image: int, scale: float) -> torch.Tensor:
    """Attention of the last query row to each image token, head-mean.

    q [B, H, S, d] and k [B, H, S, d]: the exact inputs of layer K-1's attention (after RoPE, GQA
    expanded); mask [B|1, 1, S, S] or None; image_start [B] -> scores [B, N] float32.
    """
    mask_rows = None if mask is None else mask[:, :, -1:, :]
    probs = head_mean_attention_rows(q[:, :, -1:, :], k, scale, mask_rows)  # [B, 1, S]
    return take_image_block(probs.transpose(1, 2), image_start, n_image)[..., 0]


def fastv_keep(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, image_start: torch.Tensor,
               n_image: int, keep: int, scale: float) -> torch.Tensor:
    """-> kept [B, keep] image-relative indices, ascending."""
    return topk_ascending(fastv_scores(q, k, mask, image_start, n_image, scale), keep)
