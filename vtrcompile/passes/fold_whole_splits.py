"""Graph -> the same graph without splits into one chunk (the chunk is the whole tensor).

Hugging Face encoders split their output per image with sizes read from `image_grid_thw` (`.tolist()`), which
export records as `split_with_sizes(x, [item(...)])`: with one image per prompt there is one chunk, equal to x,
but its size is a data-dependent symbol that fake-tensor passes (FLOP counting) cannot evaluate and engines
would carry as a scalar read. `getitem(split, 0)` becomes `x`; the split and the scalar reads that fed only it
drop out.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .base import PassResult, finish_transform

_SPLITS = {torch.ops.aten.split_with_sizes.default, torch.ops.aten.split.Tensor}


def fold_whole_splits(gm: fx.GraphModule, config=None) -> PassResult:
    """Needs: a captured graph (any point of the pipeline). Declines splits into several chunks."""
    graph = gm.graph
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _SPLITS:
            continue
        sizes = node.args[1]
        if node.target is torch.ops.aten.split_with_sizes.default and not (isinstance(sizes, (list, tuple))
                                                                           and len(sizes) == 1):
            continue
        if node.target is torch.ops.aten.split.Tensor:
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            x = node.args[0].meta.get("val")
            if x is None or not (isinstance(sizes, int) and sizes >= int(x.shape[dim])):
                continue
        users = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in users):
            continue
        for u in users:
            u.replace_all_uses_with(node.args[0])
            graph.erase_node(u)
        graph.erase_node(node)
        folded += 1
    if not folded:
        return PassResult(gm, False, facts={"folded": 0})
    changed = True
    while changed:  # `item` is impure to FX: drop the scalar reads left without users explicitly
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op == "call_function" and not node.users and node.target is torch.ops.aten.item.default:
                graph.erase_node(node)
                changed = True
    finish_transform(gm)
    return PassResult(gm, True, facts={"folded": folded})
