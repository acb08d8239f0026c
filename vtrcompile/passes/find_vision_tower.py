"""Graph + Boundary -> the vision tower (layers, selected feature layer, CLS handling) and the projector."""

from __future__ import annotations

import torch
from torch import fx

from ..errors import AnalysisError
from .base import PassResult
from .facts import Boundary, Projector, VisionTower
from .find_decoder_layers import SDPA, external_inputs
from .provenance import ancestors, innermost_list_item, item_index, module_stack


def _common_stack(nodes: list[fx.Node]) -> list[tuple[str, str]]:
    stacks = [module_stack(n) for n in nodes]
    common = stacks[0]
    for s in stacks[1:]:
        i = 0
        while i < min(len(common), len(s)) and common[i] == s[i]:
            i += 1
        common = common[:i]
    return common


def find_vision_tower(gm: fx.GraphModule, boundary: Boundary) -> PassResult:
    """Vision attention = attention ops upstream of the image features; projector = what lies between."""
    feats = boundary.image_features
    up = ancestors([feats]) | {feats}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    att = [n for n in up if n.op == "call_function" and n.target == SDPA]
    if not att:
        raise AnalysisError("no vision encoder: no attention op lies upstream of the image features "
                            f"written at {boundary.node.name}")
    att.sort(key=order.get)
    layer_paths = sorted({p for n in att if (p := innermost_list_item(n))}, key=item_index)
    if not layer_paths:
        raise AnalysisError("vision attention ops have no enclosing ModuleList item in nn_module_stack")
    # The tower: the outermost module that holds the vision attention but not the LLM embeddings.
    outside = {p for p, _ in module_stack(boundary.node)}
    tower = next(((p, c) for p, c in module_stack(att[0]) if p not in outside), None)
    if tower is None:
        raise AnalysisError("cannot separate the vision tower's modules from the LLM's")
    # Layers after the selected one may still be in the graph (their output unused): list them too.
    layer_paths = sorted({p for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA
                          and tower[0] in {q for q, _ in module_stack(n)} and (p := innermost_list_item(n))},
                         key=item_index)
    layer_set = set(layer_paths)

    def vision_layer(n: fx.Node) -> str | None:
        p = innermost_list_item(n)
        return p if p in layer_set else None

    # Selected feature layer: the last vision-layer node upstream of the image features.
    in_layers = [n for n in up if n.op == "call_function" and vision_layer(n)]
    last = max(in_layers, key=order.get)
    feature_layer = layer_paths.index(vision_layer(last))

    # Projector: linear ops between that node and the features, outside the encoder layers (outside the
    # tower, as LLaVA's and InternVL's MLPs, or a merger module inside it, as Qwen-VL's patch merger).
    between = [n for n in up if order[n] > order[last] and n.op == "call_function" and vision_layer(n) is None]
    linears = [n for n in between if n.target == torch.ops.aten.linear.default]
    if not linears:
        raise AnalysisError("no projector: no linear op between the vision tower and the LLM boundary")
    common = _common_stack(linears)
    if not common:
        raise AnalysisError("projector linears share no enclosing module")
    proj_path, proj_cls = common[-1]
    proj_nodes = [n for n in between if proj_path in {p for p, _ in module_stack(n)}]
    proj_nodes.sort(key=order.get)
    proj_in = external_inputs(proj_nodes)
    drops_cls = any(
        n.target == torch.ops.aten.slice.Tensor and n.args[1] == 1 and n.args[2] == 1
        for n in between if order[n] < order[proj_nodes[0]])
    vt = VisionTower(tower[0], tower[1], layer_paths, feature_layer, drops_cls)
    pj = Projector(proj_path, proj_cls, proj_in[0], proj_nodes[-1])
    return PassResult(gm, False, facts=(vt, pj))
