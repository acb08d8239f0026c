"""Keep the pass invariants after a rewrite: graph order is topological and meta['val'] is right."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

log = logging.getLogger(__name__)


def stable_topological_sort(graph: fx.Graph) -> None:
    """Move nodes after their inputs, keeping the original order wherever it is already valid."""
    placed: set[fx.Node] = set()
    pending: list[fx.Node] = []
    cursor: fx.Node | None = None
    order = list(graph.nodes)

    def place(n: fx.Node) -> None:
        nonlocal cursor
        if cursor is None:
            if n is not order[0]:
                order[0].prepend(n)
        else:
            cursor.append(n)
        cursor = n
        placed.add(n)

    for n in order:
        pending.append(n)
        progress = True
        while progress:
            progress = False
            for p in list(pending):
                if all(a in placed for a in p.all_input_nodes):
                    pending.remove(p)
                    place(p)
                    progress = True
    if pending:
        raise RuntimeError(f"graph has a cycle through {pending[0]}")


# meta key: what a node computed when its meta["val"] was last propagated (op, target, arguments by node name)
_SIGNATURE = "vtrcompile_meta_signature"


def _signature(n: fx.Node) -> str:
    return repr((n.op, n.target, fx.node.map_arg((n.args, n.kwargs), lambda a: a.name)))


def _meta_key(v: Any) -> Any:
    """What meta["val"] says about a value, comparable across propagations: sizes, strides (symbolic ones as
    their expressions), dtype and device of each tensor; symbolic and plain numbers as text."""
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(map(str, v.shape)), tuple(map(str, v.stride())), v.dtype, v.device)
    if isinstance(v, (list, tuple)):
        return tuple(_meta_key(x) for x in v)
    return ("value", str(v)) if v is not None else None


class _IncrementalProp(FakeTensorProp):
    """FakeTensorProp that re-runs only the nodes a rewrite touched: a call whose meta["val"] was propagated
    before, whose op and arguments are unchanged since then, and none of whose inputs now has other sizes,
    keeps its meta. Weights (get_attr), submodule calls and placeholders are always propagated."""

    def __init__(self, gm: fx.GraphModule, mode) -> None:
        super().__init__(gm, mode)
        self.changed: set[fx.Node] = set()
        self.rerun = 0

    def run_node(self, n: fx.Node) -> Any:
        sig = _signature(n)
        if n.op in ("call_function", "call_method") and "val" in n.meta and n.meta.get(_SIGNATURE) == sig and \
                not any(a in self.changed for a in n.all_input_nodes):
            return n.meta["val"]
        before = _meta_key(n.meta.get("val"))
        result = super().run_node(n)
        self.rerun += n.op in ("call_function", "call_method")
        n.meta[_SIGNATURE] = sig
        if _meta_key(n.meta.get("val")) != before:
            self.changed.add(n)
        return result


def mark_meta_current(gm: fx.GraphModule) -> None:
    """Take every node's meta["val"] as right as it is (a graph just captured by torch.export), so that the first
    refresh_meta after a rewrite propagates only what the rewrite touched."""
    for n in gm.graph.nodes:
        if "val" in n.meta:
            n.meta[_SIGNATURE] = _signature(n)


def refresh_meta(gm: fx.GraphModule, full: bool = False) -> int:
    """Recompute meta['val'] (fake tensors with the capture's symbolic sizes) where a rewrite made it stale:
    new nodes, nodes whose op or arguments changed, and everything downstream whose sizes change with them
    (`full`: every node, as FakeTensorProp does). Returns how many calls it propagated."""
    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    mode = next(v.fake_mode for v in vals if isinstance(v, torch._subclasses.FakeTensor))
    if full:
        for n in gm.graph.nodes:
            n.meta.pop(_SIGNATURE, None)
    prop = _IncrementalProp(gm, mode)
    prop.propagate_dont_convert_inputs(*vals)
    log.debug("refresh_meta: %d of %d nodes propagated", prop.rerun, len(gm.graph.nodes))
    return prop.rerun


def tag_provenance(node: fx.Node, anchor: fx.Node, label: str) -> None:
    """Inserted nodes carry the anchor's module stack plus a vtrcompile entry, so that reports
    (and the ONNX node metadata after re-export) can tell selector ops from model ops."""
    stack = dict(anchor.meta.get("nn_module_stack") or {})
    stack[f"vtrcompile.{label}"] = (f"vtrcompile.{label}", f"vtrcompile.reduction.{label}")
    node.meta["nn_module_stack"] = stack


def _check_reads(body: list[fx.Node], x_in: fx.Node, what: str) -> None:
    """A body node may read x_in, another body node or a weight (get_attr); anything else is an error."""
    from ..errors import AnalysisError

    inside = set(body) | {x_in}
    for n in body:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr":
                raise AnalysisError(f"{what}: node {n.name} reads {a.name}, which is neither its input nor a "
                                    "weight; cannot re-apply it")


def module_from_nodes(gm: fx.GraphModule, body: list[fx.Node], x_in: fx.Node, out: fx.Node, what: str
                      ) -> fx.GraphModule:
    """`body` (nodes of gm, graph order) as a GraphModule of their own, forward(x) with x standing for `x_in`,
    sharing gm's weights: so a pass can apply a copy of a module (the final norm) elsewhere.
    A body node that reads anything other than x_in, another body node or a weight is an error."""
    _check_reads(body, x_in, what)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {x_in: g.placeholder("x")}
    for n in body:
        for a in n.all_input_nodes:
            if a not in env:
                env[a] = g.get_attr(a.target)
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[out])
    return fx.GraphModule(gm, g)


def copy_nodes(gm: fx.GraphModule, body: list[fx.Node], x_in: fx.Node, x: fx.Node, out: fx.Node, after: fx.Node,
               what: str) -> list[fx.Node]:
    """`body` (nodes of gm, graph order) applied again, inline, to `x` in place of `x_in`, inserted after
    `after`: the copies keep the originals' provenance (a module re-applied is still that module), read the
    same weights, and end with the copy of `out`. Returns the copies, in order."""
    _check_reads(body, x_in, what)
    env: dict[fx.Node, fx.Node] = {x_in: x}
    copies = []
    cursor = after
    for n in body:
        with gm.graph.inserting_after(cursor):
            cursor = env[n] = gm.graph.node_copy(n, lambda a: env.get(a, a))
        copies.append(cursor)
    assert copies[-1] is env[out]
    return copies


def take_provenance(new: fx.Node, old: fx.Node) -> None:
    """`new` stands for `old` in reports: it gets old's meta (module stack and the like), not its value."""
    new.meta.update({k: v for k, v in old.meta.items() if k != "val"})


def substitute(old: fx.Node, new: fx.Node) -> None:
    """`new` replaces `old`: it takes old's provenance and users, and old leaves the graph."""
    take_provenance(new, old)
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)
