"""replace_image_index_writes: `h[mask]` / `h[mask] = v` with mask = the image placeholders (Qwen3-VL's DeepStack)
become fixed-size gathers of the image block; the graph computes the same logits; other graphs are left alone."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import max_diff
from vtrcompile.build import capture, editable_module
from vtrcompile.methods.tensor_ops import first_image_row, image_block_rows, put_image_block_rows
from vtrcompile.models.loading import example_prompt, load_model
from vtrcompile.passes.fold_whole_splits import fold_whole_splits
from vtrcompile.passes.replace_image_index_writes import replace_image_index_writes
from vtrcompile.passes.replace_masked_scatter import replace_masked_scatter
from vtrcompile.passes.strip_runtime_asserts import strip_runtime_asserts

INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
             torch.ops.aten.nonzero.default}


def _graph(preset):
    src = load_model(preset)
    gm = editable_module(capture(src, 128))
    strip_runtime_asserts(gm)
    fold_whole_splits(gm)
    replace_masked_scatter(gm)
    return src, gm


def _index_ops(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in INDEX_OPS]


def test_inserted_ops_equal_boolean_indexing():
    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 9, 9, 9, 3], [9, 9, 9, 4, 5, 6]])
    x, rows = torch.randn(2, 6, 4), torch.randn(6, 4)
    mask = ids == 9
    start = first_image_row(ids, 9)
    assert torch.equal(image_block_rows(x, start, 3), x[mask])
    want = x.clone()
    want[mask] = rows
    got = put_image_block_rows(x, start, rows, 3)
    assert torch.equal(got, want) and not torch.equal(x, want)  # out of place


def test_deepstack_writes_become_gathers_with_the_same_logits():
    src, gm = _graph("qwen3vl-tiny")
    assert len(_index_ops(gm)) >= 2  # the two DeepStack adds (a read and a write each, or fused)
    cfg = src.hf_model.config
    prompts = [src.inputs(*example_prompt(cfg, pre, suf, seed=i)[:2]) for i, (pre, suf) in enumerate([(5, 8), (0, 3)])]
    with torch.no_grad():
        want = [gm(*p) for p in prompts]
    res = replace_image_index_writes(gm)
    assert res.modified and res.facts["rewritten"] >= 2
    assert _index_ops(gm) == []
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert put_image_block_rows in targets and image_block_rows in targets
    with torch.no_grad():
        for p, w in zip(prompts, want, strict=True):
            assert max_diff(gm(*p), w) == 0.0


@pytest.mark.parametrize("preset", ["tiny", "qwen2vl-tiny"])
def test_graphs_without_image_mask_indexing_are_left_alone(preset):
    _, gm = _graph(preset)
    before = [str(n) for n in gm.graph.nodes]
    res = replace_image_index_writes(gm)
    assert not res.modified and [str(n) for n in gm.graph.nodes] == before
