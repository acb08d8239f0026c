"""PuMer (csarron/PuMer), ported to decoder LLMs: text-informed pruning, then bipartite merging (ToMe)."""

from __future__ import annotations

import torch

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction, SelectorInputs
from .spec import MethodSpec, Option, attention_scale
from .tensor_ops import suffix_attention_to_image, take_image_block, topk_ascending


def pumer_counts(n_image: int, prune_ratio: float, merge_ratio: float) -> tuple[int, int]:
    """(n_prune, n_merge) at a site with n_image tokens (Python's round: half to even, as PuMer's code)."""
    n_prune = round(prune_ratio * n_image)
    n_merge = min(round(merge_ratio * n_image), (n_image - n_prune) // 2)
    return n_prune, n_merge


def bipartite_merge(keys: torch.Tensor, kept: torch.Tensor, n_merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe bipartite soft matching over the kept tokens, as fixed-size ops.

    keys [B, N, d] (similarity keys of all N image tokens), kept [B, K] (ascending image indices)
    -> survivors [B, K - n_merge] (ascending), mix [B, K - n_merge, N]: each survivor's row weights
    over the N tokens (a merged b-token is the plain mean of itself and the a-tokens merged into it).
    """
    b, k_count = kept.shape
    n = keys.shape[1]
    kn = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    kk = kn.gather(1, kept[..., None].expand(-1, -1, kn.shape[-1]))  # [B, K, d]
    a, bb = kk[:, 0::2], kk[:, 1::2]
    sim = torch.matmul(a, bb.transpose(1, 2))  # [B, Ka, Kb]
    # Best partner per a-token; argmax on float ties to the lower index (ONNX ArgMax too).
    best, partner = sim.max(dim=-1).values, sim.argmax(dim=-1)
    merged_a = torch.topk(best, n_merge, dim=-1).indices  # [B, n_merge] indices into a
    ka = a.shape[1]
    is_merged = (torch.arange(ka, device=kept.device)[None, :, None] == merged_a[:, None, :]).any(dim=-1)
    # Every kept element: its destination as an image index (itself, or its partner b-token).
    a_idx, b_idx = kept[:, 0::2], kept[:, 1::2]
    a_dest = torch.where(is_merged, b_idx.gather(1, partner), a_idx)
    dest = torch.cat([a_dest, b_idx], dim=1)  # [B, K] (order: all a, then all b)
    src = torch.cat([a_idx, b_idx], dim=1)
    # Survivors: unmerged a-tokens and all b-tokens. Merged ones get the sentinel N and fall out of
    # the K - n_merge smallest; the rest are distinct image indices.
    gone = torch.cat([is_merged, torch.zeros_like(b_idx, dtype=torch.bool)], dim=1)
    key = torch.where(gone, torch.full_like(src, n), src)
    survivors = torch.topk(key, k_count - n_merge, dim=-1, largest=False).values
    survivors = torch.sort(survivors, dim=-1).values
    assign = (dest[:, :, None] == survivors[:, None, :]).to(torch.float32)  # [B, K, K']
    onehot = (src[:, :, None] == torch.arange(n, device=kept.device)[None, None, :]).to(torch.float32)
    mix = torch.matmul(assign.transpose(1, 2), onehot)  # [B, K', N]
    mix = mix / assign.sum(dim=1)[..., None]
    return survivors, mix


def pumer_select(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, k_proj: torch.Tensor,
                 image_start: torch.Tensor, n_image: int, n_kv_heads: int, n_prune: int, n_merge: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One PuMer site. q, k [B, H, S, d] (layer l-1's attention inputs), k_proj [B, S, Hk*d] (its key
    projection, before RoPE) -> survivors [B, N - n_prune - n_merge], mix [B, that, N]."""
    scores = suffix_attention_to_image(q, k, mask, image_start, n_image, scale)
    kept = topk_ascending(scores, n_image - n_prune)
    bsz, s, width = k_proj.shape
    keys = k_proj.reshape(bsz, s, n_kv_heads, width // n_kv_heads).float().mean(dim=2)
    return bipartite_merge(take_image_block(keys, image_start, n_image), kept, n_merge)


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
            "scale": attention_scale(prev.attention)}
    return select


def plan_pumer(opts: dict, n: int, layers: int) -> list[Reduction]:
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


SPEC = MethodSpec(
    "pumer", "PuMer: text-informed pruning + bipartite merging at three depths", "llm@{2L,5L,8L}/12",
    "keep", "Cao et al. 2023, PuMer (csarron/PuMer), ported to decoder LLMs",
    (Option("prune_ratio", float, 0.1, "p: prune round(p*I) tokens at each site", "[0, 1)"),
     Option("merge_ratio", float, 0.3, "r: merge min(round(r*I), kept//2) tokens at each site", "[0, 0.5]"),
     Option("keep", str, None, "final image-token count (solves r with p fixed)")),
    plan_pumer)
