"""PruMerge+ (42Shawn/LLaVA-PruMerge, token_prune_merge_advanced_plus): PruMerge plus uniform grid samples."""

from __future__ import annotations

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction, SelectorInputs
from .prumerge import grid_indices, prumerge_plus_features
from .spec import MethodSpec, Option, vision_taps


def plan_prumerge_plus(opts: dict, n: int, layers: int) -> list[Reduction]:
    ratio = opts["keep_ratio"]
    count = int(n * ratio) + len(grid_indices(n, ratio)) + 1
    if int(n * ratio) < 1 or count > n:
        raise VtrError(f"prumerge-plus: --keep-ratio {ratio} gives {count} tokens for N={n}; pick a ratio "
                       "in (1/N, 1/2]")

    def select(s: SelectorInputs):
        t = vision_taps(s, "prumerge-plus", True)
        return prumerge_plus_features, (t.patches, t.next_q_proj, t.next_k_proj), {"ratio": ratio}

    return [Reduction("prumerge-plus", 0, count, "renumber", select, site="vision", options=dict(opts))]


SPEC = MethodSpec(
    "prumerge-plus", "PruMerge+: PruMerge plus uniform grid samples", "vision", "renumber",
    "Shang et al. 2024, LLaVA-PruMerge (token_prune_merge_advanced_plus)",
    (Option("keep_ratio", float, 0.125, "top int(N*ratio) by attention, grid step int(1/ratio)", "(0, 1]"),),
    plan_prumerge_plus)
