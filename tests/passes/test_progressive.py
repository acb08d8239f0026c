"""Multi-site and merging reductions (PyramidDrop, VTW, PuMer) against their eager references."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import check_against_reference
from tests.passes.test_transforms import _count, _seq_exprs
from vtrcompile.build import build
from vtrcompile.errors import VtrError
from vtrcompile.reference.methods import pumer_reference, pyramiddrop_reference, vtw_reference

CASES = [
    ("pyramiddrop", {}, lambda m, i, p: pyramiddrop_reference(m, i, p, 0.5), [36, 18, 9, 4]),
    ("pyramiddrop", {"keep_ratio": 0.7}, lambda m, i, p: pyramiddrop_reference(m, i, p, 0.7), [36, 25, 17, 11]),
    ("vtw", {}, lambda m, i, p: vtw_reference(m, i, p, 2), [36, 36, 0, 0]),
    ("vtw", {"layer": 1}, lambda m, i, p: vtw_reference(m, i, p, 1), [36, 0, 0, 0]),
    ("pumer", {}, lambda m, i, p: pumer_reference(m, i, p, 0.1, 0.3), [36, 21, 13, 8]),
    pytest.param("pumer", {"prune_ratio": 0.2, "merge_ratio": 0.2}, lambda m, i, p: pumer_reference(m, i, p, 0.2, 0.2),
                 [36, 22, 14, 8], marks=pytest.mark.slow),
]


@pytest.mark.parametrize("method,opts,ref,image_tokens", CASES,
                         ids=[f"{(c.values if hasattr(c, 'values') else c)[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_eager_reference_and_schedule(tiny, tiny_build, method, opts, ref, image_tokens):
    b = tiny_build(method, **opts)
    check_against_reference(b.program.module(), ref, tiny)
    # Tokens entering each layer: text (S - 36) plus the image tokens the schedule leaves.
    assert b.llm_tokens(60) == [24 + n for n in image_tokens]
    seq = b.facts.seq_symbol
    assert _seq_exprs(b.program) == [seq - (36 - n) for n in image_tokens]


def test_pumer_structure(tiny_build):
    b = tiny_build("pumer")
    g = b.program.graph_module
    # Per site: prune top-k, merge top-k over a-tokens, survivors top-k; no scatter anywhere.
    assert _count(g, torch.ops.aten.topk.default) == 9
    assert _count(g, torch.ops.aten.scatter.src) + _count(g, torch.ops.aten.scatter.value) == 0
    assert [r.layer for r in b.reductions] == [1, 2, 3] and all(r.merges for r in b.reductions)


def test_pumer_keep_solves_the_merge_ratio(tiny_build):
    b = tiny_build("pumer", keep=12)
    assert b.reductions[-1].count == 12
    assert b.llm_tokens(60)[-1] == 24 + 12
    r = b.reductions[0].options["merge_ratio"]
    assert 0 < r < 0.3  # fewer merges than the default to end at 12 instead of 8


def test_vtw_structure(tiny_build):
    b = tiny_build("vtw")
    assert _count(b.program.graph_module, torch.ops.aten.topk.default) == 0  # nothing to select
    assert b.reductions[0].layer == 2  # default K = L/2


def test_bad_options(tiny):
    with pytest.raises(VtrError, match="pumer: --keep 2 cannot be reached"):
        build(tiny, "pumer", {"keep": 2})
    with pytest.raises(VtrError, match="keeps no image token"):
        build(tiny, "pyramiddrop", {"keep_ratio": 0.1})
    with pytest.raises(VtrError, match="vtw does not take --keep"):
        build(tiny, "vtw", {"keep": 4})
    with pytest.raises(VtrError, match="fastv does not take --prune-ratio"):
        build(tiny, "fastv", {"prune_ratio": 0.2})
