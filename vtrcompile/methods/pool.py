"""Pool: adaptive average pooling of the image-token grid (the downsampling baseline of VTC-Bench, on tokens)."""

from __future__ import annotations

import math

import torch

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction, SelectorInputs
from .spec import KEEP, MethodSpec, Option


def token_grid(n_image: int) -> tuple[int, int]:
    """N -> (H, W): H = the largest divisor of N not above sqrt(N), W = N / H (square grids stay square)."""
    h = max(d for d in range(1, math.isqrt(n_image) + 1) if n_image % d == 0)
    return h, n_image // h


def pool_windows(size: int, out: int) -> list[tuple[int, int]]:
    """Adaptive pooling windows [floor(a*size/out), ceil((a+1)*size/out)) for a = 0..out-1."""
    return [((a * size) // out, -((-(a + 1) * size) // out)) for a in range(out)]


def pool_matrix(grid: tuple[int, int], out: tuple[int, int]) -> list[list[float]]:
    """The (A*B) x (H*W) averaging matrix of adaptive average pooling, rows in row-major output order."""
    (h, w), (a_out, b_out) = grid, out
    rows = []
    for r0, r1 in pool_windows(h, a_out):
        for c0, c1 in pool_windows(w, b_out):
            weight = 1.0 / ((r1 - r0) * (c1 - c0))
            rows.append([weight if r0 <= i // w < r1 and c0 <= i % w < c1 else 0.0 for i in range(h * w)])
    return rows


def pool_mix(image_start: torch.Tensor, matrix: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """image_start [B] -> (kept [B, n] = 0..n-1, mix [B, n, N]): every output row a window mean. The kept
    indices only give the block its length; the rows are all new and positions are renumbered."""
    mix = torch.tensor(matrix, dtype=torch.float32, device=image_start.device)
    b, n = image_start.shape[0], mix.shape[0]
    kept = torch.arange(n, device=image_start.device)[None, :].expand(b, -1)
    return kept, mix[None].expand(b, -1, -1)


def pool_shape(opts: dict, n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    h, w = token_grid(n)
    keep = opts.get("keep")
    if keep is None:
        f = opts["factor"]
        return (h, w), (-(-h // f), -(-w // f))
    s, side = math.isqrt(keep), min(h, w)
    if s * s != keep or s > side:
        squares = sorted({min(s, side) ** 2} | ({(s + 1) ** 2} if s < side else set()))
        raise VtrError(f"pool: --keep {keep} is not s*s with s <= {min(h, w)} (the image grid is {h}x{w}); "
                       f"the nearest valid counts are {', '.join(map(str, squares))}")
    return (h, w), (s, s)


def plan_pool(opts: dict, n: int, layers: int) -> list[Reduction]:
    grid, out = pool_shape(opts, n)
    matrix = pool_matrix(grid, out)

    def select(s: SelectorInputs):
        feats = s.image_features.meta["val"].shape  # [B*N, D], or [images, n, D] when a prompt holds several
        if len(feats) == 3 and int(feats[0]) != s.batch:
            raise VtrError(f"pool: the image block holds {int(feats[0]) // s.batch} images (tiles) of "
                           f"{int(feats[1])} tokens each, and pool reads it as one {grid[0]}x{grid[1]} grid that "
                           "would span them; build with one image (tile) per prompt, or use another method")
        return pool_mix, (s.image_start,), {"matrix": matrix}

    return [Reduction("pool", 0, len(matrix), "renumber", select, site="projector", merges=True,
                      options=dict(opts), recorded={"grid": list(grid), "out": list(out)})]


SPEC = MethodSpec(
    "pool", "Pool: adaptive average pooling of the image-token grid (downsampling baseline)", "projector",
    "renumber", "VTC-Bench's downsampling baseline, on the token grid",
    (Option("factor", int, 3, "output grid ceil(H/f) x ceil(W/f)", "[1, inf)"),
     KEEP),
    plan_pool)
