"""Graph + GraphFacts -> the vision-tower tensors the vision-site methods read (feature layer and next)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ..errors import AnalysisError
from .facts import GraphFacts
from .find_decoder_layers import SDPA, layer_nodes, qk_projections
from .graph_utils import copy_nodes


@dataclass
class VisionTaps:
    features: fx.Node  # h_f: the feature layer's output hidden states, CLS first [B, N+1, C]
    patches: fx.Node  # what the projector consumes [B, N, C] (CLS removed for the default strategy)
    attention: fx.Node  # the feature layer's attention op (q, k [B, H, N+1, d], its scale)
    k_proj: fx.Node | None  # the feature layer's key projection [B, N+1, C]
    next_q_proj: fx.Node | None  # the next layer's query / key projections of layer_norm1(h_f)
    next_k_proj: fx.Node | None
    has_cls: bool


def find_vision_taps(gm: fx.GraphModule, facts: GraphFacts) -> VisionTaps:
    v = facts.vision
    f_path = v.layers[v.feature_layer]
    f_nodes = layer_nodes(gm, f_path)
    att = [n for n in f_nodes if n.op == "call_function" and n.target == SDPA]
    if len(att) != 1:
        raise AnalysisError(f"{f_path}: expected one attention op in the feature layer, found {len(att)}")
    patches = facts.projector.input
    features = patches.args[0] if v.drops_cls else patches
    if not (isinstance(features, fx.Node) and features.meta.get("val") is not None):
        raise AnalysisError("cannot find the feature layer's output hidden states before the projector")
    _, k_proj = qk_projections(att[0], f_nodes)
    nq = nk = None
    if v.feature_layer + 1 < len(v.layers):
        n_nodes = layer_nodes(gm, v.layers[v.feature_layer + 1])
        n_att = [n for n in n_nodes if n.op == "call_function" and n.target == SDPA]
        if len(n_att) == 1:
            nq, nk = qk_projections(n_att[0], n_nodes)
    # A CLS token is known to be there when the model slices it off before the projector (LLaVA's
    # 'default' strategy); without that slice the first token cannot be told from a patch.
    return VisionTaps(features, patches, att[0], k_proj, nq, nk, has_cls=v.drops_cls)


def apply_projector(gm: fx.GraphModule, facts: GraphFacts, x: fx.Node, after: fx.Node) -> list[fx.Node]:
    """The projector's nodes copied inline after `after`, applied to new vision tokens x [B, n, C] -> [B, n, D]
    (the last node returned), sharing gm's weights and keeping the projector's provenance: the rewritten graph
    still shows a projector between the tower and the LLM, where the analysis of a later site looks for it."""
    pj = facts.projector
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    start, end = order[pj.input], order[pj.output]
    body = [n for n in gm.graph.nodes if start < order[n] <= end and n.op == "call_function"
            and pj.module in {p for p, _ in (n.meta.get("nn_module_stack") or {}).values()}]
    return copy_nodes(gm, body, pj.input, x, pj.output, after, f"the projector ({pj.module})")
