"""The Qwen3-VL family (qwen3vl-tiny, built from Qwen3VLConfig): patch 16, interleaved mRoPE from the host, and
DeepStack (vision-layer features added to the image rows after LLM layers 0 and 1). Engines against the Hugging
Face model and HF generate; methods at every site against their eager references with the DeepStack additions
(gathered with the kept tokens where the site comes before them); merging methods there refused with the
reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import REFERENCE_ATOL, FamilyEngines, check_generation, max_diff
from tests.models.test_qwen_vl import _hf_inputs  # what Qwen's processor returns
from vtrcompile import load_engine
from vtrcompile.build import build
from vtrcompile.errors import UnsupportedModelError, VtrError
from vtrcompile.models.family import family_of
from vtrcompile.models.loading import example_prompt, load_model
from vtrcompile.models.mrope import mrope_positions
from vtrcompile.reference.baselines import dart_site, divprune_stage, gprune_stage, random_stage
from vtrcompile.reference.blocks import full_logits
from vtrcompile.reference.methods import (
    fastv_reference,
    fastv_site,
    pyramiddrop_reference,
    run_stages,
    vtw_reference,
)

CASES = ((5, 8), (1, 1), (20, 3))
STEPS = 6


@pytest.fixture(scope="module")
def qwen3():
    return load_model("qwen3vl-tiny")


def _prompts(src):
    return [example_prompt(src.hf_model.config, pre, suf, seed=30 + i)[:2] for i, (pre, suf) in enumerate(CASES)]


def test_geometry_and_host_positions(qwen3):
    m = qwen3.hf_model
    fam = family_of(m)
    assert fam.name == "qwen3_vl" and fam.image_token_count(m.config) == 16  # 128 px / 16 = 8x8 patches, 2x2 merge
    for ids, px in _prompts(qwen3):
        inp = _hf_inputs(qwen3, ids, px)
        want, _ = m.model.get_rope_index(ids, inp["mm_token_type_ids"], image_grid_thw=inp["image_grid_thw"])
        assert np.array_equal(mrope_positions(ids.numpy(), m.config.image_token_id, fam.merged_grid(m.config)),
                              want.numpy())
    other = load_model("qwen3vl-tiny", image_size=(96, 128)).hf_model.config
    assert fam.image_token_count(other) == 3 * 4
    with pytest.raises(UnsupportedModelError, match="multiples of 32 px"):
        load_model("qwen3vl-tiny", image_size=(112, 112))


def test_unmodified_graph_and_the_reference_loop_equal_hf(qwen3):
    """The DeepStack writes survive the rewrite (as fixed-size gathers), and the references add them too."""
    base = build(qwen3, "none", {}, 256)
    n = family_of(qwen3.hf_model).image_token_count(qwen3.hf_model.config)
    keep_all = build(qwen3, "fastv", {"layer": 2, "keep": n}, 256)
    for ids, px in _prompts(qwen3):
        with torch.no_grad():
            hf = qwen3.hf_model(**_hf_inputs(qwen3, ids, px)).logits[:, -1].float()
            assert max_diff(base.logits(ids, px), hf) <= REFERENCE_ATOL
            assert max_diff(keep_all.logits(ids, px), hf) <= REFERENCE_ATOL
            assert max_diff(full_logits(qwen3.hf_model, ids, px), hf) <= REFERENCE_ATOL


@pytest.mark.parametrize("method,opts,reference", [
    ("fastv", {"layer": 2, "keep": 10}, lambda m, i, p: fastv_reference(m, i, p, 2, 10)),
    ("vtw", {"layer": 3}, lambda m, i, p: vtw_reference(m, i, p, 3)),
    ("dart", {"layer": 2, "keep": 10, "image_pivots": 2, "text_pivots": 2},
     lambda m, i, p: run_stages(m, i, p, sites={2: dart_site(m, 2, 2, keep=10)})),
])
def test_methods_after_the_deepstack_layers_equal_their_references(qwen3, method, opts, reference):
    b = build(qwen3, method, opts, 256)
    for ids, px in _prompts(qwen3):
        with torch.no_grad():
            got = b.logits(ids, px)
            assert max_diff(got, reference(qwen3.hf_model, ids, px)) <= REFERENCE_ATOL
            assert max_diff(got, qwen3.module(*qwen3.inputs(ids, px))) > 10 * REFERENCE_ATOL  # it reduced


@pytest.mark.parametrize("method,opts,reference", [
    ("fastv", {"layer": 1, "keep": 8}, lambda m, i, p: fastv_reference(m, i, p, 1, 8)),
    ("gprune", {"keep": 8}, lambda m, i, p: run_stages(m, i, p, first=gprune_stage(8))),
    ("divprune", {"keep": 8}, lambda m, i, p: run_stages(m, i, p, first=divprune_stage(8))),
    ("random", {"keep": 8}, lambda m, i, p: run_stages(m, i, p, first=random_stage(16, keep=8))),
    ("pyramiddrop", {}, lambda m, i, p: pyramiddrop_reference(m, i, p, 0.5)),
    ("divprune", {"keep": 12, "then": "fastv layer=1 keep=6"},
     lambda m, i, p: run_stages(m, i, p, first=divprune_stage(12), sites={1: fastv_site(m, 6)})),
], ids=["fastv-layer1", "gprune", "divprune", "random", "pyramiddrop", "stacked"])
def test_sites_before_the_deepstack_layers_equal_their_references(qwen3, method, opts, reference):
    """A site before a DeepStack layer (projector, or layer 1 < k = 2): the later additions go to the image tokens
    that are left (the engine gathers them with the kept rows), as in the spec's reference; the reference run
    without any addition gives other logits, so the gathered additions are what matches."""
    b = build(qwen3, method, opts, 256)
    m = qwen3.hf_model
    for ids, px in _prompts(qwen3)[:2]:
        with torch.no_grad():
            got = b.logits(ids, px)
            want = reference(m, ids, px)
            assert max_diff(got, want) <= REFERENCE_ATOL
            assert max_diff(got, qwen3.module(*qwen3.inputs(ids, px))) > 10 * REFERENCE_ATOL  # it reduced
            with _without_additions():
                assert max_diff(got, reference(m, ids, px)) > 10 * REFERENCE_ATOL


def _without_additions():
    from unittest import mock

    from vtrcompile.models.qwen_vl import QWEN3_VL

    return mock.patch.object(type(QWEN3_VL), "layer_additions", lambda self, model, px, batch: {})


def test_the_additions_follow_the_kept_rows_in_the_graph(qwen3):
    """Structure: the graph adds two DeepStack addends (no image-row write left); a projector site gathers both
    with its kept rows, a site at layer 1 only the one entering layer 2, a site at layer 2 none; tokens per layer
    follow the schedule."""
    from vtrcompile.methods.tensor_ops import gather_seq_dims, image_rows_addend, put_image_block_rows

    def gathered_addends(b):
        nodes = b.graph_module.graph.nodes
        assert not any(n.target is put_image_block_rows for n in nodes)
        return sum(1 for n in nodes if n.target is gather_seq_dims and n.args[0].target is image_rows_addend)

    s = qwen3.example_inputs[0].shape[1]
    gp = build(qwen3, "gprune", {"keep": 8}, 256)
    assert gathered_addends(gp) == 2 and gp.llm_tokens(s) == [s - 8] * 4
    f1 = build(qwen3, "fastv", {"layer": 1, "keep": 8}, 256)
    assert gathered_addends(f1) == 1 and f1.llm_tokens(s) == [s, s - 8, s - 8, s - 8]
    assert gathered_addends(build(qwen3, "fastv", {"layer": 2, "keep": 8}, 256)) == 0


@pytest.mark.parametrize("method,opts,where", [
    ("pool", {}, "at the projector that merges tokens"),
    ("pumer", {}, "at layer 1 that merges tokens"),
])
def test_merging_before_a_deepstack_layer_is_refused(qwen3, method, opts, where):
    with pytest.raises(VtrError, match=f"add a tensor at the image rows .*{where}.*layer >= 2"):
        build(qwen3, method, opts, 256)


def test_inspect_names_the_deepstack_additions():
    from click.testing import CliRunner

    from vtrcompile.cli import main

    res = CliRunner().invoke(main, ["inspect", "qwen3vl-tiny"])
    assert res.exit_code == 0, res.output
    assert "the inputs of layers 1, 2 add a tensor at the image rows" in res.output
    assert "merging methods only at layer >= 2" in res.output and "written between" not in res.output
    res = CliRunner().invoke(main, ["inspect", "qwen3vl-tiny", "--json"])
    report = json.loads(res.output[res.output.index("{"):])
    assert report["written_between_layers"] == [] and report["added_between_layers"] == [1, 2]


@pytest.fixture(scope="module")
def qwen3_engines(qwen3, tmp_path_factory):
    """ONNX engines of qwen3vl-tiny."""
    return FamilyEngines(qwen3, tmp_path_factory.mktemp("qwen3"), {
        "none": ("none", {}), "fastv": ("fastv", {"layer": 1, "keep": 10}), "gprune": ("gprune", {"keep": 8})})


def test_engine_pair_generates_like_hf(qwen3, qwen3_engines):
    m = qwen3.hf_model
    none = qwen3_engines["none"]
    base = load_engine(none.files[-1], threads=1)
    # No data-dependent op (the DeepStack writes are gathers; the static ScatterND of interleaved mRoPE stays).
    assert not any(n.op_type == "NonZero" for n in _onnx_nodes(none.files[-1]))
    assert none.findings == []  # TensorRT preflight
    for ids, px in _prompts(qwen3)[:2]:
        inputs = _hf_inputs(qwen3, ids, px)
        with torch.no_grad():
            hf = m.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, eos_token_id=None, min_new_tokens=STEPS)
        out = base.generate(**inputs, max_new_tokens=STEPS, eos_token_id=[])
        assert out.tokens[0].tolist() == hf.sequences[0, ids.shape[1]:].tolist()
        for t in range(STEPS):
            assert float(np.abs(out.logits[0, t] - hf.logits[t][0].numpy()).max()) <= REFERENCE_ATOL


# Sites before the DeepStack layers (layer 1, the projector): the later additions follow the kept tokens. The
# projector site's engine runs with -m slow; its graph equals the reference in the default run
# (test_sites_before_the_deepstack_layers_equal_their_references[gprune]).
@pytest.mark.parametrize("name,prefill", [
    ("fastv", lambda mm, i, p: fastv_reference(mm, i, p, 1, 10)),
    pytest.param("gprune", lambda mm, i, p: run_stages(mm, i, p, first=gprune_stage(8)), marks=pytest.mark.slow)])
def test_the_reduced_engine_pair_generates_like_the_reference(qwen3, qwen3_engines, name, prefill):
    opt = qwen3_engines[name]
    assert opt.findings == []  # TensorRT preflight
    engine = load_engine(opt.files[-1], threads=1)
    cases = _prompts(qwen3)[:2]
    for (ids, _), out in zip(cases, check_generation(engine, qwen3.hf_model, cases, prefill, "keep", STEPS),
                             strict=True):
        assert out.cache_lengths == opt.build.llm_tokens(ids.shape[1])


def _onnx_nodes(path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.node


@pytest.mark.parametrize("size", [(128, 128), (160, 96)])
def test_preprocessing_equals_hf_s_processor(tmp_path, size):
    """Qwen3-VL's processor (transformers' Qwen2VLImageProcessor with patch 16, merge 2, mean/std 0.5, as the
    released preprocessor_config.json sets it) on an image already of the engine's size: the same pixel_values."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vtrcompile.calibration import preprocess

    src = load_model("qwen3vl-tiny", image_size=size)
    fam, cfg = family_of(src.hf_model), src.hf_model.config
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    hf = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3)(images=Image.open(path).convert("RGB"), return_tensors="np")
    assert hf["image_grid_thw"].tolist() == [[1, size[0] // 16, size[1] // 16]]
    got = preprocess(path, list(size), fam.processor_facts(cfg)).numpy()
    assert got.shape == hf["pixel_values"].shape
    assert float(np.abs(got - hf["pixel_values"]).max()) < 1e-5


def test_the_search_evaluator_adds_deepstack_and_equals_a_compiled_schedule(qwen3, tmp_path):
    """The search's eager evaluator: with no reduction it equals the model (it adds the DeepStack features), and a
    schedule that drops tokens before a DeepStack layer equals the compiled `schedule` engine (the later
    additions follow the kept tokens in both)."""
    from tests.models.test_llava_next import _schedule
    from vtrcompile.evaluation import Item
    from vtrcompile.search.evaluator import ScheduleEvaluator

    keeps = [16, 8, 8, 3]
    b = build(qwen3, "schedule", {"schedule": str(_schedule(qwen3, tmp_path, keeps, n_image=16))}, 256)
    cases = _prompts(qwen3)[:2]
    ev = ScheduleEvaluator(qwen3.hf_model, [Item(ids.numpy(), px.numpy()) for ids, px in cases])
    got = ev.logits(keeps)
    for i, (ids, px) in enumerate(cases):
        with torch.no_grad():
            hf = qwen3.hf_model(**_hf_inputs(qwen3, ids, px)).logits[:, -1].float()
            assert max_diff(ev.full[i], hf[0]) <= REFERENCE_ATOL
            assert max_diff(got[i], b.logits(ids, px)[0]) <= REFERENCE_ATOL
