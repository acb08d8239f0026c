"""Generation: prefill + decode engines against HF `generate` and the eager reference of the spec."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tests.conftest import REFERENCE_ATOL, budget_params, check_generation, prompts
from vtrcompile import load_engine
from vtrcompile.errors import VtrError
from vtrcompile.reference.baselines import (
    dart_site,
    divprune_stage,
    gprune_stage,
    pool_stage,
)
from vtrcompile.reference.methods import (
    fastv_reference,
    fastv_site,
    gprune_reference,
    pumer_reference,
    pyramiddrop_reference,
    pyramiddrop_sites,
    run_stages,
)
from vtrcompile.reference.vision import prumerge_reference

STEPS = 8


def test_keeping_every_token_generates_what_hf_generate_does(tiny, tiny_engines):
    """The unmodified engine pair: same greedy tokens and per-step logits as transformers' generate, for
    several prompt lengths through one engine pair."""
    engine = load_engine(tiny_engines["none"].files[-1], threads=1)
    m = tiny.hf_model
    for ids, px in prompts(m.config):
        out = engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=STEPS, eos_token_id=[])
        with torch.no_grad():
            hf = m.generate(input_ids=ids, pixel_values=px, max_new_tokens=STEPS, do_sample=False,
                            output_logits=True, return_dict_in_generate=True, eos_token_id=None, min_new_tokens=STEPS)
        assert out.tokens.shape == (1, STEPS)
        assert out.tokens[0].tolist() == hf.sequences[0, ids.shape[1]:].tolist()
        for t in range(STEPS):
            assert float(np.abs(out.logits[0, t] - hf.logits[t][0].numpy()).max()) <= REFERENCE_ATOL
        assert out.cache_lengths == [ids.shape[1]] * 4


@pytest.mark.parametrize("name,positions,prefill", budget_params([
    ("fastv-k2-18", "keep", lambda m, i, p: fastv_reference(m, i, p, 2, 18)),
    ("pyramiddrop", "renumber", lambda m, i, p: pyramiddrop_reference(m, i, p, 0.5)),
    ("pumer", "keep", lambda m, i, p: pumer_reference(m, i, p, 0.1, 0.3)),
    ("prumerge", "renumber", lambda m, i, p: prumerge_reference(m, i, p, 8)),
    ("gprune-9", "keep", lambda m, i, p: gprune_reference(m, i, p, 9)),
    ("divprune-9", "renumber", lambda m, i, p: run_stages(m, i, p, first=divprune_stage(9))),
    ("dart-12", "keep", lambda m, i, p: run_stages(m, i, p, sites={2: dart_site(m, keep=12)})),
    ("pool", "renumber", lambda m, i, p: run_stages(m, i, p, first=pool_stage(3))),
    # stacked: the first stage renumbers (every layer continues from S_0), then FastV keeps those positions
    ("divprune+fastv", lambda s, lengths: [lengths[0]] * len(lengths),
     lambda m, i, p: run_stages(m, i, p, first=divprune_stage(20), sites={2: fastv_site(m, 8)})),
    # stacked: G-Prune keeps positions (layer 0 continues from S), PyramidDrop renumbers (S_l from layer 1)
    ("gprune+pyramiddrop", lambda s, lengths: [s, *lengths[1:]],
     lambda m, i, p: run_stages(m, i, p, first=gprune_stage(20), sites=pyramiddrop_sites(m, 4))),
]))
def test_reduced_generation_equals_the_spec_reference(tiny, tiny_engines, name, positions, prefill):
    """Per-step logits of the engine pair equal the spec's generation semantics (independent eager code),
    and each layer's cache holds exactly the tokens the schedule leaves there."""
    opt = tiny_engines[name]
    engine = load_engine(opt.files[-1], threads=1)
    cases = prompts(tiny.hf_model.config)[:3]
    for (ids, _), out in zip(cases, check_generation(engine, tiny.hf_model, cases, prefill, positions, STEPS),
                             strict=True):
        assert out.cache_lengths == opt.build.llm_tokens(ids.shape[1])
        assert len(out.decode_ms) == STEPS - 1


def test_renumber_policy_continues_each_layers_numbering(tiny, tiny_engines):
    """PyramidDrop renumbers: the first new token's position in layer l is S_l (not S)."""
    opt = tiny_engines["pyramiddrop"]
    ids, px = prompts(tiny.hf_model.config)[0]
    outs = load_engine(opt.files[-1], threads=1).prefill.run({"input_ids": ids.numpy(), "pixel_values": px.numpy()})
    assert outs["next_layer_position_ids"][0].tolist() == opt.build.llm_tokens(ids.shape[1])
    keep = tiny_engines["fastv-k2-18"]
    outs = load_engine(keep.files[-1], threads=1).prefill.run({"input_ids": ids.numpy(), "pixel_values": px.numpy()})
    assert outs["next_layer_position_ids"][0].tolist() == [ids.shape[1]] * 4


def test_generate_stops_at_eos(tiny, tiny_engines):
    engine = load_engine(tiny_engines["none"].files[-1], threads=1)
    ids, px = tiny.example_inputs
    first = int(engine(input_ids=ids, pixel_values=px).argmax())
    out = engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=STEPS, eos_token_id=first)
    assert out.tokens[0].tolist() == [first] and out.eos_reached
    assert out.decode_ms == []


def test_processor_style_keywords_and_prefill_call(tiny, tiny_engines):
    engine = load_engine(tiny_engines["none"].files[-1], threads=1)
    ids, px = tiny.example_inputs
    logits = engine(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px)
    assert logits.shape == (1, 320) and logits.dtype == np.float32
    with torch.no_grad():
        assert float(np.abs(logits - tiny.module(ids, px).numpy()).max()) <= REFERENCE_ATOL
    with pytest.raises(VtrError, match="padding"):
        engine(input_ids=ids, attention_mask=torch.zeros_like(ids), pixel_values=px)
    with pytest.raises(VtrError, match="takes no input image_sizes"):
        engine(input_ids=ids, pixel_values=px, image_sizes=np.array([[84, 84]]))


def test_bad_generation_requests(tiny, tiny_engines, tmp_path):
    engine = load_engine(tiny_engines["none"].files[-1], threads=1)
    ids, px = tiny.example_inputs
    for bad in (0, -3):
        with pytest.raises(VtrError, match="at least 1"):
            engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=bad)
    long_ids = torch.cat([ids, ids[:, -1:].repeat(1, 1020 - ids.shape[1])], dim=1)
    with pytest.raises(VtrError, match="exceed the model's context"):
        engine.generate(input_ids=long_ids, pixel_values=px, max_new_tokens=10)


def test_a_decode_engine_whose_metadata_misstates_its_outputs_fails_in_one_line(tiny, tiny_engines, tmp_path):
    """The ONNX Runtime runner binds a decode step's outputs to buffers shaped as the metadata declares; a file whose
    metadata misstates them gets a one-line error that names it, not ONNX Runtime's exception."""
    import json

    import onnx

    from vtrcompile.lower.onnx import METADATA_KEY

    src = tiny_engines["fastv-k2-18"].files[-1]
    decode = src.parent / tiny_engines["fastv-k2-18"].metadata["decode"]["file"]
    shutil.copy(src, tmp_path / src.name)
    m = onnx.load(str(decode))
    prop = next(p for p in m.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(prop.value)
    logits = next(t for t in meta["io"]["outputs"] if t["name"] == "logits")
    logits["shape"] = [logits["shape"][0], logits["shape"][1] + 1]
    prop.value = json.dumps(meta)
    onnx.save(m, str(tmp_path / decode.name))
    ids, px = tiny.example_inputs
    engine = load_engine(tmp_path / src.name, threads=1)
    with pytest.raises(VtrError, match=f"{decode.name}: ONNX Runtime refused a decode step .* rebuild it") as e:
        engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=3)
    assert "\n" not in str(e.value)


def test_decode_engine_missing_or_from_another_model(tiny, tiny_engines, tmp_path):
    src = tiny_engines["fastv-k2-18"].files[-1]
    meta = tiny_engines["fastv-k2-18"].metadata
    decode = src.parent / meta["decode"]["file"]
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(src, lone / src.name)
    engine = load_engine(lone / src.name, threads=1)
    ids, px = tiny.example_inputs
    with pytest.raises(VtrError, match="decode engine .* is missing"):
        engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=2)
    assert engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=1).tokens.shape == (1, 1)
    # a decode engine of another model under the expected name
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(src, other / src.name)
    import onnx

    from vtrcompile.lower.onnx import METADATA_KEY

    m = onnx.load(str(decode))
    for p in m.metadata_props:
        if p.key == METADATA_KEY:
            import json

            d = json.loads(p.value)
            d["model_id"] = "0" * 16
            p.value = json.dumps(d)
    onnx.save(m, str(other / decode.name))
    with pytest.raises(VtrError, match="does not pair"):
        load_engine(other / src.name, threads=1).generate(input_ids=ids, pixel_values=px, max_new_tokens=2)
    with pytest.raises(VtrError, match="is a decode engine"):
        load_engine(decode)
