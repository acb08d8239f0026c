"""Graph + GraphFacts -> the LLM's final norm (between the last decoder layer and the LM head) as a module
of its own, so a selector can read any layer's hidden states through it (DART's similarity space)."""

from __future__ import annotations

from torch import fx

from ..errors import AnalysisError
from .facts import GraphFacts
from .graph_utils import module_from_nodes
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
    return module_from_nodes(gm, body, x_in, body[-1], f"the final norm ({path})")
