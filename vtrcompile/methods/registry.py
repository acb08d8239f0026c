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
from .prumerge import grid_indices, prumerge_features, prumerge_plus_features
from .pumer import pumer_counts, pumer_select
from .schedule import schedule_keep, schedule_sites
from .visionzip import visionzip_features


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
        return fastv_keep, (prev.q, prev.k, prev.mask, s.image_start), {
            "n_image": s.n_image, "keep": keep, "scale": _scale(prev.attention)}
    return select


def _plan_fastv(opts: dict, n: int, layers: int) -> list[Reduction]:
    k = opts["layer"]
    if not 1 <= k <= layers - 1:
        raise VtrError(f"fastv: --layer {k} is outside 1..{layers - 1} (the LLM has {layers} decoder layers; "
                       "the signal comes from layer K-1)")
    keep = _count(opts, n, "fastv", round(n * (1 - opts["drop_ratio"])))
    return [Reduction("fastv", k, keep, "keep", _fastv_selector(keep), options=dict(opts))]


def _scale(attention) -> float:
    """The softmax scale an attention op applies: its `scale` kwarg, else SDPA's default d^-0.5."""
    scale = attention.kwargs.get("scale")
    return scale if scale is not None else float(attention.args[0].meta["val"].shape[-1]) ** -0.5


def _plan_pyramiddrop(opts: dict, n: int, layers: int) -> list[Reduction]:
    sites = sorted({layers // 4, layers // 2, 3 * layers // 4} - {0})
    if not sites:
        raise VtrError(f"pyramiddrop: an LLM of {layers} layers has no site l >= 1 among L/4, L/2, 3L/4")
    out, present = [], n
    for layer in sites:
        keep = int(opts["keep_ratio"] * present)
        if keep < 1:
            raise VtrError(f"pyramiddrop: --keep-ratio {opts['keep_ratio']} keeps no image token at layer {layer}")
        out.append(Reduction("pyramiddrop", layer, keep, "renumber", _fastv_selector(keep), options=dict(opts)))
        present = keep
    return out


def _plan_vtw(opts: dict, n: int, layers: int) -> list[Reduction]:
    k = opts["layer"] if opts["layer"] is not None else layers // 2
    if not 1 <= k <= layers - 1:
        raise VtrError(f"vtw: --layer {k} is outside 1..{layers - 1} (the LLM has {layers} decoder layers)")
    return [Reduction("vtw", k, 0, "keep", None, options={**opts, "layer": k})]


def pumer_sites(layers: int) -> list[int]:
    return sorted({round(2 * layers / 12), round(5 * layers / 12), round(8 * layers / 12)} - {0})


def pumer_schedule(n: int, layers: int, prune: float, merge: float) -> list[tuple[int, int, int, int]]:
    """[(layer, image tokens in, n_prune, n_merge)] for PuMer's three sites."""
    out, present = [], n
    for layer in pumer_sites(layers):
        n_prune, n_merge = pumer_counts(present, prune, merge)
        out.append((layer, present, n_prune, n_merge))
        present = present - n_prune - n_merge
    return out


def _solve_merge_ratio(n: int, layers: int, prune: float, keep: int) -> float:
    """The smallest merge ratio (on a 1e-4 grid) whose schedule ends with exactly `keep` tokens."""
    finals = {}
    for i in range(10001):
        r = i / 10000
        final = pumer_schedule(n, layers, prune, r)[-1]
        final = final[1] - final[2] - final[3]
        finals.setdefault(final, r)
    if keep not in finals:
        lo, hi = min(finals), max(finals)
        raise VtrError(f"pumer: --keep {keep} cannot be reached with --prune-ratio {prune} "
                       f"(reachable final counts: {lo}..{hi}, not every one); pick another --keep")
    return finals[keep]


def _pumer_selector(n_prune: int, n_merge: int):
    def select(s: SelectorInputs):
        prev = s.previous
        if prev.k_proj is None:
            raise VtrError(f"pumer: cannot find the key projection of {prev.module}")
        head_dim = prev.q.meta["val"].shape[-1]
        n_kv = prev.k_proj.meta["val"].shape[-1] // head_dim
        return pumer_select, (prev.q, prev.k, prev.mask, prev.k_proj, s.image_start), {
            "n_image": s.n_image, "n_kv_heads": n_kv, "n_prune": n_prune, "n_merge": n_merge,
            "scale": _scale(prev.attention)}
    return select


def _plan_pumer(opts: dict, n: int, layers: int) -> list[Reduction]:
    prune, merge = opts["prune_ratio"], opts["merge_ratio"]
    if opts.get("keep") is not None:
        if not 1 <= opts["keep"] <= n:
            raise VtrError(f"pumer: --keep {opts['keep']} is outside 1..{n} (the model has {n} image tokens)")
        merge = _solve_merge_ratio(n, layers, prune, opts["keep"])
    out = []
    for layer, present, n_prune, n_merge in pumer_schedule(n, layers, prune, merge):
        keep = present - n_prune - n_merge
        out.append(Reduction("pumer", layer, keep, "keep", _pumer_selector(n_prune, n_merge), merges=True,
                             options={**opts, "merge_ratio": merge}))
    return out


def _vision_taps(s: SelectorInputs, method: str, next_layer: bool):
    t = s.vision
    if not t.has_cls:
        raise VtrError(f"{method} needs the vision tower's CLS token, and this model feeds the projector "
                       "without slicing one off (no CLS, or vision_feature_select_strategy 'full')")
    if next_layer and (t.next_q_proj is None or t.next_k_proj is None):
        raise VtrError(f"{method} needs the q/k projections of the vision layer after the selected "
                       "feature layer, and the graph has none (is the feature layer the last one?)")
    return t


def _plan_prumerge(opts: dict, n: int, layers: int) -> list[Reduction]:
    keep = opts["keep"]
    if not 1 <= keep <= n - 1:
        raise VtrError(f"prumerge: --keep {keep} is outside 1..{n - 1} (the model has {n} image tokens)")

    def select(s: SelectorInputs):
        t = _vision_taps(s, "prumerge", True)
        return prumerge_features, (t.patches, t.next_q_proj, t.next_k_proj), {"keep": keep}

    return [Reduction("prumerge", 0, keep + 1, "renumber", select, site="vision", options=dict(opts))]


def _plan_prumerge_plus(opts: dict, n: int, layers: int) -> list[Reduction]:
    ratio = opts["keep_ratio"]
    count = int(n * ratio) + len(grid_indices(n, ratio)) + 1
    if int(n * ratio) < 1 or count > n:
        raise VtrError(f"prumerge-plus: --keep-ratio {ratio} gives {count} tokens for N={n}; pick a ratio "
                       "in (1/N, 1/2]")

    def select(s: SelectorInputs):
        t = _vision_taps(s, "prumerge-plus", True)
        return prumerge_plus_features, (t.patches, t.next_q_proj, t.next_k_proj), {"ratio": ratio}

    return [Reduction("prumerge-plus", 0, count, "renumber", select, site="vision", options=dict(opts))]


def _plan_visionzip(opts: dict, n: int, layers: int) -> list[Reduction]:
    dom, ctx = opts["dominant"], opts["contextual"]
    if dom < 1 or ctx < 1 or dom + ctx > n:
        raise VtrError(f"visionzip: --dominant {dom} + --contextual {ctx} must be at least 1 each and at "
                       f"most N={n} in all")

    def select(s: SelectorInputs):
        t = _vision_taps(s, "visionzip", False)
        att = t.attention
        return visionzip_features, (t.features, att.args[0], att.args[1], t.k_proj), {
            "scale": _scale(att), "dominant": dom, "contextual": ctx}

    return [Reduction("visionzip", 0, dom + ctx, "renumber", select, site="vision", options=dict(opts))]


def _gprune_selector(keep: int):
    def select(s: SelectorInputs):
        return gprune_keep, (s.image_features,), {"batch": s.batch, "n_image": s.n_image_full, "keep": keep}
    return select


def _plan_gprune(opts: dict, n: int, layers: int) -> list[Reduction]:
    keep = _count(opts, n, "gprune", int(opts["keep_ratio"] * n))
    return [Reduction("gprune", 0, keep, "keep", _gprune_selector(keep), site="projector", options=dict(opts))]


def _schedule_selector(keep: int):
    def select(s: SelectorInputs):
        prev = s.previous
        return schedule_keep, (prev.q, prev.k, prev.mask, s.image_start), {
            "n_image": s.n_image, "keep": keep, "scale": _scale(prev.attention)}
    return select


def _plan_schedule(opts: dict, n: int, layers: int) -> list[Reduction]:
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
        MethodSpec(
            "prumerge", "LLaVA-PruMerge: CLS-attention selection + key-neighbour merge (fixed count)", "vision",
            "renumber", "Shang et al. 2024, LLaVA-PruMerge (42Shawn/LLaVA-PruMerge)",
            (Option("keep", int, 32, "n: tokens kept before the extra leftover token (n+1 in all); "
                    "'auto' with --calibration: median IQR outlier count"),),
            _plan_prumerge),
        MethodSpec(
            "prumerge-plus", "PruMerge+: PruMerge plus uniform grid samples", "vision", "renumber",
            "Shang et al. 2024, LLaVA-PruMerge (token_prune_merge_advanced_plus)",
            (Option("keep_ratio", float, 0.125, "top int(N*ratio) by attention, grid step int(1/ratio)"),),
            _plan_prumerge_plus),
        MethodSpec(
            "visionzip", "VisionZip: dominant tokens by CLS attention + merged contextual tokens", "vision",
            "renumber", "Yang et al. 2024, VisionZip (dvlab-research/VisionZip)",
            (Option("dominant", int, 54, "dominant tokens, CLS included"),
             Option("contextual", int, 10, "contextual tokens")),
            _plan_visionzip),
        MethodSpec(
            "pumer", "PuMer: text-informed pruning + bipartite merging at three depths", "llm@{2L,5L,8L}/12",
            "keep", "Cao et al. 2023, PuMer (csarron/PuMer), ported to decoder LLMs",
            (Option("prune_ratio", float, 0.1, "p: prune round(p*I) tokens at each site"),
             Option("merge_ratio", float, 0.3, "r: merge min(round(r*I), kept//2) tokens at each site"),
             Option("keep", int, None, "final image-token count (solves r with p fixed)")),
            _plan_pumer),
        MethodSpec(
            "pyramiddrop", "PyramidDrop: halve the image tokens at L/4, L/2, 3L/4 by last-token attention",
            "llm@{L/4,L/2,3L/4}", "renumber", "Xing et al. 2024, PyramidDrop (Cooperx521/PyramidDrop)",
            (Option("keep_ratio", float, 0.5, "lambda: keep int(lambda*I) at each site"),), _plan_pyramiddrop),
        MethodSpec(
            "vtw", "VTW: withdraw every image token at layer K", "llm@K", "keep",
            "Lin et al. 2024, Boosting Multimodal LLMs with Visual Token Withdrawal (arXiv 2405.05803)",
            (Option("layer", int, None, "K (default L/2)"),), _plan_vtw),
        MethodSpec(
            "schedule", "a searched per-layer schedule (G-Search / P-Sigmoid): top-n_l by suffix-text attention",
            "llm@l where n_l drops", "keep",
            "Zhao et al. 2024, Accelerating MLLMs by Searching Optimal Vision Token Reduction (arXiv 2412.00556)",
            (Option("schedule", str, None, "schedule.json from `vtrcompile search`"),), _plan_schedule),
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
