"""The LLaVA-NeXT family (llavanext-tiny preset, built from LlavaNextConfig): anyres geometry, engines against
the Hugging Face model and its generate, methods against their eager references with the row-end
(image_newline) tokens always kept, G-Prune's split budget, preprocessing against HF's processor, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import REFERENCE_ATOL, FamilyEngines, check_generation, max_diff
from vtrcompile import load_engine
from vtrcompile.build import build
from vtrcompile.errors import UnsupportedModelError, VtrError
from vtrcompile.methods import tensor_ops as ops
from vtrcompile.models.family import family_of
from vtrcompile.models.llava_next import LLAVA_NEXT
from vtrcompile.models.loading import example_prompt, load_model
from vtrcompile.reference.baselines import divprune_stage, random_stage
from vtrcompile.reference.methods import (
    fastv_reference,
    fastv_site,
    gprune_reference,
    pumer_reference,
    pyramiddrop_reference,
    run_stages,
    vtw_reference,
)

CASES = ((5, 8), (1, 1), (20, 3))
STEPS = 6
N, ROW_ENDS, PATCHES = 88, 8, 80  # 16 base + 8x8 hi-res + 8 row ends
SIZE = [56, 56]


@pytest.fixture(scope="module")
def nxt():
    return load_model("llavanext-tiny")


@pytest.fixture(scope="module")
def nxt_engines(nxt, tmp_path_factory):
    """ONNX engines of llavanext-tiny."""
    return FamilyEngines(nxt, tmp_path_factory.mktemp("llava_next"), {
        "none": ("none", {}), "fastv": ("fastv", {"layer": 2, "keep": 10}), "pyramiddrop": ("pyramiddrop", {})})


def _prompts(src):
    return [example_prompt(src.hf_model.config, pre, suf, seed=30 + i) for i, (pre, suf) in enumerate(CASES)]


def _hf_logits(m, ids, px, size=SIZE):
    with torch.no_grad():
        return m(input_ids=ids, pixel_values=px.reshape(1, -1, *px.shape[1:]), image_sizes=[size]).logits[:, -1].float()


def test_geometry_and_layout_are_the_family_s(nxt):
    cfg = nxt.hf_model.config
    assert family_of(nxt.hf_model) is LLAVA_NEXT
    ids, px = nxt.example_inputs
    assert LLAVA_NEXT.image_token_count(cfg) == N and int((ids == cfg.image_token_id).sum()) == N
    assert tuple(px.shape) == (5, 3, 28, 28)  # the base tile, then 2x2 hi-res tiles
    layout = LLAVA_NEXT.image_layout(cfg)
    assert layout["segments"] == [16, 64]
    assert layout["protected"] == [16 + r * 9 + 8 for r in range(8)]  # after each row of the 8x8 grid
    with torch.no_grad():  # the rows the layout names are the model's image_newline vector
        feats = LLAVA_NEXT.image_features(nxt.hf_model, px, 1)[0]
    newline = nxt.hf_model.model.image_newline
    assert all(torch.equal(feats[r], newline) for r in layout["protected"])
    assert not any(torch.equal(feats[r], newline) for r in range(N) if r not in layout["protected"])
    from vtrcompile.models.presets import preset_config

    assert LLAVA_NEXT.image_token_count(preset_config("llavanext-geometry")) == 576 + 48 * 48 + 48


def test_unmodified_graph_equals_hf_and_keeping_everything_reproduces_it(nxt):
    base = build(nxt, "none", {}, 256)
    keep_all = [build(nxt, "gprune", {"keep": PATCHES}, 256), build(nxt, "fastv", {"keep": PATCHES}, 256)]
    for ids, px in _prompts(nxt):
        hf = _hf_logits(nxt.hf_model, ids, px)
        assert max_diff(base.logits(ids, px), hf) <= REFERENCE_ATOL
        for b in keep_all:
            assert max_diff(b.logits(ids, px), hf) <= REFERENCE_ATOL


@pytest.mark.parametrize("method,opts,reference", [
    ("fastv", {"layer": 2, "keep": 10}, lambda m, i, p: fastv_reference(m, i, p, 2, 10)),
    ("gprune", {}, lambda m, i, p: gprune_reference(m, i, p, 40, keeps=[8, 32])),  # int(0.5 * 16), int(0.5 * 64)
    ("gprune", {"keep": 9}, lambda m, i, p: gprune_reference(m, i, p, 9, keeps=[2, 7])),  # 9 split 1.8 : 7.2
    ("pyramiddrop", {}, lambda m, i, p: pyramiddrop_reference(m, i, p, 0.5)),
    ("pumer", {}, lambda m, i, p: pumer_reference(m, i, p)),
    ("vtw", {"layer": 2}, lambda m, i, p: vtw_reference(m, i, p, 2)),
    ("divprune", {"keep": 20}, lambda m, i, p: run_stages(m, i, p, first=divprune_stage(20))),
    ("random", {"keep": 20}, lambda m, i, p: run_stages(m, i, p, first=random_stage(PATCHES, keep=20))),
    ("divprune", {"keep": 40, "then": "fastv keep=10"},
     lambda m, i, p: run_stages(m, i, p, first=divprune_stage(40), sites={2: fastv_site(m, 10)})),
], ids=["fastv", "gprune-split", "gprune-keep", "pyramiddrop", "pumer", "vtw", "divprune", "random", "stacked"])
def test_methods_equal_their_eager_references(nxt, method, opts, reference):
    _check_build(nxt, method, opts, reference)


def _check_build(src, method, opts, reference, size=SIZE):
    """The build's logits equal reference(model, ids, px) on two prompts and differ from the unmodified model's
    (the reduction happened); with no reference, they equal the HF model's."""
    b = build(src, method, opts, 256)
    m = src.hf_model
    for ids, px in _prompts(src)[:2]:
        with torch.no_grad():
            got = b.logits(ids, px)
            want = _hf_logits(m, ids, px, size) if reference is None else reference(m, ids, px)
            assert max_diff(got, want) <= REFERENCE_ATOL
            if reference is not None:
                assert max_diff(got, _hf_logits(m, ids, px, size)) > 10 * REFERENCE_ATOL


def test_the_row_ends_are_kept_and_never_chosen(nxt, monkeypatch):
    """Token counts per layer: every site keeps its budget of patches plus the 8 row ends; and the reference
    that treats the row ends as patches gives other logits (so the engines' protection is what matches)."""
    ids, px = nxt.example_inputs
    s = ids.shape[1]
    text = s - N
    assert build(nxt, "fastv", {"layer": 2, "keep": 10}, 256).llm_tokens(s) == [s, s, text + 18, text + 18]
    assert build(nxt, "pyramiddrop", {}, 256).llm_tokens(s) == [s, text + 48, text + 28, text + 18]
    assert build(nxt, "gprune", {}, 256).llm_tokens(s) == [text + 48] * 4
    assert build(nxt, "vtw", {"layer": 3}, 256).llm_tokens(s) == [s, s, s, text + ROW_ENDS]
    got = build(nxt, "fastv", {"layer": 2, "keep": 10}, 256).logits(ids, px)
    monkeypatch.setattr(LLAVA_NEXT, "image_layout", lambda cfg: None)
    assert max_diff(got, fastv_reference(nxt.hf_model, ids, px, 2, 10)) > 10 * REFERENCE_ATOL


def test_protected_row_helpers_against_plain_python():
    rng = np.random.default_rng(0)
    start = torch.zeros(2, dtype=torch.int64)
    rows = ops.constant_rows(start, [2, 5, 9])
    patches = ops.patch_rows(rows, 12)
    assert patches.tolist() == [[0, 1, 3, 4, 6, 7, 8, 10, 11]] * 2
    kept = torch.tensor([[0, 4, 8], [1, 2, 3]])  # patch-relative
    full = ops.with_rows(kept, patches, rows)
    assert full.tolist() == [[0, 2, 5, 6, 9, 11], [1, 2, 3, 4, 5, 9]]
    assert ops.rows_after_selection(rows, full).tolist() == [[1, 2, 4], [1, 4, 5]]
    mix = torch.from_numpy(rng.random((2, 3, 9)).astype(np.float32))
    kept_m, mix_m = ops.with_rows_merged(kept, mix, patches, rows, 12)
    assert kept_m.tolist() == full.tolist()
    for b in range(2):
        for i, r in enumerate(kept_m[b].tolist()):
            if r in (2, 5, 9):  # a protected row is itself
                assert mix_m[b, i].tolist() == [1.0 if c == r else 0.0 for c in range(12)]
            else:  # a kept patch carries its mix over the patches' columns
                j = kept[b].tolist().index(patches[b].tolist().index(r))
                want = np.zeros(12, dtype=np.float32)
                want[patches[b].numpy()] = mix[b, j].numpy()
                assert np.allclose(mix_m[b, i].numpy(), want)


def test_the_view_is_inserted_only_where_the_block_has_protected_rows(nxt):
    """Must not fire: a LLaVA-1.5 build has no protected-row nodes; a LLaVA-NeXT one has them."""
    def helpers(b):
        return {n.target.__name__ for n in b.graph_module.graph.nodes if n.op == "call_function"
                and getattr(n.target, "__module__", "") == ops.__name__}
    assert "constant_rows" in helpers(build(nxt, "fastv", {"keep": 10}, 256))
    plain = helpers(build(load_model("tiny"), "fastv", {"keep": 10}, 256))
    assert plain and not plain & {"constant_rows", "patch_rows", "with_rows", "rows_after_selection"}


@pytest.mark.parametrize("method,opts,match", [
    ("pool", {}, "pool reads the image block as one token grid"),
    ("prumerge", {"keep": 4}, "appends row-end"),
    ("prumerge-plus", {}, "appends row-end"),
    ("visionzip", {"dominant": 6, "contextual": 2}, "appends row-end"),
    ("gprune", {"keep": PATCHES + 1}, "outside 1..80"),
])
def test_refusals_name_the_reason(nxt, method, opts, match):
    with pytest.raises(VtrError, match=match):
        build(nxt, method, opts, 256)


@pytest.mark.parametrize("preset", ["llavanext-tiny", "onevision-tiny"])
@pytest.mark.parametrize("size", [(40, 56), (56, 40), (50, 29), (100, 37), (21, 80), (33, 33)])
def test_any_image_size_lays_out_the_block_as_the_model_does(preset, size):
    """At a size that is not a pinpoint the model pads the image into its best pinpoint and removes the padded
    grid rows (columns) again: the family's N, tile count, segments and row ends equal what the model writes."""
    src = load_model(preset, image_size=size)
    m, fam = src.hf_model, src.family
    n, (ph, pw) = fam.image_token_count(m.config), fam.padded_size(m.config)
    ids, px = src.example_inputs
    assert int((ids == m.config.image_token_id).sum()) == n
    assert tuple(px.shape) == (1 + ph // 28 * (pw // 28), 3, 28, 28)
    with torch.no_grad():
        feats = fam.image_features(m, px, 1)[0]
    assert feats.shape[0] == n
    layout = fam.image_layout(m.config)
    assert [r for r in range(n) if torch.equal(feats[r], m.model.image_newline)] == layout["protected"]
    assert sum(layout["segments"]) + len(layout["protected"]) == n


def test_the_padding_is_removed_as_the_model_and_processor_count_it():
    """40x56 on llavanext-tiny: best pinpoint 56x56, the image fills 40 of 56 px rows, the model keeps rows 1..6
    of the 8x8 grid: 16 + 6 x 8 + 6 row ends = 70, as LlavaNextProcessor counts too. A size the model would unpad
    to nothing is refused in one line."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    cfg = load_model("llavanext-tiny", image_size=(40, 56)).hf_model.config
    assert LLAVA_NEXT.padded_size(cfg) == (56, 56) and LLAVA_NEXT.grid_rows(cfg) == (6, 8)
    assert LLAVA_NEXT.image_token_count(cfg) == 70
    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)  # only the counting, no tokenizer
    proc.image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=[[56, 56], [28, 56], [56, 28]])
    proc.patch_size, proc.num_additional_image_tokens = 7, 0
    for size in [(40, 56), (56, 40), (50, 29), (100, 37), (21, 80)]:
        c = load_model("llavanext-tiny", image_size=size).hf_model.config
        assert proc._get_number_of_features(size[0], size[1], 28, 28) == LLAVA_NEXT.image_token_count(c)
    with pytest.raises(UnsupportedModelError, match=r"--image-size 2x200: .*no patch row or column"):
        load_model("llavanext-tiny", image_size=(2, 200))
    wide = load_model("llavanext-tiny", image_size=(28, 56))  # a pinpoint: a 1x2 grid, 16 + 4x8 + 4 row ends
    assert LLAVA_NEXT.image_token_count(wide.hf_model.config) == 52
    assert tuple(wide.example_inputs[1].shape) == (3, 3, 28, 28)


@pytest.fixture(scope="module")
def nxt_padded():
    return load_model("llavanext-tiny", image_size=(40, 56))


@pytest.mark.parametrize("method,opts,reference", [
    ("fastv", {"layer": 2, "keep": 10}, lambda m, i, p: fastv_reference(m, i, p, 2, 10)),
    ("gprune", {}, lambda m, i, p: gprune_reference(m, i, p, 32, keeps=[8, 24])),  # int(0.5 * 16), int(0.5 * 48)
    ("pyramiddrop", {}, lambda m, i, p: pyramiddrop_reference(m, i, p, 0.5)),
], ids=["fastv", "gprune-split", "pyramiddrop"])
def test_methods_at_a_padded_size_equal_their_eager_references(nxt_padded, method, opts, reference):
    _check_build(nxt_padded, method, opts, reference, size=[40, 56])


@pytest.fixture(scope="module")
def padded_engine(nxt_padded, tmp_path_factory):
    from vtrcompile.optimize import optimize

    return optimize(nxt_padded, "none", {}, tmp_path_factory.mktemp("padded") / "none.onnx", max_prompt=128).files[-1]


def test_an_engine_at_a_padded_size_takes_the_processor_s_output_and_generates_like_hf(nxt_padded, padded_engine):
    """The engine for 40x56 images: the HF processor's pixel_values and image_sizes for a 40x56 photo go in by
    name; the logits and the greedy tokens equal transformers' on the same inputs, and the family's own
    preprocessing (used by `generate --image`) gives the processor's pixels."""
    from PIL import Image
    from transformers import LlavaNextImageProcessorPil

    engine = load_engine(padded_engine, threads=1)
    assert engine.metadata["processor"]["padded_size"] == [56, 56]
    hf_proc = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                         image_grid_pinpoints=[[56, 56], [28, 56], [56, 28]],
                                         image_mean=[0.5] * 3, image_std=[0.25] * 3)
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    inputs = hf_proc(images=img, return_tensors="np")
    assert inputs["image_sizes"].tolist() == [[40, 56]] and inputs["pixel_values"].shape == (1, 5, 3, 28, 28)
    m = nxt_padded.hf_model
    ids, _ = example_prompt(m.config, 5, 8, seed=31)
    with torch.no_grad():
        hf = m.generate(input_ids=ids, pixel_values=torch.from_numpy(inputs["pixel_values"]),
                        image_sizes=torch.tensor([[40, 56]]), max_new_tokens=4, do_sample=False, output_logits=True,
                        return_dict_in_generate=True, eos_token_id=None, min_new_tokens=4)
    out = engine.generate(input_ids=ids.numpy(), **inputs, max_new_tokens=4, eos_token_id=[])
    assert out.tokens[0].tolist() == hf.sequences[0, ids.shape[1]:].tolist()
    assert max(float(np.abs(out.logits[0, t] - hf.logits[t][0].numpy()).max()) for t in range(4)) <= REFERENCE_ATOL
    ours = LLAVA_NEXT.preprocess(img, [40, 56], 1, engine.metadata["processor"]).transpose(0, 3, 1, 2)
    plain = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                       image_grid_pinpoints=[[56, 56], [28, 56], [56, 28]], do_normalize=False)
    assert np.abs(ours - plain(images=img, return_tensors="np")["pixel_values"][0]).max() <= 1e-6
    with pytest.raises(VtrError, match=r"image_sizes \[\[56, 56\]\]: this engine takes images of 40x56"):
        engine(input_ids=ids, pixel_values=inputs["pixel_values"], image_sizes=np.array([[56, 56]]))


def test_engine_equals_hf_and_generates_like_hf(nxt, nxt_engines):
    """The unmodified ONNX engine pair: HF's logits over several prompt lengths through one engine, the same
    greedy tokens and per-step logits as transformers' generate; it takes the processor's layout (pixel_values
    [B, tiles, 3, s, s] and image_sizes) and refuses another image size."""
    engine = load_engine(nxt_engines["none"].files[-1], threads=1)
    assert engine.metadata["processor"]["family"] == "llava_next"
    m = nxt.hf_model
    for ids, px in _prompts(nxt):
        px5 = px.reshape(1, -1, *px.shape[1:])
        with torch.no_grad():
            hf = m.generate(input_ids=ids, pixel_values=px5, image_sizes=torch.tensor([SIZE]), max_new_tokens=STEPS,
                            do_sample=False, output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                            min_new_tokens=STEPS)
        assert max_diff(engine(input_ids=ids, pixel_values=px), hf.logits[0]) <= REFERENCE_ATOL
        out = engine.generate(input_ids=ids.numpy(), pixel_values=px5.numpy(), image_sizes=np.array([SIZE]),
                              max_new_tokens=STEPS, eos_token_id=[])
        assert out.tokens[0].tolist() == hf.sequences[0, ids.shape[1]:].tolist()
        for t in range(STEPS):
            assert float(np.abs(out.logits[0, t] - hf.logits[t][0].numpy()).max()) <= REFERENCE_ATOL
    ids, px = nxt.example_inputs
    with pytest.raises(VtrError, match=r"image_sizes \[\[28, 56\]\]: this engine takes images of 56x56"):
        engine(input_ids=ids, pixel_values=px, image_sizes=np.array([[28, 56]]))


def test_eval_fidelity_and_profile_run_on_the_engines(nxt_engines, calibration_dir):
    """`eval --fidelity` tiles each calibration image as the engine records (an engine against itself agrees on
    every image, with zero KL); `profile` compares the pair and reports the cache ratio."""
    from tests.test_cli import _run

    base, fastv = str(nxt_engines["none"].files[-1]), str(nxt_engines["fastv"].files[-1])
    res = _run("eval", base, "--baseline", base, "--fidelity", "--calibration", str(calibration_dir), "--no-speed")
    assert res.exit_code == 0, res.output
    assert "100.0%" in res.output and "0.0000" in res.output, res.output
    res = _run("eval", fastv, "--baseline", base, "--fidelity", "--calibration", str(calibration_dir), "--no-speed")
    assert res.exit_code == 0 and "fastv" in res.output, res.output
    res = _run("profile", fastv, "--baseline", base, "--reps", "2", "--new-tokens", "2")
    assert res.exit_code == 0, res.output
    assert "KV cache after prefill" in res.output


@pytest.mark.parametrize("name,positions,prefill", [
    ("fastv", "keep", lambda m, i, p: fastv_reference(m, i, p, 2, 10)),
    pytest.param("pyramiddrop", "renumber", lambda m, i, p: pyramiddrop_reference(m, i, p, 0.5),
                 marks=pytest.mark.slow),
])
def test_reduced_generation_equals_the_spec_reference(nxt, nxt_engines, name, positions, prefill):
    engine = load_engine(nxt_engines[name].files[-1], threads=1)
    cases = _prompts(nxt)[:2]
    for (ids, _), out in zip(cases, check_generation(engine, nxt.hf_model, cases, prefill, positions, STEPS),
                             strict=True):
        assert out.cache_lengths == nxt_engines[name].build.llm_tokens(ids.shape[1])


@pytest.mark.parametrize("size", [(300, 200), (64, 64)])
def test_preprocessing_equals_hf_s_processor_on_an_image_of_the_engine_s_size(size):
    """LLaVA-NeXT's own image processor, given the image resized to the engine's size, returns the same pixels
    (base tile first, then the grid) as the family's preprocessing of the original image."""
    from PIL import Image
    from transformers import LlavaNextImageProcessorPil

    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    facts = {"tile_size": 28}
    ours = LLAVA_NEXT.preprocess(img, SIZE, 1, facts).transpose(0, 3, 1, 2)
    hf = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                    image_grid_pinpoints=[[56, 56], [28, 56], [56, 28]], do_normalize=False)
    want = hf(images=img.resize((56, 56), Image.BICUBIC), return_tensors="np")
    assert want["image_sizes"].tolist() == [SIZE]
    assert want["pixel_values"].shape == (1, 5, 3, 28, 28)
    assert np.abs(ours - want["pixel_values"][0]).max() <= 1e-6


def test_the_cli_generates_and_evaluates_with_a_padded_engine(nxt_padded, padded_engine, tmp_path, calibration_dir):
    """`generate --image` on a 40x56 PNG prepares the pixels from the engine's own facts (padded into 56x56) and
    gives the tokens the API gives on those pixels; `eval --fidelity` maps calibration images of other sizes
    onto the engine's size and runs."""
    import json

    from PIL import Image

    from tests.test_cli import _run

    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(img)
    res = _run("generate", str(padded_engine), "--image", str(img), "--ids", "5,6,image,7,8", "--max-new-tokens", "4",
               "--json")
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output[res.output.index("{\n"):])
    assert rec["prompt_tokens"] == 4 + 70
    engine = load_engine(padded_engine, threads=1)
    facts = engine.metadata["processor"]
    pixels = LLAVA_NEXT.preprocess(Image.open(img).convert("RGB"), [40, 56], 1, facts)
    mean, std = np.array(facts["image_mean"], np.float32), np.array(facts["image_std"], np.float32)
    px = ((pixels - mean) / std).transpose(0, 3, 1, 2)[None].astype(np.float32)
    ids = np.array([[5, 6, *([nxt_padded.hf_model.config.image_token_id] * 70), 7, 8]])
    out = engine.generate(input_ids=ids, pixel_values=px, image_sizes=np.array([[40, 56]]), max_new_tokens=4,
                          eos_token_id=[])
    assert rec["tokens"] == out.tokens[0].tolist()
    res = _run("eval", str(padded_engine), "--baseline", str(padded_engine), "--fidelity", "--calibration",
               str(calibration_dir), "--no-speed")
    assert res.exit_code == 0 and "100.0%" in res.output, res.output


def test_cli_inspect_and_methods_refusal():
    import json

    from click.testing import CliRunner

    from vtrcompile.cli import main

    res = CliRunner().invoke(main, ["inspect", "llavanext-tiny", "--max-prompt", "256", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["boundary"]["n_image"] == N
    res = CliRunner().invoke(main, ["optimize", "llavanext-tiny", "--method", "pool", "--out", "x.onnx"])
    assert res.exit_code == 2 and "pool reads the image block as one token grid" in res.output


# --- Searched schedules (G-Search / P-Sigmoid) on LLaVA-NeXT: counts are patches, row ends stay -------------

def _schedule(src, folder, keeps, n_image=80, **over):
    from vtrcompile.optimize import model_id
    from vtrcompile.search.schedule_file import save_schedule

    path = folder / f"s{'-'.join(map(str, keeps))}.json"
    save_schedule(path, {"algo": "gsearch", "settings": {}, "model": src.label, "model_id": model_id(src.module, None),
                         "n_image": n_image, "llm_layers": 4, "keep": keeps, "complete": True, **over})
    return path


@pytest.mark.parametrize("keeps", [[80, 80, 40, 10], [80, 30, 0, 0]])
def test_a_schedule_keeps_the_row_ends_in_the_graph_the_reference_and_the_search_evaluator(nxt, tmp_path, keeps):
    """The 80 patches of llavanext-tiny (88 image tokens, 8 row ends): the compiled schedule, the spec reference
    and the search's evaluator (from layer 0, and from its G-Search checkpoint) keep the top patches by suffix-text
    attention plus all 8 row ends, so their logits agree; a count of 0 leaves the row ends only."""
    from vtrcompile.evaluation import Item
    from vtrcompile.reference.methods import schedule_reference
    from vtrcompile.search.evaluator import ScheduleEvaluator

    b = build(nxt, "schedule", {"schedule": str(_schedule(nxt, tmp_path, keeps))}, 256)
    s = b.example_inputs[0].shape[1]
    drops = [k for layer, k in enumerate(keeps) if layer and k < keeps[layer - 1]]
    assert [r.count for r in b.reductions] == drops  # the plan counts patches
    assert b.llm_tokens(s) == [s - N + k + 8 for k in keeps]  # ... and the graph keeps the 8 row ends on top
    cases = _prompts(nxt)[:2]
    ev = ScheduleEvaluator(nxt.hf_model, [Item(ids.numpy(), px.numpy()) for ids, px in cases])
    assert ev.n_image == 80
    got = ev.logits(keeps)
    ev.checkpoint(keeps, 2)
    got_cp = ev.logits(keeps)
    for i, (ids, px) in enumerate(cases):
        with torch.no_grad():
            graph = b.logits(ids, px)
        ref = schedule_reference(nxt.hf_model, ids, px, keeps)
        assert max_diff(graph, ref) <= REFERENCE_ATOL
        assert max_diff(got[i], graph[0]) <= REFERENCE_ATOL and max_diff(got_cp[i], graph[0]) <= REFERENCE_ATOL


@pytest.mark.parametrize("first", ["gprune", "divprune"])
def test_a_schedule_after_a_first_stage_on_llava_next_equals_the_search_evaluator(nxt, tmp_path, first):
    """`search --first "M keep=40"` on llavanext-tiny: the first stage picks 40 of the 80 patches (G-Prune split
    8 base + 32 hi-res, as its LLaVA-NeXT code) and keeps the row ends; the evaluator run with that stage equals
    the compiled `M --then schedule` engine."""
    from vtrcompile.evaluation import Item
    from vtrcompile.search.evaluator import ScheduleEvaluator
    from vtrcompile.search.job import first_stage

    stage, text = first_stage(nxt.hf_model, f"{first} keep=40")
    keeps = [40, 40, 20, 5]
    path = _schedule(nxt, tmp_path, keeps, n_image=40, first=text)
    b = build(nxt, first, {"keep": 40, "then": f"schedule schedule={path}"}, 256)
    assert [(r.method, r.layer, r.count) for r in b.reductions] == [(first, 0, 40), ("schedule", 2, 20),
                                                                     ("schedule", 3, 5)]
    cases = _prompts(nxt)[:2]
    ev = ScheduleEvaluator(nxt.hf_model, [Item(ids.numpy(), px.numpy()) for ids, px in cases], first=stage)
    assert ev.n_image == 40
    got = ev.logits(keeps)
    for i, (ids, px) in enumerate(cases):
        with torch.no_grad():
            assert max_diff(got[i], b.logits(ids, px)[0]) <= REFERENCE_ATOL


def test_search_runs_on_llava_next_and_its_schedule_compiles(tmp_path, calibration_dir):
    """`vtrcompile search` on llavanext-tiny: the schedule counts the 80 patches, and optimize compiles it."""
    import json

    from click.testing import CliRunner

    from vtrcompile.cli import main

    out = tmp_path / "g.json"
    r = CliRunner().invoke(main, ["search", "llavanext-tiny", "--algo", "gsearch", "--calibration",
                                  str(calibration_dir), "--out", str(out), "--tolerance", "0.2", "--count", "3"])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    assert rec["complete"] and rec["n_image"] == 80 and rec["keep"][0] == 80 and len(rec["keep"]) == 4
    r = CliRunner().invoke(main, ["optimize", "llavanext-tiny", "--method", "schedule", "--schedule", str(out),
                                  "--max-prompt", "256", "--out", str(tmp_path / "s.onnx")])
    assert r.exit_code == 0, r.output


# --- LLaVA-OneVision: the same layout on SigLIP + Qwen2, with the hi-res grid downsampled (anyres_max_M) -------

@pytest.fixture(scope="module")
def onev():
    return load_model("onevision-tiny")


def test_onevision_geometry_downsamples_the_grid_as_the_model_does(onev):
    from vtrcompile.models.llava_next import LLAVA_ONEVISION

    cfg = onev.hf_model.config
    assert family_of(onev.hf_model) is LLAVA_ONEVISION
    # 8x8 hi-res patches; anyres_max_2: r = sqrt(64 / 32) > 1.1 -> 5x5, plus 5 row ends; 16 base tokens (no CLS)
    assert LLAVA_ONEVISION.grid_rows(cfg) == (5, 5)
    assert LLAVA_ONEVISION.image_token_count(cfg) == 16 + 25 + 5
    layout = LLAVA_ONEVISION.image_layout(cfg)
    with torch.no_grad():
        feats = LLAVA_ONEVISION.image_features(onev.hf_model, onev.example_inputs[1], 1)[0]
    assert feats.shape[0] == 46
    newline = onev.hf_model.model.image_newline
    assert [r for r in range(46) if torch.equal(feats[r], newline)] == layout["protected"] == [21, 27, 33, 39, 45]


def test_onevision_geometry_preset_keeps_the_grid_under_its_anyres_max():
    """onevision-geometry: 384 px SigLIP tiles (27 x 27 patches, no CLS), 384x768 images = 1x2 hi-res tiles; a
    27 x 54 grid is under anyres_max_9's 9 x 729 tokens, so it is not downsampled; 27 row ends, protected."""
    from vtrcompile.models.llava_next import LLAVA_ONEVISION
    from vtrcompile.models.presets import preset_config

    cfg = preset_config("onevision-geometry")
    assert LLAVA_ONEVISION.grid_rows(cfg) == (27, 54)
    assert LLAVA_ONEVISION.image_token_count(cfg) == 729 + 27 * 54 + 27
    assert LLAVA_ONEVISION.image_layout(cfg)["protected"] == [729 + r * 55 + 54 for r in range(27)]


@pytest.mark.parametrize("method,opts,reference", [
    ("none", {}, None),
    ("fastv", {"layer": 2, "keep": 8}, lambda m, i, p: fastv_reference(m, i, p, 2, 8)),
    ("gprune", {}, lambda m, i, p: gprune_reference(m, i, p, 20, keeps=[8, 12])),  # int(0.5 * 16), int(0.5 * 25)
    ("pyramiddrop", {}, lambda m, i, p: pyramiddrop_reference(m, i, p, 0.5)),
])
def test_onevision_engines_equal_hf_and_the_references(onev, method, opts, reference):
    _check_build(onev, method, opts, reference)


def test_onevision_preprocessing_equals_hf_s_processor():
    from PIL import Image
    from transformers import LlavaOnevisionImageProcessorPil

    from vtrcompile.models.llava_next import LLAVA_ONEVISION

    img = Image.fromarray(np.random.default_rng(7).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    hf = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28},
                                         image_grid_pinpoints=[[56, 56], [28, 56], [56, 28]], do_normalize=False)
    for (h, w), padded in [((56, 56), None), ((30, 50), [56, 56])]:  # a pinpoint; a size padded into one
        cfg = load_model("onevision-tiny", image_size=(h, w)).hf_model.config
        facts = LLAVA_ONEVISION.processor_facts(cfg)
        assert facts["padded_size"] == (padded or [h, w])
        ours = LLAVA_ONEVISION.preprocess(img, [h, w], 1, facts).transpose(0, 3, 1, 2)
        want = hf(images=img.resize((w, h), Image.BICUBIC), return_tensors="np")
        assert want["pixel_values"].shape == (1, 5, 3, 28, 28)
        assert np.abs(ours - want["pixel_values"][0]).max() <= 1e-6


def test_onevision_refuses_vision_site_methods_and_pool(onev):
    with pytest.raises(VtrError, match="SigLIP tower has no CLS"):
        build(onev, "prumerge", {"keep": 4}, 256)
    with pytest.raises(VtrError, match="LLaVA-OneVision's is a base grid"):
        build(onev, "pool", {}, 256)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["llavanext-tiny", "onevision-tiny"])
def test_an_engine_streamed_from_a_saved_checkpoint_equals_the_model(tmp_path, preset):
    """save_pretrained -> optimize streams the weights (the family found from config.json) -> same logits."""
    from vtrcompile.optimize import optimize

    src = load_model(preset)
    src.hf_model.save_pretrained(tmp_path / "ckpt")
    streamed = load_model(str(tmp_path / "ckpt"))
    assert streamed.weights is not None and streamed.family is family_of(src.hf_model)
    engine = load_engine(optimize(streamed, "fastv", {"keep": 6}, tmp_path / "e" / "f.onnx", max_prompt=128).files[-1])
    ids, px = src.example_inputs
    with torch.no_grad():
        want = build(src, "fastv", {"keep": 6}, 128).logits(ids, px)
    assert max_diff(engine(input_ids=ids, pixel_values=px), want) <= REFERENCE_ATOL


@pytest.mark.slow
def test_a_onevision_fastv_engine_pair_generates_like_the_reference(onev, tmp_path):
    """A FastV OneVision engine pair generates as the spec's generation reference (slow: LLaVA-NeXT's FastV pair,
    the same family module, runs in the default set, and OneVision's FastV graph equals its reference there)."""
    from vtrcompile.optimize import optimize

    fastv = optimize(onev, "fastv", {"layer": 2, "keep": 8}, tmp_path / "fastv.onnx", max_prompt=128)
    cases = _prompts(onev)[:1]
    for (ids, _), out in zip(cases, check_generation(load_engine(fastv.files[-1], threads=1), onev.hf_model, cases,
                                                     lambda m, i, p: fastv_reference(m, i, p, 2, 8), "keep", 4),
                             strict=True):
        assert out.cache_lengths == fastv.build.llm_tokens(ids.shape[1])


def test_onevision_engine_pair_generates_like_hf(onev, tmp_path):
    """The unmodified OneVision ONNX engine pair: transformers' greedy tokens and per-step logits."""
    from vtrcompile.optimize import optimize

    engine = load_engine(optimize(onev, "none", {}, tmp_path / "none.onnx", max_prompt=128).files[-1], threads=1)
    ids, px = _prompts(onev)[0]
    with torch.no_grad():
        hf = onev.hf_model.generate(input_ids=ids, pixel_values=px.reshape(1, -1, *px.shape[1:]),
                                    image_sizes=torch.tensor([SIZE]), max_new_tokens=4, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                                    min_new_tokens=4)
    out = engine.generate(input_ids=ids.numpy(), pixel_values=px.numpy(), max_new_tokens=4, eos_token_id=[])
    assert out.tokens[0].tolist() == hf.sequences[0, ids.shape[1]:].tolist()
    for t in range(4):
        assert float(np.abs(out.logits[0, t] - hf.logits[t][0].numpy()).max()) <= REFERENCE_ATOL
