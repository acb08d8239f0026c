"""Every method vtrcompile offers: its sites, options with defaults, position policy and source.

A method's `plan` turns user options into concrete Reductions; its selector is the only graph glue:
it names the pure tensor function to insert and the site nodes it reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction, SelectorInputs
from .fastv import fastv_keep
from .gprune import gprune_keep


@dataclass(frozen=True)
class Option:
    name: str  # CLI flag without dashes, underscores for dashes
    type: type
    default: Any
    help: str


@dataclass(frozen=True)
class MethodSpec:
    name: str
    title: str
    sites: str
    positions: str
    source: str
    options: tuple[Option, ...]
    plan: Callable[[dict[str, Any], int, int], list[Reduction]]  # (options, N, decoder layers)


def _count(opts: dict, n: int, method: str, from_ratio: int) -> int:
    keep = opts.get("keep")
    keep = from_ratio if keep is None else keep
    if not 1 <= keep <= n:
        raise VtrError(f"{method}: --keep {keep} is outside 1..{n} (the model has {n} image tokens)")
    return keep


def _fastv_selector(keep: int):
    def select(s: SelectorInputs):
        prev = s.previous
        if prev.enable_gqa:
            raise VtrError(f"fastv: {prev.attention_module} uses enable_gqa (keys not expanded); not supported yet")
        scale = prev.scale if prev.scale is not None else float(prev.q.meta["val"].shape[-1]) ** -0.5
        return fastv_keep, (prev.q, prev.k, prev.mask, s.image_start), {
            "n_image": s.n_image, "keep": keep, "scale": scale}
    return select


def _plan_fastv(opts: dict, n: int, layers: int) -> list[Reduction]:
    k = opts["layer"]
    if not 1 <= k <= layers - 1:
        raise VtrError(f"fastv: --layer {k} is outside 1..{layers - 1} (the LLM has {layers} decoder layers; "
                       "the signal comes from layer K-1)")
    keep = _count(opts, n, "fastv", round(n * (1 - opts["drop_ratio"])))
    return [Reduction("fastv", k, keep, "keep", _fastv_selector(keep), options=dict(opts))]


def _gprune_selector(keep: int):
    def select(s: SelectorInputs):
        return gprune_keep, (s.image_features,), {"batch": s.batch, "n_image": s.n_image_full, "keep": keep}
    return select


def _plan_gprune(opts: dict, n: int, layers: int) -> list[Reduction]:
    keep = _count(opts, n, "gprune", int(opts["keep_ratio"] * n))
    return [Reduction("gprune", 0, keep, "keep", _gprune_selector(keep), site="projector", options=dict(opts))]


_KEEP = Option("keep", int, None, "image tokens to keep (overrides the ratio)")

METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        MethodSpec("none", "unmodified model (the baseline engine)", "-", "-", "-", (),
                   lambda opts, n, layers: []),
        MethodSpec(
            "fastv", "FastV: prune by the last token's attention", "llm@K", "keep",
            "Chen et al. 2024, An Image is Worth 1/2 Tokens After Layer 2 (pkunlp-icler/FastV)",
            (Option("layer", int, 2, "K: layers 0..K-1 see all tokens, the signal is layer K-1's attention"),
             Option("drop_ratio", float, 0.5, "R: keep round(N*(1-R)) image tokens"), _KEEP),
            _plan_fastv),
        MethodSpec(
            "gprune", "G-Prune: graph propagation over projected tokens (text-agnostic)", "projector", "keep",
            "Jiang et al. 2025, What Kind of Visual Tokens Do We Need? (jytmelon/G-Prune)",
            (Option("keep_ratio", float, 0.5, "keep int(ratio*N) image tokens"), _KEEP),
            _plan_gprune),
    ]
}


def resolve(method: str, given: dict[str, Any], n_image: int, n_layers: int) -> list[Reduction]:
    """Options given by the user (None = not given) -> the method's reductions; unknown ones are errors."""
    if method not in METHODS:
        raise VtrError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)} "
                       "(see `vtrcompile methods`)")
    spec = METHODS[method]
    names = {o.name for o in spec.options}
    extra = [k for k, v in given.items() if v is not None and k not in names]
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        takes = ", ".join("--" + o.name.replace("_", "-") for o in spec.options) or "no options"
        raise VtrError(f"{method} does not take {flags}; it takes {takes}")
    opts = {o.name: (given.get(o.name) if given.get(o.name) is not None else o.default) for o in spec.options}
    return spec.plan(opts, n_image, n_layers)
