"""VisionZip (dvlab-research/VisionZip): dominant tokens by CLS attention, contextual tokens by merging."""

from __future__ import annotations

import torch

from ..errors import VtrError
from ..passes.insert_token_reduction import Reduction, SelectorInputs
from .spec import MethodSpec, Option, attention_scale, vision_taps
from .tensor_ops import topk_descending


def contextual_positions(remaining: int, contextual: int) -> tuple[list[int], list[int]]:
    """Static split of the remaining tokens (in ascending order) into targets and the others."""
    step = max(1, remaining // contextual)
    targets = list(range(0, remaining, step))[:contextual]
    chosen = set(targets)
    return targets, [i for i in range(remaining) if i not in chosen]


def visionzip_features(hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor, k_proj: torch.Tensor,
                       scale: float, dominant: int, contextual: int) -> torch.Tensor:
    """hidden [B, N+1, C] (feature layer output, CLS first); q, k [B, H, N+1, d] (that layer's attention
    inputs); k_proj [B, N+1, H*d] (its key projection) -> [B, dominant + contextual, C]."""
    b, n1, c = hidden.shape
    heads = q.shape[1]
    attn = torch.softmax(torch.matmul(q[:, :, :1].float(), k.float().transpose(-1, -2)) * scale, dim=-1)
    s = attn[:, :, 0, 1:].sum(dim=1)  # [B, N]
    top = topk_descending(s, dominant - 1) + 1
    dom_idx = torch.sort(torch.cat([torch.zeros_like(top[:, :1]), top], dim=1), dim=-1).values
    dom = hidden.gather(1, dom_idx[..., None].expand(-1, -1, c))
    is_dom = (dom_idx[..., None] == torch.arange(n1, device=hidden.device)).any(dim=1)  # [B, N+1]
    n_rem = n1 - dominant
    ids = torch.arange(n1, device=hidden.device)[None].expand(b, -1)
    rem = torch.topk(torch.where(is_dom, n1, ids), n_rem, dim=-1, largest=False).values
    rem = torch.sort(rem, dim=-1).values  # remaining tokens, ascending
    t_pos, o_pos = contextual_positions(n_rem, contextual)
    targets = rem[:, t_pos]
    others = rem[:, o_pos]
    keys = k_proj.reshape(b, n1, heads, -1).float().mean(dim=2)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    kt = keys.gather(1, targets[..., None].expand(-1, -1, keys.shape[-1]))
    ko = keys.gather(1, others[..., None].expand(-1, -1, keys.shape[-1]))
    join = torch.matmul(ko, kt.transpose(1, 2)).argmax(dim=-1)  # [B, R - c]
    assign = (join[..., None] == torch.arange(len(t_pos), device=hidden.device)).to(torch.float32)
    counts = assign.sum(dim=1)  # [B, c]
    h_other = hidden.gather(1, others[..., None].expand(-1, -1, c)).float()
    mean = torch.matmul(assign.transpose(1, 2), h_other) / counts.clamp(min=1)[..., None]
    ctx = hidden.gather(1, targets[..., None].expand(-1, -1, c)) + mean.to(hidden.dtype)
    return torch.cat([dom, ctx], dim=1)


def plan_visionzip(opts: dict, n: int, layers: int) -> list[Reduction]:
    dom, ctx = opts["dominant"], opts["contextual"]
    if dom < 1 or ctx < 1 or dom + ctx > n:
        raise VtrError(f"visionzip: --dominant {dom} + --contextual {ctx} must be at least 1 each and at "
                       f"most N={n} in all")

    def select(s: SelectorInputs):
        t = vision_taps(s, "visionzip", False)
        att = t.attention
        return visionzip_features, (t.features, att.args[0], att.args[1], t.k_proj), {
            "scale": attention_scale(att), "dominant": dom, "contextual": ctx}

    return [Reduction("visionzip", 0, dom + ctx, "renumber", select, site="vision", options=dict(opts))]


SPEC = MethodSpec(
    "visionzip", "VisionZip: dominant tokens by CLS attention + merged contextual tokens", "vision",
    "renumber", "Yang et al. 2024, VisionZip (dvlab-research/VisionZip)",
    (Option("dominant", int, 54, "dominant tokens, CLS included", "[1, inf)"),
     Option("contextual", int, 10, "contextual tokens", "[1, inf)")),
    plan_visionzip)
