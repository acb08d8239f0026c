"""insert_cache_outputs: every layer's KV cache and each row's next position become graph outputs; with a
left-padding attention_mask input (batch engines) the next positions count each row's own tokens."""

from __future__ import annotations

import pytest
import torch

from vtrcompile.build import build
from vtrcompile.models.loading import load_model
from vtrcompile.passes.insert_cache_outputs import (
    insert_cache_outputs,
    next_layer_positions,
    next_layer_positions_padded,
    position_offsets,
)


def test_next_positions_by_hand():
    ids = torch.zeros(2, 7, dtype=torch.int64)
    assert next_layer_positions(ids, [0, 0, 3]).tolist() == [[7, 7, 4], [7, 7, 4]]
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    assert next_layer_positions_padded(mask, [0, 0, 3]).tolist() == [[7, 7, 4], [5, 5, 2]]
    assert next_layer_positions_padded(torch.ones(2, 7, dtype=torch.int64), [0, 1]).tolist() == \
        next_layer_positions(ids, [0, 1]).tolist()


def test_position_offsets_follow_the_last_renumbering_site():
    from vtrcompile.passes.insert_token_reduction import Reduction

    reds = [Reduction("x", 1, 4, "renumber", None)]
    assert position_offsets([0, 5, 5, 9], reds) == [0, 5, 5, 5]
    assert position_offsets([0, 5, 5, 9], [Reduction("x", 1, 4, "keep", None)]) == [0, 0, 0, 0]


@pytest.fixture(scope="module")
def padded_build():
    return build(load_model("tiny", batch=2), "fastv", {"layer": 2, "keep": 18})


def test_a_padded_graph_reads_its_positions_from_the_mask(padded_build):
    gm = padded_build.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 3  # input_ids, pixel_values, attention_mask
    pos = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is next_layer_positions_padded]
    assert len(pos) == 1 and pos[0].args[0] is placeholders[2]
    assert not any(n.target is next_layer_positions for n in gm.graph.nodes if n.op == "call_function")
    ids, px = padded_build.example_inputs[:2]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    out = gm(*padded_build.inputs(ids, px, mask))
    s = ids.shape[1]
    assert out[-1].tolist() == [[s] * 4, [s - 4] * 4]  # FastV keeps positions: no offsets
    assert len(out) == 2 + 2 * 4 and out[1].shape[2] == s  # logits, 4 layers x (key, value), positions


def test_a_graph_that_returns_its_cache_already_is_left_alone(padded_build):
    gm = padded_build.graph_module
    before = len(gm.graph.nodes)
    res = insert_cache_outputs(gm, ([], [], None, 2))
    assert not res.modified and len(gm.graph.nodes) == before
