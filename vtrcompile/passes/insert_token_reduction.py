"""Graph + Reduction -> graph whose layers from the site on see a shorter sequence.

The rewrite replaces the residual stream entering decoder layer l with a gathered one, and every
per-sequence side input (length symbol, rotary cos/sin, mask) of the nodes downstream with its
reduced version, so all later shapes follow. Site `projector` is the same rewrite at layer 0, with
a selector that reads the projected image features.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

from ..errors import VtrError
from ..methods.tensor_ops import (
    apply_image_mix,
    block_order,
    drop_block_index,
    first_image_row,
    gather_dim,
    gather_seq_dims,
    renumbered_index,
    sequence_index,
    write_image_block,
)
from .analysis import analyze
from .base import PassResult, finish_transform
from .facts import DecoderLayer
from .find_decoder_layers import inputs_written_between_layers
from .find_final_norm import final_norm_module
from .find_vision_taps import VisionTaps, find_vision_taps, projector_module
from .graph_utils import refresh_meta, stable_topological_sort, tag_provenance
from .provenance import descendants, val

log = logging.getLogger(__name__)


@dataclass
class SelectorInputs:
    """Graph nodes a selector may read at its site."""

    image_start: fx.Node  # [B] first image row
    image_features: fx.Node  # [B*N, D] projector output (all N tokens)
    hidden: fx.Node  # [B, S_l, D] residual stream entering the site's layer
    previous: DecoderLayer | None  # layer l-1 (its attention q/k/mask/scale), None at layer 0
    n_image: int  # image tokens present at this site
    n_image_full: int  # N
    batch: int
    seq_len: fx.Node  # S_l
    vision: VisionTaps | None = None  # site `vision` only
    final_norm: fx.Node | None = None  # [B, S_l, D] `hidden` through the LLM's final norm (Reduction.needs)


# A selector returns (function, args, kwargs) for one inserted call. Its result is kept [B, keep]:
# image-relative indices into the image tokens present at the site, in output order; for a merging
# method (Reduction.merges) the pair (kept, mix [B, keep, n_image]) whose rows say what each kept
# row becomes. keep == 0 (drop every image token) needs no selector. At site `vision` the result is
# the new vision tokens [B, keep, C] before the projector; the pass applies (a copy of) the projector.
Selector = Callable[[SelectorInputs], tuple[Callable, tuple, dict]]


@dataclass
class Reduction:
    method: str
    layer: int  # the decoder layer whose input is reduced (0 for site `projector`)
    count: int  # image tokens this site leaves (the `keep` of `positions` is a different thing)
    positions: str  # "keep" | "renumber"
    selector: Selector | None
    site: str = "llm"
    merges: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    recorded: dict[str, Any] = field(default_factory=dict)  # constants the engine metadata must carry
    needs: tuple[str, ...] = ()  # optional selector inputs to build: "final_norm"


def _ungathered(node: fx.Node) -> fx.Node:
    """A side tensor before the gathers that earlier reductions inserted."""
    while node.op == "call_function" and node.target is gather_seq_dims:
        node = node.args[0]
    return node


def _size_expr(node: fx.Node, dim: int):
    s = val(node).shape[dim]
    return s.node.expr if isinstance(s, torch.SymInt) else sympy.Integer(s)


def _check_later_inputs(layers: list[DecoderLayer], red: Reduction) -> None:
    """Refuse a site before a layer whose input is written outside the decoder layers (an op between layer
    j-1 and layer j, e.g. Qwen3-VL's DeepStack adding vision features at the image positions): that write
    indexes the full-length sequence, so the reduction must come after it."""
    late = [lay for lay in inputs_written_between_layers(layers) if lay.index > red.layer]
    if late:
        last = late[-1]
        where = "the projector" if red.site != "llm" else f"layer {red.layer}"
        raise VtrError(f"{red.method}: the input of {last.module} is written between decoder layers "
                       f"({last.residual_input.target}, e.g. DeepStack vision features added at the image "
                       f"positions), so a reduction at {where} cannot come before it; use an llm@ method at layer "
                       f">= {last.index} (fastv: --layer {last.index} or later)")


def insert_token_reduction(gm: fx.GraphModule, red: Reduction) -> PassResult:
    """Needs: strip_runtime_asserts (a graph the analysis passes understand). Re-runs the analysis."""
    facts = analyze(gm)
    if not 0 <= red.layer < len(facts.layers):
        raise VtrError(f"{red.method}: layer {red.layer} is outside the LLM's {len(facts.layers)} layers")
    layer = facts.layers[red.layer]
    _check_later_inputs(facts.layers, red)
    h = layer.residual_input
    dropped = sympy.simplify(facts.seq_symbol - _size_expr(h, 1))
    if not dropped.is_Integer:
        raise VtrError(f"{layer.module}: the sequence length there ({_size_expr(h, 1)}) is not the prompt "
                       "length minus a constant; cannot place a reduction")
    n_here = facts.boundary.n_image - int(dropped)
    if not (0 if red.selector is None else 1) <= red.count <= n_here:
        raise VtrError(f"{red.method}: keep {red.count} is outside 1..{n_here}, the image tokens at {layer.module}")

    g = gm.graph
    new: list[fx.Node] = []
    cursor = h

    def add(fn, args, kwargs=None, label="reduction") -> fx.Node:
        nonlocal cursor
        with g.inserting_after(cursor):
            n = g.call_function(fn, tuple(args), kwargs or {})
        tag_provenance(n, h, f"{red.method}.{label}")
        new.append(n)
        cursor = n
        return n

    side = facts.side[layer.index]
    seq_nodes = [s.node for s in side if s.role == "seq_len"]
    seq = seq_nodes[0] if seq_nodes else add(torch.ops.aten.sym_size.int, (h, 1))
    start = add(first_image_row, (facts.boundary.input_ids,), {"image_token_id": facts.boundary.image_token_id},
                "selector")
    inputs = SelectorInputs(start, facts.boundary.image_features, h,
                            facts.layers[red.layer - 1] if red.layer > 0 else None, n_here,
                            facts.boundary.n_image, facts.boundary.batch, seq)
    if "final_norm" in red.needs:
        name = f"vtrcompile_final_norm_{red.layer}"
        gm.add_submodule(name, final_norm_module(gm, facts))
        with g.inserting_after(cursor):
            inputs.final_norm = g.call_module(name, (h,))
        tag_provenance(inputs.final_norm, h, f"{red.method}.selector")
        new.append(inputs.final_norm)
        cursor = inputs.final_norm
    mix = rows = None
    if red.site == "vision":
        if red.layer != 0 or n_here != facts.boundary.n_image:
            raise VtrError(f"{red.method}: a vision-site reduction must come first, at the projector input")
        inputs.vision = find_vision_taps(gm, facts)
        fn, args, kwargs = red.selector(inputs)
        feats = add(fn, args, kwargs, "selector")
        name = f"vtrcompile_projector_{red.method}"
        gm.add_submodule(name, projector_module(gm, facts))
        with g.inserting_after(cursor):
            rows = g.call_module(name, (feats,))
        tag_provenance(rows, h, f"{red.method}.selector")
        new.append(rows)
        cursor = rows
        kept = add(block_order, (rows,), None, "selector")
        idx = add(sequence_index, (start, kept, seq), {"n_image": n_here}, "selector")
    elif red.selector is None:
        idx = add(drop_block_index, (start, seq, n_here), None, "selector")
    else:
        fn, args, kwargs = red.selector(inputs)
        kept = add(fn, args, kwargs, "selector")
        if red.merges:
            kept, mix = (add(operator.getitem, (kept, i), None, "selector") for i in (0, 1))
        idx = add(sequence_index, (start, kept, seq), {"n_image": n_here}, "selector")
    # At the vision site every image row is new: gather the text rows from the plain embeddings, so
    # that the original projector and image merge become dead code and drop out of the engine.
    source = facts.boundary.text_embeds if rows is not None else h
    h2 = add(gather_dim, (source, idx, 1), None, "gather")
    if mix is not None:
        h2 = add(apply_image_mix, (h2, h, start, mix, n_here), None, "selector")
    if rows is not None:
        h2 = add(write_image_block, (h2, start, rows), None, "gather")
    pos = idx if red.positions == "keep" else add(renumbered_index, (idx,), None, "gather")
    s2 = add(torch.ops.aten.sym_size.int, (h2, 1), None, "gather")

    added = set(new)
    for user in list(h.users):
        if user not in added:
            user.replace_input_with(h, h2)
    downstream_layers = {n for lay in facts.layers[red.layer:] for n in lay.nodes}
    region = (downstream_layers | descendants([h2])) - added
    replace: dict[fx.Node, fx.Node] = {}
    for st in side:
        if st.role == "seq_len":
            replace[st.node] = s2
        elif st.role == "mask":
            replace[st.node] = add(gather_seq_dims, (st.node, idx, st.seq_dims), None, "gather")
        elif st.role == "rotary":
            # `keep`: the rows keep the positions they have here; `renumber`: positions 0..S'-1, read from
            # the table before any earlier site gathered it (an earlier `keep` site left gaps in this one).
            table = st.node if red.positions == "keep" else _ungathered(st.node)
            replace[st.node] = add(gather_seq_dims, (table, pos, st.seq_dims), None, "gather")
    for n in region:
        for old, rep in replace.items():
            if old in n.all_input_nodes:
                n.replace_input_with(old, rep)
    stable_topological_sort(g)
    finish_transform(gm)
    refresh_meta(gm)
    log.info("%s: layer %d keeps %d of %d image tokens", red.method, red.layer, red.count, n_here)
    return PassResult(gm, True, facts={"layer": red.layer, "count": red.count, "n_image": n_here,
                                        "inserted": len(new)})
