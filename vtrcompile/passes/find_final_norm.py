"""Graph + GraphFacts -> the LLM's final norm (between the last decoder layer and the LM head) as a module
of its own, so a selector can read any layer's hidden states through it (DART's similarity space)."""

from __future__ import annotations

from torch import fx

from ..errors import AnalysisError
from .facts import GraphFacts
from .provenance import innermost_list_item, module_paths, module_stack


def final_norm_module(gm: fx.GraphModule, facts: GraphFacts) -> fx.GraphModule:
    """forward(x [B, S, D]) -> the final norm of x, sharing gm's weights. Found by provenance: the module of
    the first node outside the last decoder layer that consumes the layer's output."""
    last = set(facts.layers[-1].nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    users = sorted(((order[u], u, n) for n in last for u in n.users if u not in last and u.op == "call_function"
                    and module_stack(u) and innermost_list_item(u) is None), key=lambda t: t[0])
    if not users:
        raise AnalysisError("cannot find the LLM's final norm: nothing with module provenance reads the last "
                            "decoder layer's output")
    _, first, x_in = users[0]
    path = module_stack(first)[-1][0]
    body = [n for n in gm.graph.nodes if n.op == "call_function" and order[n] >= order[first]
            and path in module_paths(n)]
    g = fx.Graph()
    x = g.placeholder("x")
    env: dict[fx.Node, fx.Node] = {x_in: x}
    for n in body:
        for a in n.all_input_nodes:
            if a not in env:
                if a.op != "get_attr":
                    raise AnalysisError(f"{path}: the final norm reads {a.name}, which is neither the last layer's "
                                        "output nor a weight")
                env[a] = g.get_attr(a.target)
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[body[-1]])
    return fx.GraphModule(gm, g)
