"""Eager references of the baselines and newer methods (random, pool, DivPrune, DART) and of stacked
reductions, written from docs/methods.md with plain loops (batch 1). Projector stages are functions
feats [N, D] -> (block [n, D], positions policy, kept image indices); LLM sites are `reduce` callables; both
compose with `run_stages` (reference/methods.py)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .blocks import language_model, renumbered, roped_qk, top_rows_ascending
from .methods import kept_rows

# ---- projector stages ---------------------------------------------------------------------------------

def random_stage(n_image: int, ratio: float = 0.5, seed: int = 0, keep: int | None = None):
    n = keep if keep is not None else max(1, int(n_image * ratio))
    kept = torch.tensor(sorted(np.random.Generator(np.random.PCG64(seed)).permutation(n_image)[:n].tolist()))
    return lambda f: (f[kept], "renumber", kept)


def pool_stage(factor: int = 3, side: int | None = None, out: tuple[int, int] | None = None):
    def stage(f):
        n = f.shape[0]
        h = max(d for d in range(1, int(math.sqrt(n)) + 1) if n % d == 0)
        w = n // h
        a_out, b_out = out or ((side, side) if side is not None else (math.ceil(h / factor), math.ceil(w / factor)))
        grid = f.float().reshape(h, w, -1)
        rows = []
        for a in range(a_out):
            for b in range(b_out):
                r0, r1 = math.floor(a * h / a_out), math.ceil((a + 1) * h / a_out)
                c0, c1 = math.floor(b * w / b_out), math.ceil((b + 1) * w / b_out)
                rows.append(grid[r0:r1, c0:c1].mean(dim=(0, 1)))
        return torch.stack(rows).to(f.dtype), "renumber", torch.arange(len(rows))
    return stage


def divprune_subset(f: torch.Tensor, k: int) -> list[int]:
    """The spec's greedy max-min selection, one token at a time, in the order chosen."""
    fn = f.float() / f.float().norm(dim=1, keepdim=True)
    dist = 1 - fn @ fn.T
    n = dist.shape[0]
    col_min = [min(float(dist[i, j]) for i in range(n) if i != j) for j in range(n)]
    chosen = [max(range(n), key=lambda j: (col_min[j], -j))]  # first maximum
    m = dist[chosen[0]].clone()
    for _ in range(k - 1):
        best = max((j for j in range(n) if j not in chosen), key=lambda j: (float(m[j]), -j))
        chosen.append(best)
        m = torch.minimum(m, dist[best])
    return chosen


def divprune_stage(keep: int):
    def stage(f):
        kept = torch.tensor(sorted(divprune_subset(f, keep)))
        return f[kept], "renumber", kept
    return stage


def gprune_stage(keep: int, segments: list[int] | None = None, keeps: list[int] | None = None):
    """G-Prune at the projector: top `keep` by its score; where the block has parts (LLaVA-NeXT's base and hi-res
    patches: `segments` rows keeping `keeps`), one graph per part, as its official LLaVA-NeXT code."""
    from .methods import gprune_reference_scores

    def stage(f):
        if not segments:
            kept = top_rows_ascending(gprune_reference_scores(f), keep)
        else:
            picked, offset = [], 0
            for n_i, k_i in zip(segments, keeps or [], strict=True):
                picked.append(offset + top_rows_ascending(gprune_reference_scores(f[offset:offset + n_i]), k_i))
                offset += n_i
            kept = torch.cat(picked)
        return f[kept], "keep", kept
    return stage


# ---- LLM sites ------------------------------------------------------------------------------------------

def random_site(keep: int, seed: int = 0):
    def reduce(layer, h_prev, h, pos, start, n):
        kept = sorted(np.random.Generator(np.random.PCG64(seed)).permutation(n)[:keep].tolist())
        rows = kept_rows(h.shape[1], start, n, torch.as_tensor(kept, dtype=torch.long))
        return h[:, rows], renumbered(pos, rows), keep
    return reduce


def dart_site(model, image_pivots: int = 4, text_pivots: int = 4, keep: int = 132):
    """DART at llm@K: pivots by the L1 key norm of layer K-1, picks by cosine of the final-normed output."""
    per = (keep - image_pivots) // (image_pivots + text_pivots)

    def reduce(layer, h_prev, h, pos, start, n):
        s = h.shape[1]
        _, k = roped_qk(model, layer - 1, h_prev, pos)
        key_norm = k[0].float().abs().sum(dim=(0, 2))  # [S]
        img = sorted(range(n), key=lambda j: (-float(key_norm[start + j]), j))[:image_pivots]
        suffix = sorted(range(start + n, s), key=lambda r: (-float(key_norm[r]), r))
        fallback = list(range(start)) + list(range(start, start + n))
        txt = (suffix + fallback)[:text_pivots]
        hn = language_model(model).norm(h)[0].float()
        hn = hn / hn.norm(dim=-1, keepdim=True)
        pool = [j for j in range(n) if j not in img]
        picks = []
        for pivot in sorted([start + j for j in img] + txt):
            sims = {j: float(hn[pivot] @ hn[start + j]) for j in pool}
            take = sorted(pool, key=lambda j: (sims[j], j))[:per]
            picks += take
            pool = [j for j in pool if j not in take]
        kept = sorted(img + picks)
        rows = kept_rows(s, start, n, torch.as_tensor(kept, dtype=torch.long))
        return h[:, rows], pos[..., rows], len(kept)
    return reduce


def projector_stage(reduction):
    """The eager stage of a planned projector-site Reduction (what `search --first` runs before the schedule);
    vision-site methods have whole-model references only (reference/vision.py) and are not offered here."""
    name, count = reduction.method, reduction.count
    if name == "random":
        kept = torch.tensor(reduction.recorded["indices"])
        return lambda f: (f[kept], "renumber", kept)
    if name == "pool":
        return pool_stage(out=tuple(reduction.recorded["out"]))
    if name == "divprune":
        return divprune_stage(count)
    if name == "gprune":
        return gprune_stage(count, reduction.recorded.get("segments"), reduction.recorded.get("segment_keeps"))
    return None
