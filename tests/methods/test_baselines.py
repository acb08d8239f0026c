"""Random, Pool, DivPrune, DART and stacked reductions: hand-worked tensor cases, the rewritten graph against
the eager references of docs/methods.md, structure (tokens per layer), and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import check_against_reference
from vtrcompile.build import build
from vtrcompile.errors import VtrError
from vtrcompile.methods.dart import dart_counts, dart_keep, text_pivot_scores
from vtrcompile.methods.divprune import divprune_keep
from vtrcompile.methods.pool import pool_matrix, pool_windows, token_grid
from vtrcompile.methods.random_prune import random_indices
from vtrcompile.methods.registry import parse_then, validate
from vtrcompile.reference.baselines import (
    dart_site,
    divprune_stage,
    divprune_subset,
    gprune_stage,
    pool_stage,
    random_site,
    random_stage,
)
from vtrcompile.reference.methods import fastv_site, pyramiddrop_sites, run_stages
from vtrcompile.reference.vision import VisionStage, prumerge_block, visionzip_block

# ---- tensor functions -------------------------------------------------------------------------------


def test_random_indices_are_the_seeded_permutation_prefix():
    got = random_indices(36, 5, seed=7)
    assert got == sorted(np.random.Generator(np.random.PCG64(7)).permutation(36)[:5].tolist())
    assert got == random_indices(36, 5, seed=7) and got != random_indices(36, 5, seed=8)


def test_pool_grid_and_windows():
    assert token_grid(576) == (24, 24) and token_grid(36) == (6, 6) and token_grid(12) == (3, 4)
    assert token_grid(7) == (1, 7)  # a prime: one row
    assert pool_windows(6, 2) == [(0, 3), (3, 6)]
    assert pool_windows(5, 2) == [(0, 3), (2, 5)]  # adaptive windows overlap when the size does not divide
    m = torch.tensor(pool_matrix((2, 2), (1, 1)))
    assert torch.equal(m, torch.full((1, 4), 0.25))
    m = torch.tensor(pool_matrix((4, 4), (2, 2)))
    assert torch.allclose(m.sum(dim=1), torch.ones(4)) and int((m[0] > 0).sum()) == 4
    assert m[0].nonzero().flatten().tolist() == [0, 1, 4, 5]


def test_divprune_picks_the_most_isolated_token_first_then_spreads():
    # Three near-duplicates of e1, then e2 (slightly similar to the duplicates), then e3 (orthogonal to all).
    # First pick: e3 (row 4), the largest distance to its nearest neighbour. Then every other row is at
    # distance 1 from it: the tie goes to the lower index, row 0. Then e2 (row 3), far from both; the
    # near-duplicates of row 0 come last.
    f = torch.tensor([[1.0, 0, 0], [0.99, 0.01, 0], [0.98, 0.02, 0], [0, 1.0, 0], [0, 0, 1.0]])
    assert divprune_subset(f, 3) == [4, 0, 3]
    assert divprune_keep(f, batch=1, n_image=5, keep=3).tolist() == [sorted(divprune_subset(f, 3))]
    torch.manual_seed(0)
    g = torch.randn(40, 8)
    assert divprune_keep(g, 1, 40, 7)[0].tolist() == sorted(divprune_subset(g, 7))


def test_dart_pivots_and_picks_by_hand():
    # S = 6: row 0 text, rows 1..4 image, row 5 suffix. One head, d = 1: key norms |k|.
    k = torch.tensor([0.1, 5.0, 0.2, 0.3, 0.4, 1.0]).reshape(1, 1, 6, 1)
    # Hidden states: image rows 2 and 4 point away from the pivots (row 1 and row 5), row 3 along them.
    h = torch.tensor([[1.0, 0], [1.0, 0], [-1.0, 0.1], [1.0, 0.1], [-1.0, -0.1], [1.0, 0]])[None]
    start = torch.tensor([1])
    kept = dart_keep(k, h, start, n_image=4, image_pivots=1, text_pivots=1, per_pivot=1)
    # image pivot: image index 0 (row 1, key norm 5); pivots visited: row 1, then row 5; each takes the
    # least similar pool token: image 1 (row 2) first, then image 3 (row 4).
    assert kept.tolist() == [[0, 1, 3]]


def test_dart_short_suffix_borrows_prefix_rows():
    kn = torch.tensor([[0.5, 0.7, 9.0, 9.0, 0.2]])  # rows 2,3 image; row 4 suffix
    s = text_pivot_scores(kn, torch.tensor([2]), 2)
    order = torch.argsort(s[0], descending=True).tolist()
    assert order == [4, 0, 1, 2, 3]  # the suffix row, then prefix rows, then image rows, in index order


def test_dart_counts():
    opts = {"image_pivots": 4, "text_pivots": 4, "keep": None}
    assert dart_counts(opts, 576) == (16, 132)
    assert dart_counts({**opts, "keep": 12}, 36) == (1, 12)
    with pytest.raises(VtrError, match="nearest valid counts are 12 and 20"):
        dart_counts({**opts, "keep": 13}, 36)
    with pytest.raises(VtrError, match="but 36 reach layer K"):
        dart_counts(opts, 36)


def test_parse_then():
    assert parse_then("fastv keep=64 layer=3") == ("fastv", {"keep": "64", "layer": 3})
    assert parse_then("  pyramiddrop   keep-ratio=0.7 ") == ("pyramiddrop", {"keep_ratio": 0.7})
    for text, msg in [("", "give a method"), ("nope", "unknown method 'nope'"), ("fastv keep", "not key=value"),
                      ("fastv layer=x", "layer=x is not a int"), ("fastv factor=2", "fastv does not take 'factor'")]:
        with pytest.raises(VtrError, match=msg):
            parse_then(text)
    assert validate("divprune", {"keep": "9", "then": "fastv  keep=4"})["then"] == "fastv keep=4"
    with pytest.raises(VtrError, match="'none' is not one"):
        validate("none", {"then": "fastv"})


# ---- the rewritten graph against the eager references ------------------------------------------------

CASES = [
    ("random", {}, lambda m, i, p: run_stages(m, i, p, first=random_stage(36))),
    ("random", {"keep": 7, "seed": 11}, lambda m, i, p: run_stages(m, i, p, first=random_stage(36, keep=7, seed=11))),
    ("random", {"site": "llm@3", "keep": 10}, lambda m, i, p: run_stages(m, i, p, sites={3: random_site(10)})),
    ("pool", {}, lambda m, i, p: run_stages(m, i, p, first=pool_stage(3))),
    ("pool", {"factor": 4}, lambda m, i, p: run_stages(m, i, p, first=pool_stage(4))),
    ("pool", {"keep": 25}, lambda m, i, p: run_stages(m, i, p, first=pool_stage(side=5))),
    ("divprune", {"keep": 9}, lambda m, i, p: run_stages(m, i, p, first=divprune_stage(9))),
    ("divprune", {"keep": 30}, lambda m, i, p: run_stages(m, i, p, first=divprune_stage(30))),
    ("dart", {"keep": 12}, lambda m, i, p: run_stages(m, i, p, sites={2: dart_site(m, keep=12)})),
    ("dart", {"keep": 26, "layer": 3, "image_pivots": 2, "text_pivots": 2},
     lambda m, i, p: run_stages(m, i, p, sites={3: dart_site(m, 2, 2, keep=26)})),
    ("divprune", {"keep": 20, "then": "fastv keep=8"},
     lambda m, i, p: run_stages(m, i, p, first=divprune_stage(20), sites={2: fastv_site(m, 8)})),
    ("gprune", {"keep": 20, "then": "pyramiddrop"},
     lambda m, i, p: run_stages(m, i, p, first=gprune_stage(20), sites=pyramiddrop_sites(m, 4))),
    ("pool", {"keep": 16, "then": "dart keep=12 layer=1"},
     lambda m, i, p: run_stages(m, i, p, first=pool_stage(side=4), sites={1: dart_site(m, keep=12)})),
    ("random", {"keep": 24, "then": "random site=llm@2 keep=6"},
     lambda m, i, p: run_stages(m, i, p, first=random_stage(36, keep=24), sites={2: random_site(6)})),
    # a vision-site first stage: the new block is merged at the gathered placeholders, where the later site's
    # analysis finds the boundary again
    ("prumerge", {"keep": 8, "then": "fastv keep=4"},
     lambda m, i, p: run_stages(m, i, p, first=VisionStage(lambda mm, px: prumerge_block(mm, px, 8)),
                                sites={2: fastv_site(m, 4)})),
    ("visionzip", {"dominant": 8, "contextual": 4, "then": "pyramiddrop"},
     lambda m, i, p: run_stages(m, i, p, first=VisionStage(lambda mm, px: visionzip_block(mm, px, 8, 4)),
                                sites=pyramiddrop_sites(m, 4))),
]


# the first budget of each method and two stacked pairs (DivPrune + FastV: a projector stage; PruMerge + FastV:
# a vision stage) run by default; the second budgets and the other stacked pairs (the same two-stage machinery)
# are marked slow
SECOND = {1, 2, 4, 5, 7, 9, 13}


def _slow(i: int, method: str, opts: dict) -> bool:
    return i in SECOND or (opts.get("then") is not None and method not in ("divprune", "prumerge"))


@pytest.mark.parametrize("method,opts,ref", [
    pytest.param(*c, marks=pytest.mark.slow, id=f"{c[0]}-{c[1]}") if _slow(i, c[0], c[1])
    else pytest.param(*c, id=f"{c[0]}-{c[1]}") for i, c in enumerate(CASES)])
def test_graph_equals_eager_reference(tiny, tiny_build, method, opts, ref):
    check_against_reference(tiny_build(method, **opts).program.module(), ref, tiny)


def test_tokens_per_layer(tiny_build):
    s = 50  # prompt of 50 tokens, 36 of them image placeholders
    assert tiny_build("random").llm_tokens(s) == [32] * 4
    assert tiny_build("pool").llm_tokens(s) == [18] * 4  # 6x6 grid, factor 3 -> 2x2
    assert tiny_build("divprune", keep=9).llm_tokens(s) == [23] * 4
    assert tiny_build("divprune").llm_tokens(s) == [18] * 4  # round(0.098 * 36) = 4
    assert tiny_build("dart", keep=12).llm_tokens(s) == [50, 50, 26, 26]
    assert tiny_build("divprune", keep=20, then="fastv keep=8").llm_tokens(s) == [34, 34, 22, 22]
    assert tiny_build("prumerge", keep=8, then="fastv keep=4").llm_tokens(s) == [23, 23, 18, 18]  # 9 tokens, then 4


def test_stacked_renumber_after_keep_reads_unshifted_positions(tiny, tiny_build):
    """G-Prune keeps original positions (gaps); PyramidDrop then renumbers 0..S_l-1. Taking the renumbered
    positions from the already-gathered table would give the kept tokens' old positions instead."""
    b = tiny_build("gprune", keep=20, then="pyramiddrop")
    assert [(r.method, r.layer, r.count, r.positions) for r in b.reductions] == [
        ("gprune", 0, 20, "keep"), ("pyramiddrop", 1, 10, "renumber"), ("pyramiddrop", 2, 5, "renumber"),
        ("pyramiddrop", 3, 2, "renumber")]


def test_final_norm_is_only_inserted_for_dart(tiny_build):
    names = lambda b: [n for n, _ in b.graph_module.named_children() if n.startswith("vtrcompile_final_norm")]  # noqa: E731
    assert names(tiny_build("dart", keep=12)) == ["vtrcompile_final_norm_2"]
    assert names(tiny_build("fastv", layer=2, keep=18)) == []


def test_final_norm_copy_equals_the_models_norm(tiny, tiny_build):
    b = tiny_build("dart", keep=12)
    x = torch.randn(1, 7, 64)
    with torch.no_grad():
        assert torch.allclose(b.graph_module.vtrcompile_final_norm_2(x), tiny.hf_model.model.language_model.norm(x))


# ---- refusals -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,opts,msg", [
    ("pool", {"keep": 10}, "pool: --keep 10 is not s\\*s with s <= 6 .* nearest valid counts are 9, 16"),
    ("pool", {"keep": 49}, "nearest valid counts are 36"),
    ("random", {"site": "vision"}, "neither 'projector' nor 'llm@K'"),
    ("random", {"site": "llm@4"}, "outside llm@1..llm@3"),
    ("random", {"keep": 37}, "--keep 37 is outside 1..36"),
    ("divprune", {"keep": 0}, "--keep 0 is outside 1..36"),
    ("dart", {}, "keeps 132 image tokens .* but 36 reach layer K"),
    ("dart", {"keep": 15}, "nearest valid counts are 12 and 20"),
    ("dart", {"keep": 12, "layer": 0}, "--layer 0 is outside 1..3"),
    ("fastv", {"keep": 9, "then": "divprune keep=4"}, "the first method must reduce before the LLM"),
    ("divprune", {"keep": 9, "then": "gprune keep=4"}, "must reduce inside the LLM"),
    ("divprune", {"keep": 9, "then": "fastv keep=10"}, "--keep 10 is outside 1..9 \\(9 image tokens reach fastv\\)"),
])
def test_refusals(tiny, method, opts, msg):
    with pytest.raises(VtrError, match=msg):
        build(tiny, method, opts)
