"""An addition to the image rows written back into the stream (`h[img] = h[img] + f`, after
replace_image_index_writes: `put_image_block_rows(x, s, image_block_rows(x, s) + f)`) -> `x + a` with
`a = image_rows_addend(f, s, input_ids)`: f on the image block, zero elsewhere.

Qwen3-VL's DeepStack is the case in the wild: after each of its first k LLM layers it adds features of a vision
layer at the image positions. Written as the addition of a [B, S, D] tensor that does not depend on the stream,
the write becomes a side input with a sequence dimension: a reduction before it gathers that tensor with the rows
it keeps (insert_token_reduction), as it gathers masks and rotary tables, instead of refusing the site. The
result is the same to the bit: rows outside the block add an exact zero.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from ..methods.tensor_ops import image_block_rows, image_rows_addend, put_image_block_rows
from .base import PassResult, finish_transform
from .find_vision_llm_boundary import find_vision_llm_boundary
from .graph_utils import refresh_meta, substitute, take_provenance
from .provenance import ancestors

log = logging.getLogger(__name__)


def _addition(write: fx.Node) -> tuple[fx.Node, fx.Node] | str:
    """(x, f) when `write` puts `image_block_rows(x, s) + f` back into x at the same rows and f does not
    depend on x; else why not."""
    x, start, value = write.args[:3]
    n = write.kwargs.get("n_image")
    if not (isinstance(value, fx.Node) and value.target == torch.ops.aten.add.Tensor and len(value.args) == 2):
        return "the rows written are not a sum"
    for read, f in (value.args, value.args[::-1]):
        if (isinstance(read, fx.Node) and read.target is image_block_rows and read.args[:2] == (x, start)
                and read.kwargs.get("n_image") == n and isinstance(f, fx.Node) and x not in ancestors([f])):
            if len(read.users) != 1 or len(value.users) != 1:
                return "the rows read or their sum are used elsewhere"
            return x, f
    return "the sum does not add a term independent of the stream to the rows it read"


def replace_image_row_additions(gm: fx.GraphModule, config=None) -> PassResult:
    """Needs: replace_image_index_writes. Declines a write that is not such an addition (logged)."""
    writes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is put_image_block_rows]
    if not writes:
        log.debug("replace_image_row_additions: declined, no write to the image rows")
        return PassResult(gm, False)
    ids = find_vision_llm_boundary(gm).facts.input_ids
    g = gm.graph
    rewritten = 0
    for w in writes:
        found = _addition(w)
        if isinstance(found, str):
            log.debug("replace_image_row_additions: declined %s (%s)", w.name, found)
            continue
        x, f = found
        # x is often the model's clone of the stream (for its in-place write); the sum needs no copy
        base = x.args[0] if x.target == torch.ops.aten.clone.default and len(x.users) == 2 else x
        with g.inserting_before(w):
            addend = g.call_function(image_rows_addend, (f, w.args[1], ids), {"n_image": w.kwargs["n_image"]})
            total = g.call_function(torch.ops.aten.add.Tensor, (base, addend))
        take_provenance(addend, w)
        substitute(w, total)
        rewritten += 1
    finish_transform(gm)
    refresh_meta(gm)
    log.debug("replace_image_row_additions: %d of %d writes rewritten", rewritten, len(writes))
    return PassResult(gm, rewritten > 0, facts={"rewritten": rewritten})
