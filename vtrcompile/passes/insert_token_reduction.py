"""Graph + Reduction -> graph whose layers from the site on see a shorter sequence.

The rewrite replaces the residual stream entering decoder layer l with a gathered one, and every
per-sequence side input (length symbol, rotary cos/sin, mask) of the nodes downstream with its
reduced version, so all later shapes follow. Site `projector` is the same rewrite at layer 0, with
a selector that reads the projected image features.
"""

from __future__ import annotations

import dataclasses
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
    constant_rows,
    drop_block_index,
    first_image_row,
    gather_dim,
    gather_seq_dims,
    merge_image_block,
    patch_features,
    patch_rows,
    renumbered_index,
    rows_after_selection,
    sequence_index,
    shift_rows,
    view_order,
    with_rows,
    with_rows_merged,
)
from .analysis import analyze
from .base import PassResult, finish_transform
from .facts import DecoderLayer
from .find_decoder_layers import inputs_written_between_layers, stream_addends
from .find_final_norm import final_norm_module
from .find_vision_taps import VisionTaps, apply_projector, find_vision_taps
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
    # Patch counts of the image block's parts, in order, where the block has parts (ImageLayout.segments; only
    # while the block is unreduced), else None.
    segments: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ImageLayout:
    """Rows of the image block that are not patches (LLaVA-NeXT's row ends): every site keeps them and no
    selector sees them as image tokens. A selector runs on a view of the sequence in which these rows sit just
    before the image block (so the block holds patches only) with their attention mask and positions moved
    along, which leaves every attention score as it was; its choice is mapped back and the rows added."""

    protected: tuple[int, ...]  # image-relative rows of the unreduced block, ascending
    segments: tuple[int, ...] = ()  # patch counts of the block's parts in order (e.g. base, hi-res)
    why: str = "rows that are not patches"


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
    layout: ImageLayout | None = None  # the model's non-patch image rows, when it has any

# gm.meta key: (rows [B, p] of the protected rows in the block a site left, that site's kept block rows).
PROTECTED = "vtrcompile_protected_rows"


def _ungathered(node: fx.Node) -> fx.Node:
    """A side tensor before the gathers that earlier reductions inserted."""
    while node.op == "call_function" and node.target is gather_seq_dims:
        node = node.args[0]
    return node


def _size_expr(node: fx.Node, dim: int):
    s = val(node).shape[dim]
    return s.node.expr if isinstance(s, torch.SymInt) else sympy.Integer(s)


def _check_later_inputs(layers: list[DecoderLayer], red: Reduction) -> dict[int, fx.Node]:
    """Refuse a site before a layer whose input is written outside the decoder layers in a way the reduction
    cannot follow (an op between layer j-1 and layer j that indexes the full-length sequence): the reduction
    must come after it. Return the stream addends of the later layers ({j: [B, S, D]}, e.g. Qwen3-VL's DeepStack
    features on the image rows, after replace_image_row_additions), which the reduction gathers instead."""
    late = [lay for lay in inputs_written_between_layers(layers) if lay.index > red.layer]
    where = "the projector" if red.site != "llm" else f"layer {red.layer}"
    if late:
        last = late[-1]
        raise VtrError(f"{red.method}: the input of {last.module} is written between decoder layers "
                       f"({last.residual_input.target}, e.g. DeepStack vision features added at the image "
                       f"positions), so a reduction at {where} cannot come before it; use an llm@ method at layer "
                       f">= {last.index} (fastv: --layer {last.index} or later)")
    adds = {j: d for j, d in stream_addends(layers).items() if j > red.layer}
    if adds and (red.merges or red.site == "vision"):
        kind = "merges tokens" if red.merges else "replaces the image block with new tokens"
        raise VtrError(f"{red.method}: the inputs of layers {', '.join(map(str, adds))} add a tensor at the image "
                       f"rows (e.g. DeepStack vision features), and a method at {where} that {kind} leaves rows "
                       "that are no single original token, so which addition each gets is not defined; use a "
                       f"selecting method there, or a site at layer >= {max(adds)}")
    return adds


def insert_token_reduction(gm: fx.GraphModule, red: Reduction) -> PassResult:
    """Needs: strip_runtime_asserts (a graph the analysis passes understand). Re-runs the analysis."""
    facts = analyze(gm)
    if not 0 <= red.layer < len(facts.layers):
        raise VtrError(f"{red.method}: layer {red.layer} is outside the LLM's {len(facts.layers)} layers")
    layer = facts.layers[red.layer]
    addends = _check_later_inputs(facts.layers, red)
    h = layer.residual_input
    dropped = sympy.simplify(facts.seq_symbol - _size_expr(h, 1))
    if not dropped.is_Integer:
        raise VtrError(f"{layer.module}: the sequence length there ({_size_expr(h, 1)}) is not the prompt "
                       "length minus a constant; cannot place a reduction")
    n_here = facts.boundary.n_image - int(dropped)
    n_protected = len(red.layout.protected) if red.layout else 0
    if n_protected and red.site == "vision":
        raise VtrError(f"{red.method}: a vision-site method rewrites the whole image block, and this model's "
                       f"block holds {red.layout.why}; use a projector or llm@ method")
    if not (0 if red.selector is None else 1) <= red.count <= n_here - n_protected:
        raise VtrError(f"{red.method}: keep {red.count} is outside 1..{n_here - n_protected}, the image tokens at "
                       f"{layer.module}")

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
    rows = patches = None
    if n_protected:
        rows, patches, inputs = _protected_view(gm, red, facts, inputs, add)
    if "final_norm" in red.needs:
        name = f"vtrcompile_final_norm_{red.layer}"
        gm.add_submodule(name, final_norm_module(gm, facts))
        with g.inserting_after(cursor):
            inputs.final_norm = g.call_module(name, (inputs.hidden,))
        tag_provenance(inputs.final_norm, h, f"{red.method}.selector")
        new.append(inputs.final_norm)
        cursor = inputs.final_norm
    mix = block = None
    if red.site == "vision":
        if red.layer != 0 or n_here != facts.boundary.n_image:
            raise VtrError(f"{red.method}: a vision-site reduction must come first, at the projector input")
        inputs.vision = find_vision_taps(gm, facts)
        fn, args, kwargs = red.selector(inputs)
        feats = add(fn, args, kwargs, "selector")
        projected = apply_projector(gm, facts, feats, cursor)
        new += projected
        block = cursor = projected[-1]
        kept = add(block_order, (block,), None, "selector")
    elif red.selector is None:
        kept = rows
    else:
        fn, args, kwargs = red.selector(inputs)
        kept = add(fn, args, kwargs, "selector")
        if red.merges:
            kept, mix = (add(operator.getitem, (kept, i), None, "selector") for i in (0, 1))
        if rows is not None and mix is None:
            kept = add(with_rows, (kept, patches, rows), None, "selector")
        elif rows is not None:
            both = add(with_rows_merged, (kept, mix, patches, rows, n_here), None, "selector")
            kept, mix = (add(operator.getitem, (both, i), None, "selector") for i in (0, 1))
    if kept is None:
        idx = add(drop_block_index, (start, seq, n_here), None, "selector")
    else:
        idx = add(sequence_index, (start, kept, seq), {"n_image": n_here}, "selector")
    if rows is not None:
        gm.meta[PROTECTED] = (rows, kept)
    # At the vision site every image row is new: gather the text rows from the plain embeddings, so
    # that the original projector and image merge become dead code and drop out of the engine.
    source = facts.boundary.text_embeds if block is not None else h
    h2 = add(gather_dim, (source, idx, 1), None, "gather")
    if mix is not None:
        h2 = add(apply_image_mix, (h2, h, start, mix, n_here), None, "selector")
    if block is not None:
        # The new block enters the shorter sequence as the model's own image merge would (merge_image_block at
        # the gathered placeholders): a later site's analysis finds it there as the boundary, with n rows.
        ids = add(gather_dim, (facts.boundary.input_ids, idx, 1), None, "gather")
        h2 = add(merge_image_block, (h2, ids, block),
                 {"image_token_id": facts.boundary.image_token_id, "n_image": red.count}, "gather")
    pos = idx if red.positions == "keep" else add(renumbered_index, (idx,), None, "gather")
    s2 = add(torch.ops.aten.sym_size.int, (h2, 1), None, "gather")

    added = set(new)
    for user in list(h.users):
        if user not in added:
            user.replace_input_with(h, h2)
    downstream_layers = {n for lay in facts.layers[red.layer:] for n in lay.nodes}
    region = (downstream_layers | descendants([h2])) - added
    replace: dict[fx.Node, fx.Node] = {}
    for d in addends.values():  # a later layer's addition to the image rows follows the rows kept
        replace[d] = add(gather_seq_dims, (d, idx, (1,)), None, "gather")
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
    log.info("%s: layer %d keeps %d of %d image tokens%s", red.method, red.layer, red.count + n_protected, n_here,
             f" ({n_protected} of them {red.layout.why}, kept)" if n_protected else "")
    return PassResult(gm, True, facts={"layer": red.layer, "count": red.count + n_protected, "n_image": n_here,
                                        "inserted": len(new)})


def _protected_view(gm: fx.GraphModule, red: Reduction, facts, inputs: SelectorInputs, add):
    """The protected rows at this site ([B, p]: constants at the first site, else where the previous site left
    them), the patch rows [B, n - p], and the selector's inputs on the view (ImageLayout)."""
    lay, n_here, start = red.layout, inputs.n_image, inputs.image_start
    p = len(lay.protected)
    earlier = gm.meta.get(PROTECTED)
    if earlier is None:
        if n_here != facts.boundary.n_image:
            raise VtrError(f"{red.method}: the image block was reduced before this site without keeping "
                           f"{lay.why}; put every reduction through the same layout")
        rows = add(constant_rows, (start, list(lay.protected)), None, "selector")
    else:
        rows = add(rows_after_selection, earlier, None, "selector")
    patches = add(patch_rows, (rows, n_here), None, "selector")
    order = add(view_order, (rows, patches), None, "selector")
    seq_view = add(sequence_index, (start, order, inputs.seq_len), {"n_image": n_here}, "selector")
    def moved(node: fx.Node, fn, *args) -> fx.Node:
        out = add(fn, (node, seq_view, *args), None, "selector")
        out.meta["val"] = val(node)  # a permutation of the sequence: same shape (selectors read shapes)
        return out

    prev = inputs.previous
    if prev is not None:
        changes = {"q": moved(prev.q, gather_dim, 2), "k": moved(prev.k, gather_dim, 2),
                   "v": moved(prev.v, gather_dim, 2)}
        if prev.mask is not None:
            changes["mask"] = moved(prev.mask, gather_seq_dims, (2, 3))
        if prev.k_proj is not None:
            changes["k_proj"] = moved(prev.k_proj, gather_dim, 1)
        prev = dataclasses.replace(prev, **changes)
    n_full = facts.boundary.n_image
    first = earlier is None
    full_patches = patches if first else add(patch_rows, (add(constant_rows, (start, list(lay.protected)), None,
                                                               "selector"), n_full), None, "selector")
    feats = add(patch_features, (inputs.image_features, full_patches, inputs.batch, n_full), None, "selector")
    f = val(inputs.image_features)
    feats.meta["val"] = f.reshape(inputs.batch, n_full, f.shape[-1])[:, :n_full - p].reshape(-1, f.shape[-1])
    view = dataclasses.replace(
        inputs, image_start=add(shift_rows, (start, p), None, "selector"), image_features=feats,
        hidden=moved(inputs.hidden, gather_dim, 1), previous=prev,
        n_image=n_here - p, n_image_full=n_full - p, segments=tuple(lay.segments) if first and lay.segments else None)
    return rows, patches, view
