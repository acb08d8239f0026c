"""The InternVL family (internvl-tiny preset, built from InternVLConfig): engines against the Hugging Face model,
methods against their eager references, generation against HF `generate`, tiles, preprocessing, refusals."""

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
from vtrcompile.models.internvl import INTERNVL, tile_grid
from vtrcompile.models.loading import example_prompt, load_model
from vtrcompile.reference.methods import fastv_reference, pyramiddrop_reference

CASES = ((5, 8), (1, 1), (20, 3), (0, 12))
STEPS = 6


# One tile in the default run, two (the multi-tile merge: features [tiles, n, D]) as well with -m slow.
@pytest.fixture(scope="module", params=[pytest.param(1, marks=pytest.mark.slow), 2], ids=["1-tile", "2-tiles"])
def ivl(request):
    return load_model("internvl-tiny", tiles=request.param)


@pytest.fixture(scope="module")
def ivl_engines(tmp_path_factory):
    """ONNX engines of internvl-tiny with 2 tiles."""
    src = load_model("internvl-tiny", tiles=2)
    return src, FamilyEngines(src, tmp_path_factory.mktemp("internvl"), {
        "none": ("none", {}), "fastv": ("fastv", {"layer": 2, "keep": 12}), "pyramiddrop": ("pyramiddrop", {})})


def _prompts(src):
    return [example_prompt(src.hf_model.config, pre, suf, seed=20 + i, tiles=src.tiles)
            for i, (pre, suf) in enumerate(CASES)]


def test_geometry_is_the_family_s(ivl):
    cfg = ivl.hf_model.config
    assert family_of(ivl.hf_model) is INTERNVL
    ids, px = ivl.example_inputs
    assert INTERNVL.image_token_count(cfg, ivl.tiles) == 16 * ivl.tiles  # (112/14)^2 * 0.5^2 per tile
    assert int((ids == cfg.image_token_id).sum()) == 16 * ivl.tiles
    assert tuple(px.shape) == (ivl.tiles, 3, 112, 112)
    from vtrcompile.models.presets import preset_config

    assert INTERNVL.image_token_count(preset_config("internvl-geometry")) == 256  # a 448 px tile: 256 tokens


def test_unmodified_graph_equals_hf_and_keeping_everything_reproduces_it(ivl):
    n = INTERNVL.image_token_count(ivl.hf_model.config, ivl.tiles)
    base, keep_all = build(ivl, "none", {}, 256), build(ivl, "gprune", {"keep": n}, 256)
    for ids, px in _prompts(ivl):
        with torch.no_grad():
            hf = ivl.hf_model(input_ids=ids, pixel_values=px).logits[:, -1].float()
            assert max_diff(base.logits(ids, px), hf) <= REFERENCE_ATOL
            assert max_diff(keep_all.logits(ids, px), hf) <= REFERENCE_ATOL


@pytest.mark.parametrize("method,opts,reference", METHOD_CASES)
def test_methods_equal_their_eager_references(ivl, method, opts, reference):
    b = build(ivl, method, opts, 256)
    m = ivl.hf_model
    for ids, px in _prompts(ivl):
        with torch.no_grad():
            got = b.logits(ids, px)
            assert max_diff(got, reference(m, ids, px)) <= REFERENCE_ATOL
            assert max_diff(got, ivl.module(ids, px)) > 10 * REFERENCE_ATOL  # the reduction happened


def test_tokens_per_layer(ivl):
    n = 16 * ivl.tiles
    s = 13 + n
    assert build(ivl, "fastv", {"layer": 2, "keep": 10}, 256).llm_tokens(s) == [s, s, s - n + 10, s - n + 10]
    assert build(ivl, "gprune", {"keep": 9}, 256).llm_tokens(s) == [s - n + 9] * 4


@pytest.mark.parametrize("method", ["prumerge", "prumerge-plus", "visionzip"])
def test_vision_site_methods_are_refused_with_the_reason(method):
    src = load_model("internvl-tiny")
    opts = {"visionzip": {"dominant": 6, "contextual": 2}, "prumerge": {"keep": 4}}.get(method, {})
    with pytest.raises(VtrError, match="merges patches"):
        build(src, method, opts, 256)


def test_pool_refuses_a_block_of_several_tiles():
    with pytest.raises(VtrError, match="pool: the image block holds 2 images"):
        build(load_model("internvl-tiny", tiles=2), "pool", {}, 128)


def test_tile_counts_are_checked():
    with pytest.raises(UnsupportedModelError, match="one image per prompt"):
        load_model("tiny", tiles=2)
    with pytest.raises(UnsupportedModelError, match="1 to 12 tiles"):
        load_model("internvl-tiny", tiles=13)


def test_engine_equals_hf_through_one_engine_and_generates_like_hf(ivl_engines):
    """The unmodified ONNX engine pair (2 tiles): next-token logits of the HF model for several prompt lengths,
    and the same greedy tokens and per-step logits as transformers' generate."""
    src, made = ivl_engines
    engine = load_engine(made["none"].files[-1], threads=1)
    assert engine.metadata["tiles"] == 2 and engine.metadata["processor"]["family"] == "internvl"
    m = src.hf_model
    for ids, px in _prompts(src):
        with torch.no_grad():
            hf = m.generate(input_ids=ids, pixel_values=px, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, eos_token_id=None, min_new_tokens=STEPS)
        assert max_diff(engine(input_ids=ids, pixel_values=px), hf.logits[0]) <= REFERENCE_ATOL
        out = engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=STEPS, eos_token_id=[])
        assert out.tokens[0].tolist() == hf.sequences[0, ids.shape[1]:].tolist()
        for t in range(STEPS):
            assert float(np.abs(out.logits[0, t] - hf.logits[t][0].numpy()).max()) <= REFERENCE_ATOL


@pytest.mark.parametrize("name,positions,prefill", [
    ("fastv", "keep", lambda m, i, p: fastv_reference(m, i, p, 2, 12)),
    pytest.param("pyramiddrop", "renumber", lambda m, i, p: pyramiddrop_reference(m, i, p, 0.5),
                 marks=pytest.mark.slow),
])
def test_reduced_generation_equals_the_spec_reference(ivl_engines, name, positions, prefill):
    src, made = ivl_engines
    engine = load_engine(made[name].files[-1], threads=1)
    cases = _prompts(src)[:2]
    for (ids, _), out in zip(cases, check_generation(engine, src.hf_model, cases, prefill, positions, STEPS),
                             strict=True):
        assert out.cache_lengths == made[name].build.llm_tokens(ids.shape[1])


def test_tile_grid_and_preprocessing():
    from PIL import Image

    assert tile_grid(800, 400, 2) == (2, 1) and tile_grid(400, 800, 2) == (1, 2)
    assert tile_grid(1200, 200, 6) == (6, 1) and tile_grid(600, 400, 6) == (3, 2)
    img = Image.fromarray((np.arange(200 * 300 * 3) % 251).astype(np.uint8).reshape(200, 300, 3))
    one = INTERNVL.preprocess(img, 112, 1)
    three = INTERNVL.preprocess(img, 112, 3)  # a 2x1 grid plus the thumbnail
    assert one.shape == (1, 112, 112, 3) and three.shape == (3, 112, 112, 3)
    assert np.array_equal(three[-1], one[0])  # the thumbnail is the whole image resized
    big = np.asarray(img.resize((224, 112), Image.BICUBIC), dtype=np.float32) / 255
    assert np.array_equal(three[0], big[:, :112]) and np.array_equal(three[1], big[:, 112:])


@pytest.mark.parametrize("size", [(300, 200), (200, 420), (256, 256)])
def test_preprocessing_equals_hf_s_processor_at_a_fixed_tile_count(size):
    """InternVL's own image processor, asked for exactly tiles-1 grid tiles (plus its thumbnail), gives the
    same pixels as the family's preprocessing."""
    from PIL import Image
    from transformers import GotOcr2ImageProcessorPil

    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    for tiles in (1, 3, 5):
        grid = max(tiles - 1, 1)
        hf = GotOcr2ImageProcessorPil(size={"height": 112, "width": 112}, crop_to_patches=tiles > 1,
                                      min_patches=grid, max_patches=grid, do_normalize=False)
        want = hf(images=img, return_tensors="np")["pixel_values"]
        assert np.abs(INTERNVL.preprocess(img, 112, tiles).transpose(0, 3, 1, 2) - want).max() == 0


def test_hf_directory_loads_as_internvl(tmp_path):
    """A saved InternVL checkpoint: recognised by its config, streamed, same logits as the model in memory."""
    src = load_model("internvl-tiny")
    src.hf_model.save_pretrained(tmp_path / "ivl")
    cfg = json.loads((tmp_path / "ivl" / "config.json").read_text())
    assert cfg["model_type"] == "internvl"
    loaded = load_model(str(tmp_path / "ivl"), stream=False)
    ids, px = src.example_inputs
    with torch.no_grad():
        assert max_diff(loaded.module(ids, px), src.module(ids, px)) <= 1e-6  # reloaded weights: same values
    streamed = load_model(str(tmp_path / "ivl"))
    assert streamed.weights is not None and streamed.family is INTERNVL


@pytest.mark.slow
def test_an_engine_streamed_from_an_internvl_checkpoint_equals_the_model(tmp_path):
    """The weights an engine streams from the checkpoint (renamed as transformers does) are the model's."""
    from vtrcompile.optimize import optimize

    src = load_model("internvl-tiny")
    src.hf_model.save_pretrained(tmp_path / "ivl")
    streamed = load_model(str(tmp_path / "ivl"))
    ids, px = src.example_inputs
    engine = load_engine(optimize(streamed, "fastv", {"keep": 6}, tmp_path / "e" / "f.onnx", max_prompt=128).files[-1])
    with torch.no_grad():
        want = build(src, "fastv", {"keep": 6}, 128).logits(ids, px)
    assert max_diff(engine(input_ids=ids, pixel_values=px), want) <= REFERENCE_ATOL


def _word_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>"]
    words = ["<unk>", *special, "user", "assistant", "what", "is", "this", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", additional_special_tokens=special)
    fast.chat_template = chat_template
    return fast, words.index("<IMG_CONTEXT>"), words.index("<img>"), words.index("</img>")


@pytest.mark.parametrize("chat_template", [
    None,  # the family's own layout
    "{% for m in messages %}<|im_start|> {{ m.role }} {% for c in m.content %}{% if c.type == 'image' %}<image> "
    "{% else %}{{ c.text }}{% endif %}{% endfor %} <|im_end|> {% endfor %}<|im_start|> assistant",
])
def test_a_text_prompt_gets_internvl_s_image_block(chat_template):
    """`generate --prompt`: the chat template's <image> (or the family template's block) becomes <img>, N
    placeholders, </img>, as InternVL's processor lays it out."""
    from vtrcompile.engine.prompting import prompt_ids
    from vtrcompile.models.presets import preset_config

    tok, img, start, end = _word_tokenizer(chat_template)
    cfg = preset_config("internvl-tiny")
    meta = {"image_token_id": img, "n_image": 32, "processor": INTERNVL.processor_facts(cfg)}
    row = prompt_ids(tok, meta, "what is this ?")[0].tolist()
    first = row.index(img)
    assert row.count(img) == 32 and row[first - 1] == start and row[first + 32] == end
    assert row[-1] != img and len(row) > 34


def test_cli_tiles_option():
    from click.testing import CliRunner

    from vtrcompile.cli import main

    res = CliRunner().invoke(main, ["inspect", "internvl-tiny", "--tiles", "2", "--max-prompt", "128", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["boundary"]["n_image"] == 32
    res = CliRunner().invoke(main, ["inspect", "tiny", "--tiles", "2"])
    assert res.exit_code == 2 and "one image per prompt" in res.output
