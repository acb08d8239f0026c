"""Transforms: structural, numeric against the eager references, and where they must not fire."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REFERENCE_ATOL, check_against_reference, max_diff, prompts
from vtrcompile.build import build
from vtrcompile.capture import capture, editable_module
from vtrcompile.errors import VtrError
from vtrcompile.methods.tensor_ops import merge_image_block
from vtrcompile.passes.analysis import analyze
from vtrcompile.passes.find_decoder_layers import SDPA
from vtrcompile.passes.replace_masked_scatter import replace_masked_scatter
from vtrcompile.passes.strip_runtime_asserts import strip_runtime_asserts
from vtrcompile.reference.blocks import full_logits
from vtrcompile.reference.methods import fastv_reference, gprune_reference


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def _seq_exprs(ep):
    """The query length of every LLM attention op of an exported program, as sympy expressions."""
    out = []
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.target == SDPA:
            s = n.meta["val"].shape[2]
            if isinstance(s, torch.SymInt):
                out.append(s.node.expr)
    return out


# ---- strip_runtime_asserts -------------------------------------------------------------------

def test_strip_runtime_asserts_structural_and_negative(tiny):
    gm = editable_module(capture(tiny))
    assert _count(gm, torch.ops.aten._assert_scalar.default) > 0
    res = strip_runtime_asserts(gm)
    assert res.modified
    assert _count(gm, torch.ops.aten._assert_scalar.default) == 0
    assert _count(gm, torch.ops.aten._is_all_true.default) == 0
    again = strip_runtime_asserts(gm)
    assert not again.modified  # nothing left to strip: untouched


# ---- replace_masked_scatter --------------------------------------------------------------------

def test_replace_masked_scatter(tiny):
    gm = editable_module(capture(tiny))
    strip_runtime_asserts(gm)
    ids, px = tiny.example_inputs
    with torch.no_grad():
        before = gm(ids, px)
    assert replace_masked_scatter(gm).modified
    assert _count(gm, torch.ops.aten.masked_scatter.default) == 0
    assert _count(gm, merge_image_block) == 1
    for i2, p2 in prompts(tiny.hf_model.config):
        with torch.no_grad():
            assert max_diff(gm(i2, p2), tiny.module(i2, p2)) <= REFERENCE_ATOL
    with torch.no_grad():
        assert torch.equal(gm(ids, px), before)
    assert not replace_masked_scatter(gm).modified  # already replaced: must not fire again
    assert analyze(gm).boundary.node.target is merge_image_block  # and the analysis still finds it


# ---- insert_token_reduction ------------------------------------------------------------------------

def test_keep_every_token_reproduces_the_model(tiny, tiny_build):
    for method, opts in (("fastv", {"keep": 36, "layer": 2}), ("gprune", {"keep": 36})):
        f = tiny_build(method, **opts).program.module()
        for i2, p2 in prompts(tiny.hf_model.config):
            with torch.no_grad():
                assert max_diff(f(i2, p2)[0], tiny.module(i2, p2)) <= REFERENCE_ATOL, method


def test_eager_anchor_matches_the_hf_model(tiny):
    for i2, p2 in prompts(tiny.hf_model.config):
        with torch.no_grad():
            assert max_diff(full_logits(tiny.hf_model, i2, p2), tiny.module(i2, p2)) <= REFERENCE_ATOL


@pytest.mark.parametrize("layer,keep", [(1, 5), (2, 18), (3, 30)])
def test_fastv_matches_eager_reference(tiny, tiny_build, layer, keep):
    f = tiny_build("fastv", layer=layer, keep=keep).program.module()
    check_against_reference(f, lambda m, i, p: fastv_reference(m, i, p, layer, keep), tiny)


@pytest.mark.parametrize("keep", [4, 18])
def test_gprune_matches_eager_reference(tiny, tiny_build, keep):
    f = tiny_build("gprune", keep=keep).program.module()
    check_against_reference(f, lambda m, i, p: gprune_reference(m, i, p, keep), tiny)


def test_fastv_structure(tiny_build):
    base = tiny_build("none")
    b = tiny_build("fastv", layer=2, keep=10)
    assert _count(base.program.graph_module, torch.ops.aten.topk.default) == 0
    assert _count(b.program.graph_module, torch.ops.aten.topk.default) == 1
    assert _count(b.program.graph_module, torch.ops.aten.masked_scatter.default) == 0
    seq = b.facts.seq_symbol
    exprs = _seq_exprs(b.program)
    assert exprs == [seq, seq, seq - 26, seq - 26]  # 36 image tokens -> 10 from layer 2 on
    assert b.llm_tokens(50) == [50, 50, 24, 24]
    assert _seq_exprs(base.program) == [seq] * 4


def test_gprune_structure(tiny_build):
    b = tiny_build("gprune", keep=9)
    assert _count(b.program.graph_module, torch.ops.aten.topk.default) == 1
    seq = b.facts.seq_symbol
    assert _seq_exprs(b.program) == [seq - 27] * 4
    # G-Prune's score is a 5-step propagation: 5 vector-matrix products on top of A = Fn Fn^T.
    assert b.llm_tokens(60) == [33] * 4


def test_reduction_rejects_bad_budgets(tiny):
    with pytest.raises(VtrError, match="--keep 37 is outside 1..36"):
        build(tiny, "fastv", {"keep": 37})
    with pytest.raises(VtrError, match="--layer 4 is outside 1..3"):
        build(tiny, "fastv", {"layer": 4})
    with pytest.raises(VtrError, match="--layer 0 is outside"):
        build(tiny, "fastv", {"layer": 0})
    with pytest.raises(VtrError, match="gprune does not take --layer"):
        build(tiny, "gprune", {"layer": 2})
