"""PyramidDrop (Cooperx521/PyramidDrop): FastV's last-token score at L/4, L/2, 3L/4, keeping lambda each time."""

from __future__ import annotations

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction
from .fastv import fastv_selector
from .spec import MethodSpec, Option


def plan_pyramiddrop(opts: dict, n: int, layers: int) -> list[Reduction]:
    sites = sorted({layers // 4, layers // 2, 3 * layers // 4} - {0})
    if not sites:
        raise VtrError(f"pyramiddrop: an LLM of {layers} layers has no site l >= 1 among L/4, L/2, 3L/4")
    out, present = [], n
    for layer in sites:
        keep = int(opts["keep_ratio"] * present)
        if keep < 1:
            raise VtrError(f"pyramiddrop: --keep-ratio {opts['keep_ratio']} keeps no image token at layer {layer}")
        out.append(Reduction("pyramiddrop", layer, keep, "renumber", fastv_selector(keep), options=dict(opts)))
        present = keep
    return out


SPEC = MethodSpec(
    "pyramiddrop", "PyramidDrop: halve the image tokens at L/4, L/2, 3L/4 by last-token attention",
    "llm@{L/4,L/2,3L/4}", "renumber", "Xing et al. 2024, PyramidDrop (Cooperx521/PyramidDrop)",
    (Option("keep_ratio", float, 0.5, "lambda: keep int(lambda*I) at each site", "(0, 1]"),), plan_pyramiddrop)
