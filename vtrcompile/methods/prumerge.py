"""LLaVA-PruMerge and PruMerge+ (42Shawn/LLaVA-PruMerge): CLS-attention selection, key-neighbour merging.

All functions work on the vision tower's feature layer, before the projector.
"""

from __future__ import annotations

import torch

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction, SelectorInputs
from .spec import MethodSpec, Option, vision_taps
from .tensor_ops import top_members, topk_descending

NEIGHBOURS = 32


def cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q, k [B, N+1, C] (all heads concatenated, bias included, CLS first) -> a [B, N]:
    softmax(Q K^T C^-0.5) of the CLS row over all N+1 columns, patch columns only."""
    c = q.shape[-1]
    logits = torch.matmul(q[:, :1].float(), k.float().transpose(1, 2)) * c**-0.5
    return torch.softmax(logits, dim=-1)[:, 0, 1:]


def _onehot(idx: torch.Tensor, n: int) -> torch.Tensor:
    """idx [...] int -> [..., n] float32 one-hot, by comparison (no scatter)."""
    return (idx[..., None] == torch.arange(n, device=idx.device)).to(torch.float32)


def key_neighbour_merge(x: torch.Tensor, k: torch.Tensor, a: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """y_i = X_i + sum over i's min(32, N-1) most key-similar other patches j of a_j X_j
    (ties to the lower index, as the reference).

    x [B, N, C] patch features, k [B, N, C] patch keys, a [B, N], kept [B, n] -> [B, n, C].
    """
    b, n_tok, c = x.shape
    kn = k.float() / k.float().norm(dim=-1, keepdim=True)
    sims = torch.matmul(kn.gather(1, kept[..., None].expand(-1, -1, kn.shape[-1])), kn.transpose(1, 2))
    sims = torch.where(kept[..., None] == torch.arange(n_tok, device=x.device), float("-inf"), sims)
    nb = top_members(sims, min(NEIGHBOURS, n_tok - 1))  # [B, n, N]
    weights = torch.where(nb, a[:, None, :], 0.0)
    own = x.gather(1, kept[..., None].expand(-1, -1, c))
    return own + torch.matmul(weights.to(x.dtype), x)


def leftover_token(x: torch.Tensor, a: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """e = sum over patches in no kept list of a_j X_j: x [B, N, C], a [B, N], kept [B, n] -> [B, 1, C]."""
    taken = _onehot(kept, x.shape[1]).amax(dim=1)  # [B, N]
    return torch.matmul((a * (1 - taken))[:, None, :].to(x.dtype), x)


def prumerge_features(patches: torch.Tensor, q_next: torch.Tensor, k_next: torch.Tensor, keep: int) -> torch.Tensor:
    """PruMerge, fixed count: patches [B, N, C]; q_next, k_next [B, N+1, C] -> [B, keep + 1, C]
    (kept tokens in descending order of a, then the leftover token)."""
    a = cls_attention(q_next, k_next)
    kept = topk_descending(a, keep)
    y = key_neighbour_merge(patches, k_next[:, 1:], a, kept)
    return torch.cat([y, leftover_token(patches, a, kept)], dim=1)


def grid_indices(n_tok: int, ratio: float) -> list[int]:
    step = int(1 / ratio)
    return list(range(step // 2, n_tok - 1, step))


def prumerge_plus_features(patches: torch.Tensor, q_next: torch.Tensor, k_next: torch.Tensor,
                           ratio: float) -> torch.Tensor:
    """PruMerge+ (official fixed path): top int(N*ratio) by a (descending), then the grid samples,
    no de-duplication -> [B, n_top + n_grid + 1, C]."""
    b, n_tok, _ = patches.shape
    a = cls_attention(q_next, k_next)
    top = topk_descending(a, int(n_tok * ratio))
    grid = torch.tensor(grid_indices(n_tok, ratio), device=patches.device)[None].expand(b, -1)
    kept = torch.cat([top, grid], dim=1)
    y = key_neighbour_merge(patches, k_next[:, 1:], a, kept)
    return torch.cat([y, leftover_token(patches, a, kept)], dim=1)


def iqr_outlier_count(a: torch.Tensor) -> int:
    """#{a_j > Q3 + 1.5 (Q3 - Q1)} with numpy's linear percentiles: the official adaptive count."""
    import numpy as np

    x = a.detach().double().cpu().numpy()
    q1, q3 = np.percentile(x, [25, 75])
    return int((x > q3 + 1.5 * (q3 - q1)).sum())


def plan_prumerge(opts: dict, n: int, layers: int) -> list[Reduction]:
    keep = opts["keep"]
    if not 1 <= keep <= n - 1:
        raise VtrError(f"prumerge: --keep {keep} is outside 1..{n - 1} (the model has {n} image tokens)")

    def select(s: SelectorInputs):
        t = vision_taps(s, "prumerge", True)
        return prumerge_features, (t.patches, t.next_q_proj, t.next_k_proj), {"keep": keep}

    return [Reduction("prumerge", 0, keep + 1, "renumber", select, site="vision", options=dict(opts))]


SPEC = MethodSpec(
    "prumerge", "LLaVA-PruMerge: CLS-attention selection + key-neighbour merge (fixed count)", "vision",
    "renumber", "Shang et al. 2024, LLaVA-PruMerge (42Shawn/LLaVA-PruMerge)",
    (Option("keep", str, 32, "n: tokens kept before the extra leftover token (n+1 in all); "
            "'auto' with --calibration: median IQR outlier count"),),
    plan_prumerge)
