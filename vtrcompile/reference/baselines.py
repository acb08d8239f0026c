"""Eager references of the baselines and newer methods (random, pool, DivPrune, DART) and of stacked
reductions, written from docs/methods.md with plain loops (batch 1). Projector stages are functions
feats [N, D] -> (block [n, D], positions policy, kept image indices); LLM sites are `reduce` callables of
`_progressive`."""

from __future__ import annotations

import math

import numpy as np
import torch

from .llava import last_row_attention, roped_qk, top_rows_ascending
from .methods import _progressive, suffix_scores


def run_stages(model, input_ids, pixel_values, first=None, sites: dict | None = None) -> torch.Tensor:
    """A projector stage, then LLM sites {layer: reduce}: the composition a stacked engine must equal."""
    sites = sites or {}
    return torch.no_grad()(_progressive)(model, input_ids, pixel_values, set(sites),
                                         lambda layer, *a: sites[layer](layer, *a), first)


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


def gprune_stage(keep: int):
    from .methods import gprune_reference_scores

    def stage(f):
        kept = top_rows_ascending(gprune_reference_scores(f), keep)
        return f[kept], "keep", kept
    return stage


# ---- LLM sites ------------------------------------------------------------------------------------------

def _rows(s: int, start: int, n: int, kept) -> torch.Tensor:
    return torch.cat([torch.arange(start), start + torch.as_tensor(kept, dtype=torch.long),
                      torch.arange(start + n, s)])


def fastv_site(model, keep: int):
    def reduce(layer, h_prev, h, pos, start, n):
        scores = last_row_attention(model, layer - 1, h_prev, pos)[0, start:start + n]
        rows = _rows(h.shape[1], start, n, top_rows_ascending(scores, keep))
        return h[:, rows], pos[rows], keep
    return reduce


def random_site(keep: int, seed: int = 0):
    def reduce(layer, h_prev, h, pos, start, n):
        kept = sorted(np.random.Generator(np.random.PCG64(seed)).permutation(n)[:keep].tolist())
        rows = _rows(h.shape[1], start, n, kept)
        return h[:, rows], torch.arange(len(rows)), keep
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
        hn = model.model.language_model.norm(h)[0].float()
        hn = hn / hn.norm(dim=-1, keepdim=True)
        pool = [j for j in range(n) if j not in img]
        picks = []
        for pivot in sorted([start + j for j in img] + txt):
            sims = {j: float(hn[pivot] @ hn[start + j]) for j in pool}
            take = sorted(pool, key=lambda j: (sims[j], j))[:per]
            picks += take
            pool = [j for j in pool if j not in take]
        kept = sorted(img + picks)
        rows = _rows(s, start, n, kept)
        return h[:, rows], pos[rows], len(kept)
    return reduce


def schedule_sites(model, keeps: list[int]) -> dict:
    """A keep schedule's sites: before layer l where the count drops, the top n_l still present by layer
    l-1's suffix-text attention (positions kept; 0 withdraws them all)."""
    out = {}
    for layer in range(1, len(keeps)):
        if keeps[layer] < keeps[layer - 1]:
            def reduce(layer_, h_prev, h, pos, start, n, keep=keeps[layer]):
                kept = top_rows_ascending(suffix_scores(model, layer_ - 1, h_prev, pos, start, n), keep) if keep \
                    else torch.arange(0)
                rows = _rows(h.shape[1], start, n, kept)
                return h[:, rows], pos[rows], keep
            out[layer] = reduce
    return out


def pyramiddrop_sites(model, n_layers: int, n_image: int, keep_ratio: float = 0.5) -> dict:
    out, present = {}, n_image
    for layer in sorted({n_layers // 4, n_layers // 2, 3 * n_layers // 4} - {0}):
        keep = int(keep_ratio * present)

        def reduce(layer_, h_prev, h, pos, start, n, keep=keep):
            scores = last_row_attention(model, layer_ - 1, h_prev, pos)[0, start:start + n]
            rows = _rows(h.shape[1], start, n, top_rows_ascending(scores, keep))
            return h[:, rows], torch.arange(len(rows)), keep
        out[layer] = reduce
        present = keep
    return out


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
        return gprune_stage(count)
    return None
