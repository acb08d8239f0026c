"""Reads and writes of the image rows through a boolean placeholder mask (`h[mask]`, `h[mask] = v`: NonZero
and a data-dependent row count once exported) -> fixed-size gathers of the contiguous image block.

Qwen3-VL's DeepStack is the case in the wild: after each of the first k LLM layers it adds features of a
vision layer to the hidden states at the image positions, with `h[mask] = h[mask] + feats` where mask is
`input_ids == image_token_id`. The rewritten graph has no NonZero, exports its FLOPs on fake tensors and
passes the TensorRT preflight.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from ..methods.tensor_ops import first_image_row, image_block_rows, put_image_block_rows
from .base import PassResult, finish_transform
from .find_vision_llm_boundary import find_vision_llm_boundary
from .graph_utils import refresh_meta, substitute
from .provenance import val

log = logging.getLogger(__name__)

# Ops a mask may go through on its way from `input_ids == image_token_id` to the index (shape and dtype
# only: the set of True positions stays the placeholders').
_MASK_VIEWS = {
    torch.ops.aten.select.int, torch.ops.aten.slice.Tensor, torch.ops.aten.expand.default,
    torch.ops.aten.unsqueeze.default, torch.ops.aten.view.default, torch.ops.aten.reshape.default,
    torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.to.device,
    torch.ops.aten.to.dtype_layout, torch.ops.aten.alias.default, torch.ops.aten.clone.default,
}
_READS = {torch.ops.aten.index.Tensor}
_WRITES = {torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default}


def _is_image_mask(node: fx.Node, input_ids: fx.Node, image_token_id: int) -> bool:
    """True when `node` is `input_ids == image_token_id` seen through shape-only ops, with the shape [B, S]."""
    v = val(node)
    if not (isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.dim() == 2):
        return False
    while node.op == "call_function" and node.target in _MASK_VIEWS:
        node = node.args[0]
    return (node.op == "call_function" and node.target == torch.ops.aten.eq.Scalar
            and node.args[0] is input_ids and node.args[1] == image_token_id)


def _image_index(node: fx.Node, input_ids: fx.Node, image_token_id: int) -> bool:
    """`x[mask]` / `x[mask] = v` on a [B, S, D] tensor with mask = the image placeholders."""
    if node.op != "call_function" or node.target not in _READS | _WRITES:
        return False
    indices = node.args[1]
    return (isinstance(indices, (list, tuple)) and len(indices) == 1 and isinstance(indices[0], fx.Node)
            and _is_image_mask(indices[0], input_ids, image_token_id) and val(node.args[0]).dim() == 3)


def replace_image_index_writes(gm: fx.GraphModule, config=None) -> PassResult:
    """Rewrite `index(h, [image mask])` into image_block_rows and `index_put(h, [image mask], v)` into
    put_image_block_rows (functional: the write's result replaces every later use of h).

    Needs: find_vision_llm_boundary. Assumes one contiguous block of N placeholders per prompt, as
    replace_masked_scatter does (the runners check it). Declines a write to a tensor that something else
    reads after the write (the in-place semantics would then matter) and a write that accumulates.
    """
    boundary = find_vision_llm_boundary(gm).facts
    ids, tok, n = boundary.input_ids, boundary.image_token_id, boundary.n_image
    found = [node for node in gm.graph.nodes if _image_index(node, ids, tok)]
    if not found:
        log.debug("replace_image_index_writes: declined, no tensor indexed by the image placeholder mask")
        return PassResult(gm, False)
    g = gm.graph
    order = {node: i for i, node in enumerate(g.nodes)}
    with g.inserting_after(ids):
        start = g.call_function(first_image_row, (ids,), {"image_token_id": tok})
    rewritten = 0
    for node in found:
        target = node.args[0]
        if node.target in _WRITES:
            accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
            later = [u for u in target.users if u is not node and order.get(u, -1) > order[node]]
            if accumulate or later:
                log.debug("replace_image_index_writes: declined %s (accumulate=%s, read after the write by %s)",
                          node.name, accumulate, [u.name for u in later])
                continue
            with g.inserting_before(node):
                new = g.call_function(put_image_block_rows, (target, start, node.args[2]), {"n_image": n})
        else:
            with g.inserting_before(node):
                new = g.call_function(image_block_rows, (target, start), {"n_image": n})
        substitute(node, new)
        rewritten += 1
    finish_transform(gm)
    refresh_meta(gm)
    log.debug("replace_image_index_writes: %d of %d image-mask reads/writes rewritten", rewritten, len(found))
    return PassResult(gm, rewritten > 0, facts={"rewritten": rewritten})
