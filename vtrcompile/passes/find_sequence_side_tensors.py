"""Decoder layers -> each layer's per-sequence side inputs: length symbol, rotary cos/sin, attention mask."""

from __future__ import annotations

import torch
from torch import fx

from ..errors import AnalysisError
from .base import PassResult
from .facts import DecoderLayer, SideTensor
from .find_decoder_layers import external_inputs
from .provenance import val


def _expr(x):
    return x.node.expr if isinstance(x, torch.SymInt) else x


def classify(node: fx.Node, seq) -> SideTensor | str:
    v = val(node)
    if isinstance(v, torch.SymInt):
        e = _expr(v)
        if e == seq:
            return SideTensor(node, "seq_len", ())
        if getattr(e, "free_symbols", set()) & getattr(seq, "free_symbols", set()):
            return f"{node.name}: a size ({e}) derived from the sequence length that the rewrite cannot map"
        return SideTensor(node, "other", ())
    if isinstance(v, torch.Tensor):
        dims = tuple(i for i, s in enumerate(v.shape) if _expr(s) == seq)
        if not dims:
            return SideTensor(node, "other", ())
        if len(dims) >= 2 or v.dtype == torch.bool:
            return SideTensor(node, "mask", dims)
        return SideTensor(node, "rotary", dims)
    return SideTensor(node, "other", ())


def find_sequence_side_tensors(gm: fx.GraphModule, layers: list[DecoderLayer]) -> PassResult:
    """For layer l: every outside input except its residual stream, classified by its sequence dims."""
    side: dict[int, list[SideTensor]] = {}
    for layer in layers:
        seq = _expr(val(layer.residual_input).shape[1])
        found = []
        for node in external_inputs(layer.nodes):
            if node is layer.residual_input:
                continue
            c = classify(node, seq)
            if isinstance(c, str):
                raise AnalysisError(f"{layer.module}: {c}")
            found.append(c)
        side[layer.index] = found
    return PassResult(gm, False, facts=side)


def rotary_origin(gm: fx.GraphModule, node: fx.Node) -> str:
    """'cos' or 'sin' for a rotary table, by the trig op that produced it (for reports only)."""
    trig = {torch.ops.aten.cos.default: "cos", torch.ops.aten.sin.default: "sin"}
    stack, seen = [(gm, node)], set()
    while stack:
        g, n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in trig:
            return trig[n.target]
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "getitem":
            src, i = n.args
            sub = next((a for a in src.args if isinstance(a, fx.Node) and a.op == "get_attr"), None)
            if sub is not None:  # a higher-order op: look inside its subgraph's i-th output
                sg = getattr(g, sub.target)
                out = next(x for x in sg.graph.nodes if x.op == "output").args[0][i]
                stack.append((sg, out))
                continue
        stack.extend((g, a) for a in n.all_input_nodes)
    return "rotary"
