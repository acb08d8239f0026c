"""The analysis pipeline: run every find_* pass in order and collect a GraphFacts (never mutates)."""

from __future__ import annotations

from torch import fx

from .facts import GraphFacts
from .find_decoder_layers import find_decoder_layers
from .find_sequence_side_tensors import find_sequence_side_tensors
from .find_vision_llm_boundary import find_vision_llm_boundary
from .find_vision_tower import find_vision_tower
from .provenance import val


def analyze(gm: fx.GraphModule) -> GraphFacts:
    boundary = find_vision_llm_boundary(gm).facts
    vision, projector = find_vision_tower(gm, boundary).facts
    layers = find_decoder_layers(gm, boundary).facts
    side = find_sequence_side_tensors(gm, layers).facts
    s = val(boundary.input_ids).shape[1]
    seq = s.node.expr if hasattr(s, "node") else s
    return GraphFacts(boundary, vision, projector, layers, side, seq)
