"""Prefill graph -> the same graph that also returns every decoder layer's KV cache and next positions.

Generation needs, from the prefill, what each decoder layer attended over: the keys (after RoPE) and
values of exactly the S_l tokens that layer processed, before any GQA expansion, [B, kv_heads, S_l, d].
They are the k/v inputs of the layer's attention op with the expansion walked back. The extra output
`next_layer_position_ids` [B, L] is the position the first generated token takes in each layer: S for a layer
that kept positions, S_r for a layer after a `renumber` site r (its own numbering continues). With positions
from the host (mRoPE, [3, B, S]) it is the last prompt token's position + 1 (every site keeps positions there),
which continues the unreduced prompt's numbering as the model's own `rope_deltas` do. With a left-padding
`attention_mask` input (batch engines) a row's positions start at its first token, so its next position is
its token count (the mask's sum) where S stood; the padding sits at the front of every layer's cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..errors import AnalysisError
from .base import PassResult, finish_transform
from .find_decoder_layers import SDPA
from .graph_utils import refresh_meta, tag_provenance
from .insert_token_reduction import Reduction
from .provenance import module_stack

log = logging.getLogger(__name__)

# GQA's repeat_kv is unsqueeze -> expand -> reshape; views and copies carry the same values.
_LAYOUT_OPS = {torch.ops.aten.reshape.default, torch.ops.aten.expand.default, torch.ops.aten.unsqueeze.default,
               torch.ops.aten.view.default, torch.ops.aten.clone.default, torch.ops.aten._unsafe_view.default,
               torch.ops.aten.contiguous.default}


def cached_tensor(node: fx.Node) -> fx.Node:
    """The attention input before layout-only ops: [B, kv_heads, S_l, d] for a GQA-expanded key/value."""
    while node.op == "call_function" and node.target in _LAYOUT_OPS:
        node = node.args[0]
    return node


def next_layer_positions(input_ids: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """input_ids [B, S], offsets [L] -> [B, L] int64: S - offsets[l], the next position in each layer."""
    s = input_ids.shape[1]
    off = torch.tensor(list(offsets), dtype=torch.int64, device=input_ids.device)
    return (s - off).unsqueeze(0).expand(input_ids.shape[0], -1).contiguous()


def next_layer_positions_padded(attention_mask: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """attention_mask [B, S] (left padding), offsets [L] -> [B, L] int64: each row's token count - offsets[l]."""
    off = torch.tensor(list(offsets), dtype=torch.int64, device=attention_mask.device)
    return attention_mask.to(torch.int64).sum(dim=1, keepdim=True) - off.unsqueeze(0)


def next_layer_positions_after(position_ids: torch.Tensor, n_layers: int) -> torch.Tensor:
    """position_ids [3, B, S] (host-computed, every axis) -> [B, L] int64: the last prompt token's position + 1
    in every layer (a text token: its axes agree; the max is taken so a prompt ending in an image still works)."""
    nxt = position_ids[:, :, -1].amax(dim=0) + 1
    return nxt.unsqueeze(1).expand(-1, n_layers).contiguous()


def position_offsets(drops: Sequence[int], reductions: Sequence[Reduction]) -> list[int]:
    """Per layer: tokens dropped at the last `renumber` site at or before it (0 where positions are kept).
    drops[l] = S - S_l, the tokens missing from what layer l processes."""
    out, current = [], 0
    renumber_at = {r.layer for r in reductions if r.positions == "renumber"}
    for layer, drop in enumerate(drops):
        if layer in renumber_at:
            current = drop
        out.append(current)
    return out


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else size


def insert_cache_outputs(gm: fx.GraphModule, config: tuple[list[str], Sequence[Reduction], int | None, int | None]
                         ) -> PassResult:
    """Needs: the reductions already inserted. config = (attention module path of each decoder layer, found
    by the analysis of the unmodified graph; the reductions; the index of the graph input holding host
    positions [3, B, S], or None; the index of the left-padding attention_mask input [B, S], or None).
    Attention ops are found again by that provenance, because a vision-site rewrite removes the boundary op the
    analysis starts from. A graph that returns more than its logits already is left as it is."""
    attention_modules, reductions, position_input, padding_input = config
    out = next(n for n in gm.graph.nodes if n.op == "output")
    results = out.args[0]
    if not isinstance(results, (tuple, list)) or len(results) != 1:
        log.debug("insert_cache_outputs: declined, the graph already returns %d values", len(results))
        return PassResult(gm, False)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    input_ids = placeholders[0]
    seq = _expr(input_ids.meta["val"].shape[1])
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA and module_stack(n)]
    present: list[fx.Node] = []
    drops = []
    for path in attention_modules:
        found = [n for n in ops if module_stack(n)[-1][0] == path]
        if len(found) != 1:
            raise AnalysisError(f"{path}: expected one attention op with this provenance, found {len(found)}")
        op = found[0]
        k, v = cached_tensor(op.args[1]), cached_tensor(op.args[2])
        for t, what in ((k, "key"), (v, "value")):
            shape = t.meta["val"].shape
            if len(shape) != 4:
                raise AnalysisError(f"{path}: the attention {what} is {list(shape)}, not "
                                    "[batch, heads, sequence, head_dim]; cannot expose it as a KV cache")
        drop = seq - _expr(op.args[0].meta["val"].shape[2])
        if not getattr(drop, "is_Integer", False):
            raise AnalysisError(f"{path}: query length {op.args[0].meta['val'].shape[2]} is not the prompt "
                                "length minus a constant")
        drops.append(int(drop))
        present += [k, v]
    offsets = position_offsets(drops, reductions)
    with gm.graph.inserting_before(out):
        if position_input is None and padding_input is not None:
            pos = gm.graph.call_function(next_layer_positions_padded, (placeholders[padding_input], offsets))
        elif position_input is None:
            pos = gm.graph.call_function(next_layer_positions, (input_ids, offsets))
        else:
            if any(offsets):
                raise AnalysisError("a renumbering site on a graph with host positions; such sites keep positions")
            pos = gm.graph.call_function(next_layer_positions_after, (placeholders[position_input], len(drops)))
    tag_provenance(pos, input_ids, "generation.positions")
    out.args = ((results[0], *present, pos),)
    spec = pytree.tree_flatten(tuple(range(len(present) + 2)))[1]
    gm.graph._codegen.pytree_info = gm.graph._codegen.pytree_info._replace(out_spec=spec)
    finish_transform(gm)
    refresh_meta(gm)
    log.info("cache outputs: %d layers, tokens cached per layer = S - %s", len(drops), drops)
    return PassResult(gm, True, facts={"drops": drops, "position_offsets": offsets})
