"""What the analysis passes find, as dataclasses that point at FX nodes of one graph."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx


@dataclass
class Boundary:
    """The op where visual tokens enter the LLM sequence."""

    node: fx.Node  # aten.masked_scatter, or merge_image_block after replace_masked_scatter
    text_embeds: fx.Node  # [B, S, D]
    image_features: fx.Node  # projector output, [B*N, D] or [images, n, D]: B*N rows in merge order
    input_ids: fx.Node
    image_token_id: int
    n_image: int
    batch: int
    hidden_size: int


@dataclass
class VisionTower:
    module: str
    class_name: str
    layers: list[str]  # encoder layer module paths, in order
    feature_layer: int  # index of the encoder layer whose output is selected
    drops_cls: bool  # a slice [:, 1:] between the feature layer and the projector


@dataclass
class Projector:
    module: str
    class_name: str
    input: fx.Node
    output: fx.Node


@dataclass
class DecoderLayer:
    index: int
    module: str
    attention_module: str
    attention: fx.Node  # aten.scaled_dot_product_attention
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None
    scale: float | None
    enable_gqa: bool
    residual_input: fx.Node  # [B, S_l, D] entering the layer
    k_proj: fx.Node | None  # the key projection's output [B, S_l, Hk*d], before RoPE
    nodes: list[fx.Node]  # every node with this layer's provenance, graph order


@dataclass
class SideTensor:
    node: fx.Node
    role: str  # "seq_len" | "rotary" | "mask" | "other"
    seq_dims: tuple[int, ...]  # dims of size S_l (tensors only)


@dataclass
class GraphFacts:
    boundary: Boundary
    vision: VisionTower
    projector: Projector
    layers: list[DecoderLayer]
    side: dict[int, list[SideTensor]]  # per layer index: its per-sequence side inputs
    seq_symbol: object  # sympy expr of the prompt length (input_ids dim 1)
