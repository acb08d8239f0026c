"""Read `nn_module_stack` provenance and use-def structure of FX nodes (never node names)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import fx


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """[(module path, class name)], outermost first; empty for nodes with no provenance."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, typ in stack.values():
        name = typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"
        out.append((path, name))
    return out


def module_paths(node: fx.Node) -> set[str]:
    return {p for p, _ in module_stack(node)}


def innermost_list_item(node: fx.Node) -> str | None:
    """The deepest enclosing module that is an item of a ModuleList ('...layers.3'), if any."""
    for path, _ in reversed(module_stack(node)):
        if path.rsplit(".", 1)[-1].isdigit():
            return path
    return None


def item_index(path: str) -> int:
    return int(path.rsplit(".", 1)[-1])



def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    return _reach(nodes, lambda n: n.all_input_nodes)


def descendants(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    return _reach(nodes, lambda n: n.users)


def _reach(nodes: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    """Every node reached from `nodes` by one or more steps (the start nodes only where a step leads back)."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        for a in step(stack.pop()):
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def val(node: fx.Node):
    return node.meta.get("val")


def shape(node: fx.Node) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None



def through_unary(node: fx.Node, passthrough) -> fx.Node:
    """Follow single-tensor-input ops (casts, unsqueeze, ...) upstream."""
    while node.op == "call_function" and node.target in passthrough and node.all_input_nodes:
        node = node.args[0]
    return node
