"""DivPrune (vbdi/divprune): a max-min diversity subset of the projected image tokens (text-agnostic)."""

from __future__ import annotations

import torch

from ..passes.insert_token_reduction import Reduction, SelectorInputs
from .spec import KEEP, MethodSpec, Option, count_option


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """F [B, N, D] -> Dist = 1 - Fn Fn^T [B, N, N] float32, Fn = rows of F over their L2 norm."""
    f = features.float()
    fn = f / f.norm(dim=-1, keepdim=True)
    return 1.0 - torch.matmul(fn, fn.transpose(1, 2))


def _row(dist: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """dist [B, N, N], index [B] -> dist[b, index[b], :] [B, N] (a gather, no data-dependent shape)."""
    return dist.gather(1, index[:, None, None].expand(-1, 1, dist.shape[2]))[:, 0, :]


def divprune_keep(image_features: torch.Tensor, batch: int, n_image: int, keep: int) -> torch.Tensor:
    """image_features [B*N, D] -> kept [B, keep] ascending.

    s_0 = argmax_j min_{i != j} Dist[i, j]; m = Dist[s_0]; then keep-1 times: s = argmax of m over the tokens
    not chosen yet, m = min(m, Dist[s]). Ties go to the lower index (argmax returns the first maximum).

    Unrolled as three ops per step (argmax, gather a row, minimum) on a copy of Dist whose diagonal is -inf:
    min(m, row s) then sets m[s] = -inf, so a chosen token can never win again and no separate "taken" mask is
    needed; the other entries, and so every argmax, are exactly those of the plain loop.
    """
    dist = cosine_distance(image_features.reshape(batch, n_image, image_features.shape[-1]))
    ar = torch.arange(n_image, device=dist.device)
    eye = ar[:, None] == ar[None, :]
    first = torch.where(eye, torch.full_like(dist, float("inf")), dist).amin(dim=1).argmax(dim=-1)  # [B]
    closed = torch.where(eye, torch.full_like(dist, float("-inf")), dist)  # Dist with -inf on the diagonal
    chosen = [first]
    m = _row(closed, first)
    for _ in range(keep - 1):
        s = m.argmax(dim=-1)
        chosen.append(s)
        m = torch.minimum(m, _row(closed, s))
    return torch.sort(torch.stack(chosen, dim=1), dim=-1).values


def _divprune_selector(keep: int):
    def select(s: SelectorInputs):
        return divprune_keep, (s.image_features,), {"batch": s.batch, "n_image": s.n_image_full, "keep": keep}
    return select


def plan_divprune(opts: dict, n: int, layers: int) -> list[Reduction]:
    keep = count_option(opts, n, "divprune", int(round(opts["keep_ratio"] * n)))
    return [Reduction("divprune", 0, keep, "renumber", _divprune_selector(keep), site="projector",
                      options=dict(opts))]


SPEC = MethodSpec(
    "divprune", "DivPrune: max-min diversity subset of the projected tokens (text-agnostic)", "projector",
    "renumber", "Alvar et al. 2025, DivPrune: Diversity-based Visual Token Pruning (vbdi/divprune)",
    (Option("keep_ratio", float, 0.098, "keep int(round(ratio*N)) image tokens", "(0, 1]"), KEEP),
    plan_divprune)
