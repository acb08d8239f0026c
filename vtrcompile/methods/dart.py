"""DART (ZichenWen1/DART): keep pivot tokens and the image tokens least similar to them (duplication-aware)."""

from __future__ import annotations

import torch

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction, SelectorInputs
from .spec import MethodSpec, Option, signal_layer
from .tensor_ops import take_image_block

DEFAULT_PICKS = 128  # M: image tokens picked around the pivots (official max_num_trunction)


def text_pivot_scores(key_norm: torch.Tensor, image_start: torch.Tensor, n_image: int) -> torch.Tensor:
    """key_norm [B, S] -> [B, S] float32 ranking text pivot candidates: suffix rows (after the image block) by
    key norm; when the suffix is shorter than the pivot count the remaining picks are prefix rows, then image
    rows, each in index order (a fixed-size stand-in for "all suffix tokens")."""
    s = key_norm.shape[1]
    j = torch.arange(s, device=key_norm.device)[None, :]
    rel = j - image_start[:, None]
    text_rank = -(1.0 + j).to(torch.float32)
    image_rank = -(s + 1.0 + j).to(torch.float32)
    other = torch.where((rel >= 0) & (rel < n_image), image_rank, text_rank)
    return torch.where(rel >= n_image, key_norm, other)


def dart_keep(k: torch.Tensor, normed: torch.Tensor, image_start: torch.Tensor, n_image: int,
              image_pivots: int, text_pivots: int, per_pivot: int) -> torch.Tensor:
    """k [B, H, S, d]: the keys layer K-1's attention consumed (after RoPE, GQA expanded); normed [B, S, D]:
    layer K-1's output through the final norm -> kept [B, image_pivots + P*per_pivot] image indices, ascending.

    Key norm = L1 over all heads and channels. Pivots: top image_pivots image tokens and top text_pivots
    suffix tokens by key norm. Visiting pivots in ascending position, each takes the per_pivot image tokens
    still in the pool (not pivots, not taken) with the lowest cosine similarity to it.
    """
    key_norm = k.float().abs().sum(dim=(1, 3))  # [B, S]
    img_piv = torch.topk(take_image_block(key_norm[..., None], image_start, n_image)[..., 0], image_pivots,
                         dim=-1).indices  # [B, p_img] image-relative
    txt_piv = torch.topk(text_pivot_scores(key_norm, image_start, n_image), text_pivots, dim=-1).indices
    pivots = torch.sort(torch.cat([image_start[:, None] + img_piv, txt_piv], dim=1), dim=-1).values  # rows
    h = normed.float()
    h = h / h.norm(dim=-1, keepdim=True)
    piv_h = h.gather(1, pivots[..., None].expand(-1, -1, h.shape[-1]))  # [B, P, D]
    cos = torch.matmul(piv_h, take_image_block(h, image_start, n_image).transpose(1, 2))  # [B, P, N]
    ar = torch.arange(n_image, device=k.device)
    taken = (ar[None, None, :] == img_piv[..., None]).any(dim=1)  # [B, N]
    picks = [img_piv]
    for t in range(pivots.shape[1]):
        score = torch.where(taken, torch.full_like(taken, float("-inf"), dtype=torch.float32), -cos[:, t])
        pick = torch.topk(score, per_pivot, dim=-1).indices
        picks.append(pick)
        taken = taken | (ar[None, None, :] == pick[..., None]).any(dim=1)
    return torch.sort(torch.cat(picks, dim=1), dim=-1).values


def dart_counts(opts: dict, n: int) -> tuple[int, int]:
    """-> (per-pivot picks T, tokens kept n = p_img + P*T); --keep n sets M = n - p_img, a multiple of P."""
    p_img, p = opts["image_pivots"], opts["image_pivots"] + opts["text_pivots"]
    m = DEFAULT_PICKS if opts.get("keep") is None else int(opts["keep"]) - p_img
    if m < p or m % p:
        lo = max(1, m // p) * p + p_img
        raise VtrError(f"dart: --keep {m + p_img} needs keep - {p_img} (image pivots) to be a positive multiple of "
                       f"{p} (pivots); the nearest valid counts are {lo} and {lo + p}")
    keep = p_img + m
    if keep > n:
        raise VtrError(f"dart: keeps {keep} image tokens ({p_img} pivots + {m} picks) but {n} reach layer K; "
                       f"give --keep (at most {p_img + (n - p_img) // p * p})")
    return m // p, keep


def _dart_selector(opts: dict, per_pivot: int):
    def select(s: SelectorInputs):
        prev = s.previous
        if prev.enable_gqa:
            raise VtrError(f"dart: {prev.attention_module} uses enable_gqa (keys not expanded); not supported yet")
        return dart_keep, (prev.k, s.final_norm, s.image_start), {
            "n_image": s.n_image, "image_pivots": opts["image_pivots"], "text_pivots": opts["text_pivots"],
            "per_pivot": per_pivot}
    return select


def plan_dart(opts: dict, n: int, layers: int) -> list[Reduction]:
    k = signal_layer("dart", opts["layer"], layers)
    per_pivot, keep = dart_counts(opts, n)
    return [Reduction("dart", k, keep, "keep", _dart_selector(opts, per_pivot), options=dict(opts),
                      needs=("final_norm",))]


SPEC = MethodSpec(
    "dart", "DART: pivots by key norm, then the image tokens least similar to each pivot", "llm@K", "keep",
    "Wen et al. 2025, Stop Looking for Important Tokens in Multimodal Language Models (ZichenWen1/DART)",
    (Option("layer", int, 2, "K: the signal is layer K-1's keys and output"),
     Option("image_pivots", int, 4, "p_img: image pivots, kept", "[1, inf)"),
     Option("text_pivots", int, 4, "p_txt: text pivots (suffix tokens)", "[0, inf)"),
     Option("keep", str, None, f"n = p_img + M image tokens kept (default M = {DEFAULT_PICKS}); M a multiple "
            "of p_img + p_txt")),
    plan_dart)
