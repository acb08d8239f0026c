"""Boolean attention masks -> additive float masks, converted once per mask instead of once per layer.

torch.onnx lowers scaled_dot_product_attention with a boolean mask to Where(mask, 0, -inf) + Softmax +
Where(IsNaN(p), 0, p): the last two run over every layer's [B, H, S, S] attention weights (13% of the
unmodified llava15-geometry prefill in ONNX Runtime), and the NaN guard keeps OpenVINO from matching its
fused attention. With an additive mask the attention is MatMul + Add + Softmax + MatMul.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from ..methods.tensor_ops import additive_mask
from .base import PassResult, finish_transform
from .find_decoder_layers import SDPA, attention_mask_arg
from .graph_utils import refresh_meta
from .provenance import val

log = logging.getLogger(__name__)


def replace_bool_attention_masks(gm: fx.GraphModule, config=None) -> PassResult:
    """Every SDPA whose mask is boolean reads `additive_mask(mask)` (0 where True, the dtype's lowest value
    where False) instead; one conversion per distinct mask node, placed right after it.

    Needs: nothing (runs after the reductions, so each site's gathered mask gets its own conversion). Exact
    where every query row may attend to at least one key (causal masks: the diagonal), as in every prompt
    the engines take; a row with no allowed key would average its values instead of giving zeros.
    """
    converted: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != SDPA:
            continue
        where, mask = attention_mask_arg(node)
        if not isinstance(mask, fx.Node) or val(mask).dtype != torch.bool:
            continue
        if mask not in converted:
            with gm.graph.inserting_after(mask):
                add = gm.graph.call_function(additive_mask, (mask,), {"dtype": val(node.args[0]).dtype})
            add.meta["nn_module_stack"] = dict(mask.meta.get("nn_module_stack") or {})
            converted[mask] = add
        if where == 3:
            node.update_arg(3, converted[mask])
        else:
            node.update_kwarg("attn_mask", converted[mask])
    if not converted:
        log.debug("replace_bool_attention_masks: declined, no attention op takes a boolean mask")
        return PassResult(gm, False)
    finish_transform(gm)
    refresh_meta(gm)
    log.debug("replace_bool_attention_masks: %d boolean mask(s) made additive", len(converted))
    return PassResult(gm, True, facts={"masks": len(converted)})
