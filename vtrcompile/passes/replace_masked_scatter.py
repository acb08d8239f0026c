"""masked_scatter (NonZero + ScatterND once in ONNX) -> a fixed-size gather of the contiguous image block."""

from __future__ import annotations

import logging

import torch
from torch import fx

from ..methods.tensor_ops import merge_image_block
from .base import PassResult, finish_transform
from .find_vision_llm_boundary import find_vision_llm_boundary
from .graph_utils import refresh_meta, substitute

log = logging.getLogger(__name__)


def replace_masked_scatter(gm: fx.GraphModule, config=None) -> PassResult:
    """Rewrite the boundary's masked_scatter into merge_image_block (argmax/arange/gather/where).

    Needs: find_vision_llm_boundary. Assumes one contiguous run of N placeholders per prompt, which
    is LLaVA-1.5's layout; the runners check it on the host before each call.
    """
    boundary = find_vision_llm_boundary(gm).facts
    node = boundary.node
    if not (node.op == "call_function" and node.target == torch.ops.aten.masked_scatter.default):
        log.debug("replace_masked_scatter: declined, %s is not a masked_scatter", node.name)
        return PassResult(gm, False)
    g = gm.graph
    with g.inserting_before(node):
        merged = g.call_function(
            merge_image_block,
            (boundary.text_embeds, boundary.input_ids, boundary.image_features),
            {"image_token_id": boundary.image_token_id, "n_image": boundary.n_image})
    substitute(node, merged)
    finish_transform(gm)
    refresh_meta(gm)
    return PassResult(gm, True)
