"""A per-layer keep schedule (G-Search / P-Sigmoid): at each site keep the top image tokens by suffix-text attention."""

from __future__ import annotations

import torch

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction, SelectorInputs
from .spec import MethodSpec, Option, attention_scale
from .tensor_ops import suffix_attention_to_image, topk_ascending


def schedule_keep(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, image_start: torch.Tensor,
                  n_image: int, keep: int, scale: float) -> torch.Tensor:
    """q, k [B, H, S, d] (layer l-1's attention inputs) -> kept [B, keep]: the image tokens still present that
    the suffix-text rows attend to most (head-mean, row-mean), ascending, so kept sets nest site to site."""
    return topk_ascending(suffix_attention_to_image(q, k, mask, image_start, n_image, scale), keep)


def schedule_sites(keeps: list[int]) -> list[tuple[int, int]]:
    """keep counts n_0..n_{L-1} -> [(layer, keep)] wherever the count drops."""
    return [(layer, keeps[layer]) for layer in range(1, len(keeps)) if keeps[layer] < keeps[layer - 1]]


def _schedule_selector(keep: int):
    def select(s: SelectorInputs):
        prev = s.previous
        return schedule_keep, (prev.q, prev.k, prev.mask, s.image_start), {
            "n_image": s.n_image, "keep": keep, "scale": attention_scale(prev.attention)}
    return select


def plan_schedule(opts: dict, n: int, layers: int) -> list[Reduction]:
    from ..search.schedule_file import load_schedule

    path = opts.get("schedule")
    if not path:
        raise VtrError("schedule: give --schedule FILE (written by `vtrcompile search`)")
    sched = load_schedule(path)
    keeps = sched["keep"]
    if sched["n_image"] != n or len(keeps) != layers:
        raise VtrError(f"{path}: made for N={sched['n_image']} image tokens and {len(keeps)} layers, this model "
                       f"has N={n} and {layers}; search again for this model")
    out = []
    for layer, keep in schedule_sites(keeps):
        if keep == 0:  # nothing left to score: withdraw the rest (as VTW), and no later site remains
            out.append(Reduction("schedule", layer, 0, "keep", None, options=dict(opts)))
            break
        out.append(Reduction("schedule", layer, keep, "keep", _schedule_selector(keep), options=dict(opts)))
    return out


SPEC = MethodSpec(
    "schedule", "a searched per-layer schedule (G-Search / P-Sigmoid): top-n_l by suffix-text attention",
    "llm@l where n_l drops", "keep",
    "Zhao et al. 2024, Accelerating MLLMs by Searching Optimal Vision Token Reduction (arXiv 2412.00556)",
    (Option("schedule", str, None, "schedule.json from `vtrcompile search`"),), plan_schedule)
