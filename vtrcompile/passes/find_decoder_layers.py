"""Graph + Boundary -> the LLM's decoder layers: attention op, q/k/v, mask, scale, residual input."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import fx

from ..errors import AnalysisError
from .base import PassResult
from .facts import Boundary, DecoderLayer
from .provenance import (
    ancestors,
    descendants,
    innermost_list_item,
    item_index,
    module_paths,
    module_stack,
    shape,
)

log = logging.getLogger(__name__)

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def attention_mask_arg(op: fx.Node) -> tuple[str | int, fx.Node | None]:
    """Where an SDPA call holds its attention mask (positional index 3, or the keyword) and the mask node."""
    if len(op.args) > 3:
        return 3, op.args[3]
    return "attn_mask", op.kwargs.get("attn_mask")


def attention_ops(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA]


def layer_nodes(gm: fx.GraphModule, layer_path: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and layer_path in module_paths(n)]


def external_inputs(nodes: list[fx.Node]) -> list[fx.Node]:
    """Inputs of a node set that come from outside it, parameters and buffers aside, in graph order."""
    inside = set(nodes)
    seen: dict[fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr":
                seen[a] = None
    return list(seen)


def qk_projections(op: fx.Node, nodes: list[fx.Node]) -> tuple[fx.Node | None, fx.Node | None]:
    """The q and k projection outputs (aten.linear) feeding an attention op: for each of its q and k
    inputs, the one linear op of the layer upstream of it and not of the other."""
    in_layer = set(nodes)
    up_q, up_k = ancestors([op.args[0]]), ancestors([op.args[1]])

    def only(side: set[fx.Node], other: set[fx.Node]) -> fx.Node | None:
        lin = [n for n in side - other if n in in_layer and n.target == torch.ops.aten.linear.default]
        return lin[0] if len(lin) == 1 else None

    return only(up_q, up_k), only(up_k, up_q)


def _residual_input(nodes: list[fx.Node], downstream: set[fx.Node], hidden: int) -> fx.Node | str:
    cands = [a for a in external_inputs(nodes)
             if a in downstream and (s := shape(a)) is not None and len(s) == 3 and s[-1] == hidden]
    if len(cands) != 1:
        return f"{len(cands)} inputs of shape [B, S, {hidden}] come from the image path"
    return cands[0]


def find_decoder_layers(gm: fx.GraphModule, boundary: Boundary) -> PassResult:
    """LLM attention = scaled_dot_product_attention ops downstream of the boundary, one per layer."""
    downstream = descendants([boundary.node]) | {boundary.node}
    declined: list[str] = []
    by_layer: dict[str, list[fx.Node]] = defaultdict(list)
    for op in attention_ops(gm):
        if op not in downstream:
            declined.append(f"{op.name}: upstream of the boundary (vision side)")
            continue
        layer = innermost_list_item(op)
        if layer is None:
            declined.append(f"{op.name}: no enclosing ModuleList item in its nn_module_stack")
            continue
        by_layer[layer].append(op)
    if not by_layer:
        raise AnalysisError("no decoder-layer attention downstream of the visual-token boundary: looked "
                            "for aten.scaled_dot_product_attention under a ModuleList item ("
                            + ("; ".join(declined) or "none in the graph") + ")")
    layers: list[DecoderLayer] = []
    for path in sorted(by_layer, key=item_index):
        ops = by_layer[path]
        if len(ops) != 1:
            raise AnalysisError(f"{path}: {len(ops)} attention ops in one decoder layer; expected one")
        op = ops[0]
        nodes = layer_nodes(gm, path)
        res = _residual_input(nodes, downstream, boundary.hidden_size)
        if isinstance(res, str):
            raise AnalysisError(f"{path}: cannot tell the residual-stream input ({res})")
        q, k, v = op.args[:3]
        _, mask = attention_mask_arg(op)
        att_path = module_stack(op)[-1][0]
        _, k_lin = qk_projections(op, nodes)
        layers.append(DecoderLayer(
            index=len(layers), module=path, attention_module=att_path, attention=op, q=q, k=k, v=v,
            mask=mask, scale=op.kwargs.get("scale"), enable_gqa=bool(op.kwargs.get("enable_gqa", False)),
            residual_input=res, k_proj=k_lin, nodes=nodes))
    log.debug("found %d decoder layers", len(layers))
    return PassResult(gm, False, facts=layers)


def _sizes(node: fx.Node) -> tuple | None:
    s = shape(node)
    return None if s is None else tuple(str(x.node.expr) if isinstance(x, torch.SymInt) else x for x in s)


def stream_addend(prev: DecoderLayer, lay: DecoderLayer) -> fx.Node | None:
    """The tensor added to the stream between two layers, when the second one's residual input is the first
    one's output plus a tensor of the same shape that does not depend on the stream (after
    replace_image_row_additions: Qwen3-VL's DeepStack features on the image rows), else None."""
    res = lay.residual_input
    if res.op != "call_function" or res.target != torch.ops.aten.add.Tensor or len(res.args) != 2:
        return None
    inside = set(prev.nodes)
    for a, d in (res.args, res.args[::-1]):
        if (isinstance(a, fx.Node) and a in inside and isinstance(d, fx.Node) and _sizes(d) == _sizes(res)
                and not ancestors([d]) & inside):
            return d
    return None


def stream_addends(layers: list[DecoderLayer]) -> dict[int, fx.Node]:
    """{layer j: the tensor added to its input between layer j-1 and layer j} (stream_addend)."""
    found = {lay.index: stream_addend(prev, lay) for prev, lay in zip(layers, layers[1:], strict=False)}
    return {j: d for j, d in found.items() if d is not None}


def inputs_written_between_layers(layers: list[DecoderLayer]) -> list[DecoderLayer]:
    """The layers whose residual input is not the previous layer's output, nor that output plus a stream addend:
    something between the two writes into the stream in a way a reduction cannot follow. A reduction must sit
    at or after the last of them."""
    adds = stream_addends(layers)
    return [lay for prev, lay in zip(layers, layers[1:], strict=False)
            if lay.residual_input not in prev.nodes and lay.index not in adds]
