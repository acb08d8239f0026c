"""The Qwen-VL family (qwen2vl-tiny and qwen25vl-tiny presets, built from Qwen2VLConfig / Qwen2_5_VLConfig):
engines against the Hugging Face model (mRoPE positions from the host), methods against their eager references
with 3-axis positions, generation against HF `generate`, preprocessing against HF's image processor, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import REFERENCE_ATOL, FamilyEngines, check_generation, max_diff
from tests.models.cases import METHOD_CASES
from vtrcompile import load_engine
from vtrcompile.build import build
from vtrcompile.errors import UnsupportedModelError, VtrError
from vtrcompile.models.family import family_of
from vtrcompile.models.loading import example_prompt, load_model
from vtrcompile.models.mrope import mrope_positions
from vtrcompile.reference.baselines import dart_site, divprune_stage, pool_stage, random_stage
from vtrcompile.reference.methods import (
    fastv_reference,
    fastv_site,
    pumer_reference,
    pyramiddrop_reference,
    run_stages,
    schedule_reference,
    vtw_reference,
)

CASES = ((5, 8), (1, 1), (20, 3), (0, 12))
STEPS = 6


# Both versions in the HF-equality test; the method checks run on Qwen2-VL by default and on Qwen2.5-VL (the
# same LLM and rewrite; only the vision tower differs) with -m slow.
@pytest.fixture(scope="module", params=["qwen2vl-tiny", pytest.param("qwen25vl-tiny", marks=pytest.mark.slow)])
def qwen(request):
    return load_model(request.param)


@pytest.fixture(scope="module", params=["qwen2vl-tiny", "qwen25vl-tiny"])
def qwen_both(request):
    return load_model(request.param)


def _prompts(src):
    return [example_prompt(src.hf_model.config, pre, suf, seed=30 + i)[:2] for i, (pre, suf) in enumerate(CASES)]


def _hf_inputs(src, ids, px):
    """What Qwen's processor returns for this prompt and image."""
    fam = family_of(src.hf_model)
    return {"input_ids": ids, "pixel_values": px, "image_grid_thw": torch.tensor([list(fam.patch_grid(src.hf_model.config))]),
            "mm_token_type_ids": (ids == src.hf_model.config.image_token_id).int()}


def test_host_positions_equal_hf_get_rope_index(qwen_both):
    qwen = qwen_both
    m = qwen.hf_model
    for ids, px in _prompts(qwen):
        inp = _hf_inputs(qwen, ids, px)
        want, _ = m.model.get_rope_index(ids, inp["mm_token_type_ids"], image_grid_thw=inp["image_grid_thw"])
        fam = family_of(m)
        got = mrope_positions(ids.numpy(), m.config.image_token_id, fam.merged_grid(m.config))
        assert np.array_equal(got, want.numpy())
    # a left-padded pair (batch engines): each row's prompt numbered from its first token, as HF numbers it
    (a, _), (b, _) = _prompts(qwen)[:2]
    s = max(a.shape[1], b.shape[1])
    ids = torch.zeros(2, s, dtype=torch.int64)
    mask = torch.zeros(2, s, dtype=torch.int64)
    for i, row in enumerate((a, b)):
        ids[i, s - row.shape[1]:], mask[i, s - row.shape[1]:] = row[0], 1
    assert not mask.all()
    grid = torch.tensor([list(family_of(m).patch_grid(m.config))] * 2)
    want, _ = m.model.get_rope_index(ids, (ids == m.config.image_token_id).int(), image_grid_thw=grid,
                                     attention_mask=mask)
    got = mrope_positions(ids.numpy(), m.config.image_token_id, family_of(m).merged_grid(m.config), mask.numpy())
    assert np.array_equal(got[:, mask.bool()], want.numpy()[:, mask.bool()])
    for i, row in enumerate((a, b)):  # and equal to the row's own positions unpadded
        alone = mrope_positions(row.numpy(), m.config.image_token_id, family_of(m).merged_grid(m.config))
        assert np.array_equal(got[:, i, s - row.shape[1]:], alone[:, 0])


def test_unmodified_graph_equals_hf_and_keeping_everything_reproduces_it(qwen_both):
    qwen = qwen_both
    n = family_of(qwen.hf_model).image_token_count(qwen.hf_model.config)
    base, keep_all = build(qwen, "none", {}, 256), build(qwen, "gprune", {"keep": n}, 256)
    for ids, px in _prompts(qwen):
        with torch.no_grad():
            hf = qwen.hf_model(**_hf_inputs(qwen, ids, px)).logits[:, -1].float()
            assert max_diff(base.logits(ids, px), hf) <= REFERENCE_ATOL
            assert max_diff(keep_all.logits(ids, px), hf) <= REFERENCE_ATOL


@pytest.mark.parametrize("method,opts,reference", METHOD_CASES)
def test_methods_equal_their_eager_references(qwen, method, opts, reference):
    """With the kept tokens' 3-axis positions gathered (a renumbering method keeps positions on mRoPE)."""
    b = build(qwen, method, opts, 256)
    assert all(r.positions == "keep" for r in b.reductions)
    m = qwen.hf_model
    for ids, px in _prompts(qwen):
        with torch.no_grad():
            got = b.logits(ids, px)
            assert max_diff(got, reference(m, ids, px)) <= REFERENCE_ATOL
            assert max_diff(got, qwen.module(*qwen.inputs(ids, px))) > 10 * REFERENCE_ATOL  # it reduced


OTHER_METHODS = [  # the rest of what the spec allows on Qwen-VL, against the same references as on LLaVA
    ("pumer", {}, lambda m, i, p: pumer_reference(m, i, p, 0.1, 0.3)),
    ("vtw", {"layer": 2}, lambda m, i, p: vtw_reference(m, i, p, 2)),
    ("random", {}, lambda m, i, p: run_stages(m, i, p, first=random_stage(16))),
    ("pool", {"keep": 4}, lambda m, i, p: run_stages(m, i, p, first=pool_stage(side=2))),
    ("dart", {"keep": 10, "image_pivots": 2, "text_pivots": 2},
     lambda m, i, p: run_stages(m, i, p, sites={2: dart_site(m, 2, 2, keep=10)})),
    ("schedule", {"keeps": [16, 12, 8, 4]}, lambda m, i, p: schedule_reference(m, i, p, [16, 12, 8, 4])),
    ("divprune", {"keep": 12, "then": "fastv keep=6"},
     lambda m, i, p: run_stages(m, i, p, first=divprune_stage(12), sites={2: fastv_site(m, 6)})),
]


@pytest.mark.parametrize("method,opts,reference", [
    pytest.param(*c, id=c[0], marks=[] if c[0] == "pumer" else pytest.mark.slow) for c in OTHER_METHODS])
def test_other_methods_equal_their_eager_references(method, opts, reference, tmp_path):
    src = load_model("qwen2vl-tiny")
    if method == "schedule":
        opts = {"schedule": _schedule_file(src, opts["keeps"], tmp_path)}
    b = build(src, method, opts, 256)
    assert all(r.positions == "keep" for r in b.reductions)
    for ids, px in _prompts(src)[:2]:
        with torch.no_grad():
            assert max_diff(b.logits(ids, px), reference(src.hf_model, ids, px)) <= REFERENCE_ATOL


def _schedule_file(src, keeps, folder):
    from vtrcompile.optimize import model_id
    from vtrcompile.search.schedule_file import save_schedule

    save_schedule(folder / "s.json", {"algo": "gsearch", "settings": {}, "model": src.label,
                                      "model_id": model_id(src.module, None), "n_image": keeps[0],
                                      "llm_layers": len(keeps), "keep": keeps, "complete": True})
    return str(folder / "s.json")


def test_tokens_per_layer(qwen):
    n = family_of(qwen.hf_model).image_token_count(qwen.hf_model.config)
    s = 13 + n
    assert build(qwen, "fastv", {"layer": 2, "keep": 10}, 256).llm_tokens(s) == [s, s, s - n + 10, s - n + 10]
    assert build(qwen, "gprune", {"keep": 9}, 256).llm_tokens(s) == [s - n + 9] * 4


@pytest.mark.parametrize("preset,family", [("qwen2vl-geometry", "qwen2_vl"), ("qwen25vl-geometry", "qwen2_5_vl")])
def test_geometry_presets_have_the_family_s_token_geometry(preset, family):
    """448 x 448 images, patch 14, 2 x 2 merger: 32 x 32 patches -> 256 image tokens, on both Qwen families."""
    from vtrcompile.models.family import family_for, family_named
    from vtrcompile.models.presets import preset_config

    cfg = preset_config(preset)
    assert family_for(cfg) is family_named(family)
    assert family_for(cfg).image_token_count(cfg) == 256


@pytest.mark.parametrize("method", ["prumerge", "prumerge-plus", "visionzip"])
def test_vision_site_methods_are_refused_with_the_reason(method):
    opts = {"visionzip": {"dominant": 6, "contextual": 2}, "prumerge": {"keep": 4}}.get(method, {})
    with pytest.raises(VtrError, match="merges patches|no CLS"):
        build(load_model("qwen2vl-tiny"), method, opts, 256)


def test_image_sizes_are_checked():
    src = load_model("qwen2vl-tiny", image_size=(56, 84))
    assert family_of(src.hf_model).image_token_count(src.hf_model.config) == 2 * 3
    with pytest.raises(UnsupportedModelError, match="multiples of 28 px"):
        load_model("qwen2vl-tiny", image_size=(100, 112))
    with pytest.raises(UnsupportedModelError, match="multiples of 112 px"):
        load_model("qwen25vl-tiny", image_size=(168, 224))
    with pytest.raises(UnsupportedModelError, match="vision tower's own 84x84"):
        load_model("tiny", image_size=(112, 112))


def test_preprocessing_equals_hf_image_processor(tmp_path):
    """An image whose Qwen resize is the engine's size: the same pixel_values as Qwen2VLImageProcessorPil."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vtrcompile.calibration import preprocess

    src = load_model("qwen2vl-tiny")
    fam, cfg = family_of(src.hf_model), src.hf_model.config
    rng = np.random.default_rng(0)
    path = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 255, (130, 100, 3), dtype=np.uint8)).save(path)  # smart_resize -> 140 x 112
    hf = Qwen2VLImageProcessorPil()(images=Image.open(path).convert("RGB"), return_tensors="np")
    assert hf["image_grid_thw"].tolist() == [[1, 10, 8]]
    got = preprocess(path, [140, 112], fam.processor_facts(cfg)).numpy()
    assert got.shape == hf["pixel_values"].shape
    assert float(np.abs(got - hf["pixel_values"]).max()) < 1e-5


@pytest.fixture(scope="module")
def qwen_engines(tmp_path_factory):
    """ONNX engines of qwen2vl-tiny."""
    src = load_model("qwen2vl-tiny")
    return src, FamilyEngines(src, tmp_path_factory.mktemp("qwen"), {
        "none": ("none", {}), "fastv": ("fastv", {"layer": 2, "keep": 10}), "pyramiddrop": ("pyramiddrop", {})})


def test_engine_equals_hf_through_one_engine_and_generates_like_hf(qwen_engines):
    """The unmodified ONNX engine pair takes what Qwen's processor returns (position_ids derived on the host):
    next-token logits of the HF model for several prompt lengths, and HF generate's greedy tokens and logits."""
    src, made = qwen_engines
    engine = load_engine(made["none"].files[-1], threads=1)
    assert [t["name"] for t in engine.metadata["io"]["inputs"]] == ["input_ids", "pixel_values", "position_ids"]
    m = src.hf_model
    for ids, px in _prompts(src):
        inputs = _hf_inputs(src, ids, px)
        with torch.no_grad():
            hf = m.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, eos_token_id=None, min_new_tokens=STEPS)
        assert max_diff(engine(**inputs), hf.logits[0]) <= REFERENCE_ATOL
        out = engine.generate(**inputs, max_new_tokens=STEPS, eos_token_id=[])
        assert out.tokens[0].tolist() == hf.sequences[0, ids.shape[1]:].tolist()
        for t in range(STEPS):
            assert float(np.abs(out.logits[0, t] - hf.logits[t][0].numpy()).max()) <= REFERENCE_ATOL


@pytest.mark.parametrize("name,prefill", [
    ("fastv", lambda m, i, p: fastv_reference(m, i, p, 2, 10)),
    pytest.param("pyramiddrop", lambda m, i, p: pyramiddrop_reference(m, i, p, 0.5), marks=pytest.mark.slow),
])
def test_reduced_generation_equals_the_spec_reference(qwen_engines, name, prefill):
    """Generation continues the unreduced prompt's mRoPE numbering in every layer (positions kept)."""
    src, made = qwen_engines
    engine = load_engine(made[name].files[-1], threads=1)
    check_generation(engine, src.hf_model, _prompts(src)[:2], prefill, "keep", STEPS)


def test_processor_extras_are_checked(qwen_engines):
    src, made = qwen_engines
    engine = load_engine(made["none"].files[-1], threads=1)
    ids, px = _prompts(src)[0]
    inputs = _hf_inputs(src, ids, px)
    with pytest.raises(VtrError, match="image_grid_thw .* takes one image of 1 x 8 x 8 patches"):
        engine(**{**inputs, "image_grid_thw": torch.tensor([[1, 8, 10]])})
    with pytest.raises(VtrError, match="mm_token_type_ids does not mark exactly the image tokens"):
        engine(**{**inputs, "mm_token_type_ids": torch.zeros_like(ids)})


def test_image_size_on_the_cli():
    from click.testing import CliRunner

    from vtrcompile.cli import main

    res = CliRunner().invoke(main, ["inspect", "qwen2vl-tiny", "--image-size", "56x84", "--max-prompt", "64", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["boundary"]["n_image"] == 6  # (56/28) x (84/28)
    for bad, words in (("56x", "give HxW"), ("56x100", "multiples of 28 px")):
        res = CliRunner().invoke(main, ["inspect", "qwen2vl-tiny", "--image-size", bad])
        assert res.exit_code == 2 and words in res.output, res.output
        assert len([ln for ln in res.output.splitlines() if ln.startswith("error:")]) == 1, res.output


def test_tensorrt_profile_gives_position_ids_the_prompt_range(qwen_engines, monkeypatch, tmp_path):
    """The host input position_ids [3, B, S] follows input_ids' range in the TensorRT profile, and the ONNX the
    parser receives (recording stand-in) has all three inputs and passes the preflight."""
    import sys

    import onnx

    from tests.lower.test_tensorrt import _Recorder
    from vtrcompile.lower import tensorrt as trt_lower
    from vtrcompile.lower.tensorrt_preflight import preflight
    from vtrcompile.optimize import Target, engine_metadata

    src, made = qwen_engines
    b = made["fastv"].build
    meta = engine_metadata(b, src, target=Target(backend="tensorrt", device="cuda"))
    p = trt_lower.profile_shapes(meta, 30, 200).shapes
    assert p["position_ids"] == ((3, 1, 30), (3, 1, p["input_ids"][1][1]), (3, 1, 200))
    assert p["pixel_values"][0] == (64, 1176)
    rec = _Recorder("11.2.0", False)
    monkeypatch.setitem(sys.modules, "tensorrt", rec.module)
    monkeypatch.setattr(trt_lower, "gpu_info", lambda: {"name": "test-gpu", "compute_capability": "9.0"})
    trt_lower.export_plan(b.program, tmp_path / "q.plan", meta, 30, 200, 2 << 30)
    assert [i.name for i in rec.onnx.graph.input] == ["input_ids", "pixel_values", "position_ids"]
    onnx.save(rec.onnx, tmp_path / "parsed.onnx")
    assert preflight(tmp_path / "parsed.onnx") == []


@pytest.mark.slow
def test_a_saved_qwen2_5_vl_checkpoint_streams_into_an_engine_equal_to_the_model(tmp_path):
    """A saved checkpoint: recognised by its config, the image size given at load, weights streamed from the
    safetensors files (renamed as transformers does) into an engine with the in-memory model's logits."""
    from vtrcompile.optimize import optimize

    src = load_model("qwen25vl-tiny")
    src.hf_model.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    streamed = load_model(str(tmp_path / "q"), image_size=(224, 224))
    assert streamed.weights is not None and streamed.family.name == "qwen2_5_vl"
    engine = load_engine(optimize(streamed, "gprune", {"keep": 20}, tmp_path / "e" / "g.onnx", max_prompt=160).files[-1])
    ids, px = _prompts(src)[0]
    with torch.no_grad():
        want = build(src, "gprune", {"keep": 20}, 160).logits(ids, px)
    assert max_diff(engine(input_ids=ids, pixel_values=px), want) <= REFERENCE_ATOL
