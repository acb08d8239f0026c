"""Exported graph -> the same graph without runtime asserts that ONNX and TensorRT cannot lower."""

from __future__ import annotations

import torch
from torch import fx

from .base import PassResult, finish_transform

_ASSERTS = {
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_async.msg,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


def strip_runtime_asserts(gm: fx.GraphModule, config=None) -> PassResult:
    """Drop assert nodes, then the checks that only fed them (`_is_all_true` -> item -> sym_ite -> ...).

    HF's image-token-count check is such a chain; the engines validate inputs on the host instead.
    """
    graph = gm.graph
    removed = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS:
            graph.erase_node(node)
            removed += 1
    # Dead pure checks (item, sym_ite, comparisons) go with dead-code elimination; `_is_all_true`
    # and `item` are impure to FX, so drop them explicitly once unused.
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op == "call_function" and not node.users and node.target in (
                torch.ops.aten._is_all_true.default, torch.ops.aten.item.default,
            ):
                graph.erase_node(node)
                removed += 1
                changed = True
    # ep.module() adds a guard-check submodule call; re-export re-derives guards itself.
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
            removed += 1
    if removed:
        finish_transform(gm)
    return PassResult(gm, removed > 0, facts={"removed": removed})
