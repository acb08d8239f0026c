"""Keep the pass invariants after a rewrite: graph order is topological and meta['val'] is right."""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


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


def refresh_meta(gm: fx.GraphModule) -> None:
    """Recompute meta['val'] (fake tensors with the capture's symbolic sizes) for every node."""
    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    mode = next(v.fake_mode for v in vals if isinstance(v, torch._subclasses.FakeTensor))
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*vals)


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
