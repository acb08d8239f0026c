"""FastV (pkunlp-icler/FastV): keep the image tokens the last prompt token attends to most at llm@K-1."""

from __future__ import annotations

import torch

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction, SelectorInputs
from .spec import KEEP, MethodSpec, Option, attention_scale, count_option, signal_layer
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


def fastv_selector(keep: int):
    def select(s: SelectorInputs):
        prev = s.previous
        if prev.enable_gqa:
            raise VtrError(f"fastv: {prev.attention_module} uses enable_gqa (keys not expanded); not supported yet")
        return fastv_keep, (prev.q, prev.k, prev.mask, s.image_start), {
            "n_image": s.n_image, "keep": keep, "scale": attention_scale(prev.attention)}
    return select


def plan_fastv(opts: dict, n: int, layers: int) -> list[Reduction]:
    k = signal_layer("fastv", opts["layer"], layers)
    keep = count_option(opts, n, "fastv", round(n * (1 - opts["drop_ratio"])))
    return [Reduction("fastv", k, keep, "keep", fastv_selector(keep), options=dict(opts))]


SPEC = MethodSpec(
    "fastv", "FastV: prune by the last token's attention", "llm@K", "keep",
    "Chen et al. 2024, An Image is Worth 1/2 Tokens After Layer 2 (pkunlp-icler/FastV)",
    (Option("layer", int, 2, "K: layers 0..K-1 see all tokens, the signal is layer K-1's attention"),
     Option("drop_ratio", float, 0.5, "R: keep round(N*(1-R)) image tokens", "[0, 1)"), KEEP),
    plan_fastv)
