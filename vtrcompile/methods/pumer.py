"""PuMer (csarron/PuMer), ported to decoder LLMs: text-informed pruning, then bipartite merging (ToMe)."""

from __future__ import annotations

import torch

from .tensor_ops import suffix_attention_to_image, take_image_block, topk_ascending


def pumer_counts(n_image: int, prune_ratio: float, merge_ratio: float) -> tuple[int, int]:
    """(n_prune, n_merge) at a site with n_image tokens (Python's round: half to even, as PuMer's code)."""
    n_prune = round(prune_ratio * n_image)
    n_merge = min(round(merge_ratio * n_image), (n_image - n_prune) // 2)
    return n_prune, n_merge


def bipartite_merge(keys: torch.Tensor, kept: torch.Tensor, n_merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe bipartite soft matching over the kept tokens, as fixed-size ops.

    keys [B, N, d] (similarity keys of all N image tokens), kept [B, K] (ascending image indices)
    -> survivors [B, K - n_merge] (ascending), mix [B, K - n_merge, N]: each survivor's row weights
    over the N tokens (a merged b-token is the plain mean of itself and the a-tokens merged into it).
    """
    b, k_count = kept.shape
    n = keys.shape[1]
    kn = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    kk = kn.gather(1, kept[..., None].expand(-1, -1, kn.shape[-1]))  # [B, K, d]
    a, bb = kk[:, 0::2], kk[:, 1::2]
    sim = torch.matmul(a, bb.transpose(1, 2))  # [B, Ka, Kb]
    # Best partner per a-token; argmax on float ties to the lower index (ONNX ArgMax too).
    best, partner = sim.max(dim=-1).values, sim.argmax(dim=-1)
    merged_a = torch.topk(best, n_merge, dim=-1).indices  # [B, n_merge] indices into a
    ka = a.shape[1]
    is_merged = (torch.arange(ka, device=kept.device)[None, :, None] == merged_a[:, None, :]).any(dim=-1)
    # Every kept element: its destination as an image index (itself, or its partner b-token).
    a_idx, b_idx = kept[:, 0::2], kept[:, 1::2]
    a_dest = torch.where(is_merged, b_idx.gather(1, partner), a_idx)
    dest = torch.cat([a_dest, b_idx], dim=1)  # [B, K] (order: all a, then all b)
    src = torch.cat([a_idx, b_idx], dim=1)
    # Survivors: unmerged a-tokens and all b-tokens. Merged ones get the sentinel N and fall out of
    # the K - n_merge smallest; the rest are distinct image indices.
    gone = torch.cat([is_merged, torch.zeros_like(b_idx, dtype=torch.bool)], dim=1)
    key = torch.where(gone, torch.full_like(src, n), src)
    survivors = torch.topk(key, k_count - n_merge, dim=-1, largest=False).values
    survivors = torch.sort(survivors, dim=-1).values
    assign = (dest[:, :, None] == survivors[:, None, :]).to(torch.float32)  # [B, K, K']
    onehot = (src[:, :, None] == torch.arange(n, device=kept.device)[None, None, :]).to(torch.float32)
    mix = torch.matmul(assign.transpose(1, 2), onehot)  # [B, K', N]
    mix = mix / assign.sum(dim=1)[..., None]
    return survivors, mix


def pumer_select(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, k_proj: torch.Tensor,
                 image_start: torch.Tensor, n_image: int, n_kv_heads: int, n_prune: int, n_merge: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One PuMer site. q, k [B, H, S, d] (layer l-1's attention inputs), k_proj [B, S, Hk*d] (its key
    projection, before RoPE) -> survivors [B, N - n_prune - n_merge], mix [B, that, N]."""
    scores = suffix_attention_to_image(q, k, mask, image_start, n_image, scale)
    kept = topk_ascending(scores, n_image - n_prune)
    bsz, s, width = k_proj.shape
    keys = k_proj.reshape(bsz, s, n_kv_heads, width // n_kv_heads).float().mean(dim=2)
    return bipartite_merge(take_image_block(keys, image_start, n_image), kept, n_merge)
