"""Graph -> Boundary: the op where projected visual tokens are written into the LLM's embeddings."""

from __future__ import annotations

import logging
import math

import torch
from torch import fx

from ..errors import AnalysisError
from ..methods.tensor_ops import merge_image_block
from .base import PassResult
from .facts import Boundary
from .provenance import shape, through_unary

log = logging.getLogger(__name__)

_PASSTHROUGH = {
    torch.ops.aten.to.dtype_layout, torch.ops.aten.to.dtype, torch.ops.aten.to.device,
    torch.ops.aten.unsqueeze.default, torch.ops.aten.expand.default, torch.ops.aten.expand_as.default,
    torch.ops.aten._to_copy.default, torch.ops.aten.clone.default,
}


def _image_token_compare(mask: fx.Node) -> tuple[fx.Node, int] | str:
    """(input_ids placeholder, image token id) if mask is `input_ids == const`, else why not."""
    src = through_unary(mask, _PASSTHROUGH)
    if not (src.op == "call_function" and src.target == torch.ops.aten.eq.Scalar):
        return f"its mask comes from {src.target}, not from input_ids == <image token id>"
    ids, token = src.args[0], src.args[1]
    if not (isinstance(ids, fx.Node) and ids.op == "placeholder"):
        return "its mask compares something other than a graph input with the image token id"
    return ids, int(token)


def find_vision_llm_boundary(gm: fx.GraphModule, config=None) -> PassResult:
    """Find aten.masked_scatter(text_embeds, input_ids == image_token, image_features) (or our merge)."""
    declined: list[str] = []
    found: list[Boundary] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == torch.ops.aten.masked_scatter.default:
            embeds, mask, feats = node.args[:3]
            cmp = _image_token_compare(mask)
            if isinstance(cmp, str):
                declined.append(f"masked_scatter at {node.name}: {cmp}")
                continue
            ids, token = cmp
        elif node.target is merge_image_block:
            embeds, ids, feats = node.args[:3]
            token = node.args[3] if len(node.args) > 3 else node.kwargs["image_token_id"]
        else:
            continue
        es, fs, ids_shape = shape(embeds), shape(feats), shape(ids)
        if es is None or fs is None or len(es) != 3 or len(fs) < 2 or ids_shape is None or fs[-1] != es[2]:
            declined.append(f"{node.target} at {node.name}: embeddings/features are not [B,S,D]/[..., D]")
            continue
        batch, rows = int(ids_shape[0]), math.prod(int(d) for d in fs[:-1])  # [B*N, D] or [images, n, D]
        if rows % batch:
            declined.append(f"{node.name}: {rows} feature rows do not split over batch {batch}")
            continue
        found.append(Boundary(node, embeds, feats, ids, token, rows // batch, batch, int(es[2])))
    if not found:
        why = "; ".join(declined) or "the graph has no aten.masked_scatter at all"
        raise AnalysisError(
            "no op where visual tokens enter the LLM: looked for aten.masked_scatter of projected image "
            f"features at input_ids == <image token id> ({why}); is this a text-only model, or one "
            "called without images?")
    if len(found) > 1:
        raise AnalysisError(f"found {len(found)} places where visual tokens enter the LLM; "
                            "only one image block per prompt is supported")
    b = found[0]
    log.debug("boundary: %s (image token %d, N=%d)", b.node, b.image_token_id, b.n_image)
    return PassResult(gm, False, facts=b)
