"""Vision-site reductions (PruMerge, PruMerge+, VisionZip): eager references, structure, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from tests.conftest import check_against_reference
from tests.passes.test_transforms import _seq_exprs
from vtrcompile.build import build
from vtrcompile.errors import VtrError
from vtrcompile.models.loading import ModelSource, NextTokenLogits, example_prompt
from vtrcompile.models.presets import preset_config
from vtrcompile.reference.vision import prumerge_plus_reference, prumerge_reference, visionzip_reference

CASES = [
    ("prumerge", {"keep": 8}, lambda m, i, p: prumerge_reference(m, i, p, 8), 9),
    ("prumerge", {"keep": 20}, lambda m, i, p: prumerge_reference(m, i, p, 20), 21),
    ("prumerge-plus", {}, lambda m, i, p: prumerge_plus_reference(m, i, p, 0.125), 9),
    ("prumerge-plus", {"keep_ratio": 0.25}, lambda m, i, p: prumerge_plus_reference(m, i, p, 0.25), 19),
    ("visionzip", {"dominant": 8, "contextual": 4}, lambda m, i, p: visionzip_reference(m, i, p, 8, 4), 12),
    ("visionzip", {"dominant": 20, "contextual": 6}, lambda m, i, p: visionzip_reference(m, i, p, 20, 6), 26),
]


@pytest.mark.parametrize("method,opts,ref,tokens", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_eager_reference(tiny, tiny_build, method, opts, ref, tokens):
    b = tiny_build(method, **opts)
    check_against_reference(b.program.module(), ref, tiny)
    assert b.llm_tokens(60) == [24 + tokens] * 4
    assert _seq_exprs(b.program) == [b.facts.seq_symbol - (36 - tokens)] * 4


def test_projector_is_applied_to_the_new_tokens(tiny_build):
    b = tiny_build("visionzip", dominant=8, contextual=4)
    proj_width = b.facts.boundary.hidden_size
    linears = [n.meta["val"].shape for n in b.program.graph.nodes if n.target == torch.ops.aten.linear.default
               and any(p == b.facts.projector.module for p, _ in (n.meta.get("nn_module_stack") or {}).values())]
    # The projector's copy (inline, with the projector's provenance) runs on the 12 new tokens; the original
    # projector (36 tokens) is dead and gone.
    assert linears == [(1, 12, proj_width), (1, 12, proj_width)]
    all_linear = [n.meta["val"].shape for n in b.program.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert (1, 36, proj_width) not in all_linear


def _variant(**changes) -> ModelSource:
    cfg = preset_config("tiny")
    for k, v in changes.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    return ModelSource("variant", "preset", NextTokenLogits(model), None, example_prompt(cfg), hf_model=model)


def test_methods_that_need_cls_refuse_a_tower_without_one():
    src = _variant(vision_feature_select_strategy="full")
    for method, opts in (("prumerge", {"keep": 8}), ("visionzip", {"dominant": 8, "contextual": 4})):
        with pytest.raises(VtrError, match=f"{method} needs the vision tower's CLS token"):
            build(src, method, opts)


def test_prumerge_needs_a_next_vision_layer():
    src = _variant(vision_feature_layer=-1)
    with pytest.raises(VtrError, match="prumerge needs the q/k projections of the vision layer after"):
        build(src, "prumerge", {"keep": 8})
    build(src, "visionzip", {"dominant": 8, "contextual": 4})  # VisionZip reads the feature layer itself


def test_bad_budgets(tiny):
    with pytest.raises(VtrError, match="visionzip: --dominant 54 \\+ --contextual 10"):
        build(tiny, "visionzip", {})
    with pytest.raises(VtrError, match="prumerge: --keep 36 is outside 1..35"):
        build(tiny, "prumerge", {"keep": 36})
