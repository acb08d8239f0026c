"""refresh_meta propagates only what a rewrite touched: new nodes, nodes whose op or arguments changed, and what
downstream changes size with them. Its result must equal a full fake-tensor propagation (FakeTensorProp over
every node) on every graph the pipeline makes, and an untouched graph propagates nothing."""

from __future__ import annotations

import pytest
import torch

from tests.passes.graphs import exported
from vtrcompile.build import build
from vtrcompile.models.loading import load_model
from vtrcompile.passes.graph_utils import _meta_key, mark_meta_current, refresh_meta
from vtrcompile.passes.provenance import descendants


def _keys(gm):
    return {n.name: _meta_key(n.meta.get("val")) for n in gm.graph.nodes}


@pytest.mark.parametrize("preset,method,opts", [
    ("tiny", "pyramiddrop", {}),  # three llm@ sites, each on a graph the previous one rewrote
    ("tiny", "prumerge", {"keep": 8}),  # vision site: a new projected block
    ("tiny", "pumer", {}),  # merging
    ("llavanext-tiny", "gprune", {"keep": 40}),  # protected rows (the row ends' view)
])
def test_the_pipeline_s_meta_equals_a_full_propagation(tiny_build, preset, method, opts):
    b = tiny_build(method, **opts) if preset == "tiny" else build(load_model(preset), method, opts, 256)
    gm = b.graph_module
    incremental = _keys(gm)
    refresh_meta(gm, full=True)
    assert _keys(gm) == incremental
    assert sum(k is not None for k in incremental.values()) > 100


class _Net(torch.nn.Module):
    def forward(self, x):
        y = torch.relu(x) * 2
        return y.sum(-1), y[:, :3]


def test_an_untouched_graph_propagates_nothing_and_a_changed_node_is_propagated_with_what_follows():
    x = torch.randn(4, 8)
    gm = exported(_Net(), x)
    mark_meta_current(gm)
    assert refresh_meta(gm) == 0  # nothing changed: no call is run again
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    mul = next(iter(relu.users))
    before = _keys(gm)
    # an in-place edit (same inputs, another op of another size): the node and its readers follow
    with gm.graph.inserting_after(relu):
        wide = gm.graph.call_function(torch.ops.aten.cat.default, ([relu, relu], -1))
    mul.replace_input_with(relu, wide)
    gm.recompile()
    downstream = {wide, *descendants([wide])}
    calls = {n for n in downstream if n.op == "call_function"}
    assert len(calls) >= 4  # the cat, the mul, and the sum and slice that read it
    assert refresh_meta(gm) == len(calls)
    after = _keys(gm)
    assert after[wide.name][1] == ("4", "16") and after[mul.name][1] == ("4", "16")
    assert after[relu.name] == before[relu.name]
    refresh_meta(gm, full=True)
    assert _keys(gm) == after
