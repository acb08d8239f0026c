"""VTW (arXiv 2405.05803): withdraw every image token before decoder layer K; no selector."""

from __future__ import annotations

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction
from .spec import MethodSpec, Option


def plan_vtw(opts: dict, n: int, layers: int) -> list[Reduction]:
    k = opts["layer"] if opts["layer"] is not None else layers // 2
    if not 1 <= k <= layers - 1:
        raise VtrError(f"vtw: --layer {k} is outside 1..{layers - 1} (the LLM has {layers} decoder layers)")
    return [Reduction("vtw", k, 0, "keep", None, options={**opts, "layer": k})]


SPEC = MethodSpec(
    "vtw", "VTW: withdraw every image token at layer K", "llm@K", "keep",
    "Lin et al. 2024, Boosting Multimodal LLMs with Visual Token Withdrawal (arXiv 2405.05803)",
    (Option("layer", int, None, "K (default L/2)"),), plan_vtw)
