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


# --- replace_image_row_additions: the DeepStack write as an addend with a sequence dimension -------------------

def test_the_addend_equals_the_write_it_replaces():
    """x + image_rows_addend(f) == put_image_block_rows(x, s, image_block_rows(x, s) + f), to the bit, and is
    zero outside the block."""
    from vtrcompile.methods.tensor_ops import image_rows_addend

    torch.manual_seed(1)
    ids = torch.tensor([[1, 2, 9, 9, 9, 3], [9, 9, 9, 4, 5, 6]])
    x, f = torch.randn(2, 6, 4), torch.randn(6, 4)
    start = first_image_row(ids, 9)
    a = image_rows_addend(f, start, ids, 3)
    assert torch.equal(x + a, put_image_block_rows(x, start, image_block_rows(x, start, 3) + f, 3))
    assert torch.equal(a[ids != 9], torch.zeros(6, 4))


def test_deepstack_writes_become_addends_with_the_same_logits():
    from vtrcompile.methods.tensor_ops import image_rows_addend
    from vtrcompile.passes.analysis import analyze
    from vtrcompile.passes.find_decoder_layers import inputs_written_between_layers, stream_addends
    from vtrcompile.passes.replace_image_row_additions import replace_image_row_additions

    src, gm = _graph("qwen3vl-tiny")
    replace_image_index_writes(gm)
    facts = analyze(gm)
    assert [lay.index for lay in inputs_written_between_layers(facts.layers)] == [1, 2]  # writes: refused sites
    cfg = src.hf_model.config
    prompts = [src.inputs(*example_prompt(cfg, pre, suf, seed=i)[:2]) for i, (pre, suf) in enumerate([(5, 8), (0, 3)])]
    with torch.no_grad():
        want = [gm(*p) for p in prompts]
    res = replace_image_row_additions(gm)
    assert res.modified and res.facts["rewritten"] == 2
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert put_image_block_rows not in targets and targets.count(image_rows_addend) == 2
    facts = analyze(gm)
    assert inputs_written_between_layers(facts.layers) == []
    adds = stream_addends(facts.layers)
    assert sorted(adds) == [1, 2] and all(d.target is image_rows_addend for d in adds.values())
    with torch.no_grad():
        for p, w in zip(prompts, want, strict=True):
            assert max_diff(gm(*p), w) == 0.0


def test_a_write_that_is_not_an_addition_is_left_alone():
    """A write of rows that do not add to the rows read (here: an overwrite) stays a write, and the layer after
    it stays a refused site."""
    from vtrcompile.passes.replace_image_row_additions import replace_image_row_additions

    src, gm = _graph("qwen3vl-tiny")
    replace_image_index_writes(gm)
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is put_image_block_rows:
            value = n.args[2]
            n.replace_input_with(value, value.args[1])  # put f instead of rows + f
    gm.graph.eliminate_dead_code()
    gm.recompile()
    before = [str(n) for n in gm.graph.nodes]
    res = replace_image_row_additions(gm)
    assert not res.modified and [str(n) for n in gm.graph.nodes] == before


@pytest.mark.parametrize("preset", ["tiny", "qwen2vl-tiny"])
def test_graphs_without_image_row_writes_are_left_alone_by_the_addend_pass(preset):
    from vtrcompile.passes.replace_image_row_additions import replace_image_row_additions

    _, gm = _graph(preset)
    replace_image_index_writes(gm)
    before = [str(n) for n in gm.graph.nodes]
    assert not replace_image_row_additions(gm).modified and [str(n) for n in gm.graph.nodes] == before
