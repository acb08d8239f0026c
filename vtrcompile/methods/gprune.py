"""G-Prune (jytmelon/G-Prune): text-agnostic graph propagation of feature norms over projected tokens."""

from __future__ import annotations

import torch

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction, SelectorInputs
from .spec import KEEP, MethodSpec, Option, count_option
from .tensor_ops import topk_ascending

SIM_THRESHOLD = 0.5
TEMPERATURE = 0.03
ITERATIONS = 5


def gprune_scores(features: torch.Tensor) -> torch.Tensor:
    """features F [B, N, D] (projected image tokens) -> scores s [B, N] float32.

    Fn = F / ||F||; A = Fn Fn^T; A[A < 0.5] = 0; A /= 0.03; A[|A| < 1e-6] = -5000; P = softmax_row(A);
    deg_j = #nonzero in row j of P; s = (w P^5) / deg with w_i = ||F_i||.
    """
    f = features.float()
    w = f.norm(dim=-1)  # [B, N]
    fn = f / w[..., None]
    a = torch.matmul(fn, fn.transpose(1, 2))
    # The two masking steps in one select with a scalar: an entry below the threshold becomes 0, then -5000
    # (|0| < 1e-6), and every kept one is >= 0.5 / 0.03, so the second test never fires on it: the same values
    # bit for bit (NaN included), without two full N x N operands (two selects took 24% of the demo model's
    # reduced prefill in ONNX Runtime).
    a = torch.where(a < SIM_THRESHOLD, -5000.0, a / TEMPERATURE)
    p = torch.softmax(a, dim=-1)
    deg = (p != 0).to(torch.float32).sum(dim=-1)  # [B, N]: counts are exact in float32
    v = w[:, None, :]  # row vector [B, 1, N]
    for _ in range(ITERATIONS):
        v = torch.matmul(v, p)
    return v[:, 0, :] / deg


def gprune_keep(image_features: torch.Tensor, batch: int, n_image: int, keep: int) -> torch.Tensor:
    """image_features [B*N, D] (the projector output) -> kept [B, keep] ascending."""
    feats = image_features.reshape(batch, n_image, image_features.shape[-1])
    return topk_ascending(gprune_scores(feats), keep)


def gprune_split_keep(image_features: torch.Tensor, batch: int, segments: list[int], keeps: list[int]
                      ) -> torch.Tensor:
    """G-Prune on each part of the image block separately (its LLaVA-NeXT code: one graph on the base image's
    tokens, one on the hi-res grid's): image_features [B*N, D], parts of segments[i] rows keeping keeps[i]
    -> kept [B, sum(keeps)] ascending."""
    feats = image_features.reshape(batch, sum(segments), image_features.shape[-1])
    out, offset = [], 0
    for n_i, k_i in zip(segments, keeps, strict=True):
        if k_i:
            out.append(topk_ascending(gprune_scores(feats[:, offset:offset + n_i]), k_i) + offset)
        offset += n_i
    return torch.cat(out, dim=1)


def split_keeps(opts: dict, segments: list[int]) -> list[int]:
    """Tokens kept per part: int(ratio * part) (G-Prune's LLaVA-NeXT code); a --keep K is split in proportion
    to the parts (largest remainder)."""
    n = sum(segments)
    if opts.get("keep") is None:
        return [int(opts["keep_ratio"] * n_i) for n_i in segments]
    k = count_option(opts, n, "gprune", 0)
    share = [k * n_i / n for n_i in segments]
    keeps = [int(x) for x in share]
    for i in sorted(range(len(share)), key=lambda i: keeps[i] - share[i])[:k - sum(keeps)]:
        keeps[i] += 1
    return keeps


def _gprune_selector(keep: int, keeps: list[int] | None):
    def select(s: SelectorInputs):
        if keeps is not None and s.segments is not None:
            return gprune_split_keep, (s.image_features,), {"batch": s.batch, "segments": list(s.segments),
                                                            "keeps": keeps}
        return gprune_keep, (s.image_features,), {"batch": s.batch, "n_image": s.n_image_full, "keep": keep}
    return select


def plan_gprune(opts: dict, n: int, layers: int) -> list[Reduction]:
    segments = opts.get("image_segments")
    keeps = split_keeps(opts, segments) if segments and len(segments) > 1 else None
    if keeps is not None and not 1 <= sum(keeps) <= n:
        raise VtrError(f"gprune: --keep-ratio {opts['keep_ratio']} keeps no token of the parts {segments}")
    keep = sum(keeps) if keeps is not None else count_option(opts, n, "gprune", int(opts["keep_ratio"] * n))
    recorded = {"segments": list(segments), "segment_keeps": keeps} if keeps is not None else {}
    return [Reduction("gprune", 0, keep, "keep", _gprune_selector(keep, keeps), site="projector",
                      options=dict(opts), recorded=recorded)]


SPEC = MethodSpec(
    "gprune", "G-Prune: graph propagation over projected tokens (text-agnostic)", "projector", "keep",
    "Jiang et al. 2025, What Kind of Visual Tokens Do We Need? (jytmelon/G-Prune)",
    (Option("keep_ratio", float, 0.5, "keep int(ratio*N) image tokens", "(0, 1]"), KEEP),
    plan_gprune)
