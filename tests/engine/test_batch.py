"""Engines built for several prompts per run (`optimize --batch 2`): each row is its own prompt, with its own
image and its own selection, left-padded to the longest row, and generates what the spec's generation reference
gives that prompt alone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.conftest import REFERENCE_ATOL, prompts
from vtrcompile import load_engine
from vtrcompile.cli import main
from vtrcompile.decode import decode_file_name
from vtrcompile.errors import VtrError
from vtrcompile.models.loading import load_model
from vtrcompile.optimize import optimize
from vtrcompile.reference.generation import generate_reference
from vtrcompile.reference.methods import (
    fastv_reference,
    gprune_reference,
    pumer_reference,
    pyramiddrop_reference,
)
from vtrcompile.reference.vision import prumerge_reference

STEPS = 6
# name -> (method, options, positions policy, eager prefill reference); the first two run by default
BATCH_ENGINES = {
    "fastv": ("fastv", {"layer": 2, "keep": 18}, "keep", lambda m, i, p: fastv_reference(m, i, p, 2, 18)),
    "prumerge": ("prumerge", {"keep": 8}, "renumber", lambda m, i, p: prumerge_reference(m, i, p, 8)),
    "pyramiddrop": ("pyramiddrop", {}, "renumber", lambda m, i, p: pyramiddrop_reference(m, i, p, 0.5)),
    "pumer": ("pumer", {}, "keep", lambda m, i, p: pumer_reference(m, i, p, 0.1, 0.3)),
    "gprune": ("gprune", {"keep": 9}, "keep", lambda m, i, p: gprune_reference(m, i, p, 9)),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("batch")


@pytest.fixture(scope="module")
def batch2(folder):
    """name -> a batch-2 ONNX Runtime engine of the tiny preset, built on first use into one folder."""
    built: dict = {}

    def get(name: str):
        if name not in built:
            method, opts, *_ = BATCH_ENGINES[name]
            built[name] = optimize(load_model("tiny", batch=2), method, opts, folder / f"{name}.onnx")
        return built[name]
    return get


@pytest.fixture(scope="module")
def fastv_b1(folder):
    """The batch-1 FastV engine of the same model and options as batch2("fastv")."""
    return optimize(load_model("tiny"), "fastv", dict(BATCH_ENGINES["fastv"][1]), folder / "fastv-b1.onnx").files[-1]


def two_prompts(config, cases=((5, 8), (5, 8))):
    """Two prompts, each its own text and image -> ids [2, S], pixels [2, 3, H, W], and the rows; of one length
    by default, else left-padded to the longer -> also the attention_mask [2, S]."""
    rows = prompts(config, cases=cases)
    assert not torch.equal(rows[0][1], rows[1][1])
    s = max(r[0].shape[1] for r in rows)
    ids = torch.zeros(2, s, dtype=torch.int64)
    mask = torch.zeros(2, s, dtype=torch.int64)
    for i, (r, _) in enumerate(rows):
        ids[i, s - r.shape[1]:], mask[i, s - r.shape[1]:] = r[0], 1
    if len({r[0].shape[1] for r in rows}) == 1:
        assert not torch.equal(rows[0][0], rows[1][0])
        return ids, torch.cat([r[1] for r in rows]), rows
    return ids, torch.cat([r[1] for r in rows]), rows, mask


@pytest.mark.parametrize("name", [n if n in ("fastv", "prumerge") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in BATCH_ENGINES])
def test_each_row_generates_what_its_prompt_alone_does(tiny, batch2, name):
    """Row 1 is 9 tokens shorter than row 0 and left-padded: each generates what its prompt alone gives."""
    _, _, positions, prefill = BATCH_ENGINES[name]
    opt = batch2(name)
    assert opt.metadata["batch"] == 2 and opt.build.example_inputs[0].shape[0] == 2
    assert [t["name"] for t in opt.metadata["io"]["inputs"]] == ["input_ids", "pixel_values", "attention_mask"]
    engine = load_engine(opt.files[-1], threads=1)
    ids, px, rows, mask = two_prompts(tiny.hf_model.config, ((5, 8), (1, 3)))
    assert mask[1].tolist() == [0] * 9 + [1] * (ids.shape[1] - 9) and mask[0].all()
    assert engine(input_ids=ids, pixel_values=px, attention_mask=mask).shape == \
        (2, tiny.hf_model.config.text_config.vocab_size)
    out = engine.generate(input_ids=ids.numpy(), pixel_values=px.numpy(), attention_mask=mask.numpy(),
                          max_new_tokens=STEPS, eos_token_id=[])
    assert out.tokens.shape == (2, STEPS) and out.lengths == [STEPS, STEPS] and out.ended == [False, False]
    for r, (ids_r, px_r) in enumerate(rows):
        tokens, logits, lengths = generate_reference(tiny.hf_model, ids_r, px_r, prefill, positions, STEPS)
        assert out.tokens[r].tolist() == tokens.tolist()
        assert float(np.abs(out.logits[r] - logits.numpy()).max()) <= REFERENCE_ATOL
        assert [c - 9 * r for c in out.cache_lengths] == lengths  # the padding sits in every layer's cache
    assert out.cache_lengths == opt.build.llm_tokens(ids.shape[1])
    # without a mask the rows are taken whole: row 1's padding is read as its text
    whole = engine.generate(input_ids=ids.numpy(), pixel_values=px.numpy(), max_new_tokens=2, eos_token_id=[])
    assert float(np.abs(whole.logits[1] - out.logits[1, :2]).max()) > 1e-3


def _right_padded(ids, mask):
    """Left-padded rows -> the same rows right-padded (as a tokenizer with padding_side="right" gives them)."""
    pad = (mask == 0).sum(1)
    return (torch.stack([torch.roll(r, -int(k)) for r, k in zip(ids, pad, strict=True)]),
            torch.stack([torch.roll(r, -int(k)) for r, k in zip(mask, pad, strict=True)]))


def test_padding_goes_on_one_side_of_each_prompt(tiny, batch2, fastv_b1):
    engine = load_engine(batch2("fastv").files[-1], threads=1)
    ids, px, _, mask = two_prompts(tiny.hf_model.config, ((5, 8), (1, 3)))
    # right padding (a tokenizer's padding_side="right") generates what left padding does: each row is rolled
    right_ids, right_mask = _right_padded(ids, mask)
    assert not torch.equal(right_ids, ids) and not torch.equal(right_mask, mask)
    left, right = (engine.generate(input_ids=i, pixel_values=px, attention_mask=m, max_new_tokens=3, eos_token_id=[])
                   for i, m in ((ids, mask), (right_ids, right_mask)))
    assert right.tokens.tolist() == left.tokens.tolist() and np.array_equal(right.logits, left.logits)
    both_sides = torch.cat([mask[:, :-1], torch.zeros(2, 1, dtype=torch.int64)], 1)  # row 0: zeros before and after
    inside = mask.clone()
    inside[0, -2] = 0
    for bad, words in [(mask * 2, "other than 0 and 1"), (mask[:, 1:], "one mask value"),
                       (both_sides, "on one side only"), (inside, "on one side only")]:
        with pytest.raises(VtrError, match=words):
            engine.generate(input_ids=ids, pixel_values=px, attention_mask=bad, max_new_tokens=2)
    one = load_engine(fastv_b1, threads=1)
    with pytest.raises(VtrError, match="batch-1 engine takes one prompt without padding"):
        one.generate(input_ids=ids[1:], pixel_values=px[1:], attention_mask=mask[1:], max_new_tokens=2)
    # random masks: one whose rows are each padded on one side and leave the image block unmasked runs; anything
    # else is one VtrError line
    rng = np.random.default_rng(0)
    s_len = ids.shape[1]
    for _ in range(40):
        kind = rng.integers(3)
        m = rng.integers(0, 2, size=(2, s_len)) if kind == 0 else \
            (np.arange(s_len)[None] >= rng.integers(0, 12, size=(2, 1))).astype(np.int64)
        if kind == 2:
            m = m[:, ::-1].copy()
        one_side = bool(((np.diff(m, axis=1) >= 0).all(axis=1) & (m[:, -1] == 1)
                         | (np.diff(m, axis=1) <= 0).all(axis=1) & (m[:, 0] == 1)).all())
        rows = m if kind != 2 else np.stack([np.roll(r, len(r) - r.sum()) for r in m])
        image_kept = bool(((ids.numpy() == engine.metadata["image_token_id"]) <= (rows == 1)).all())
        try:
            engine(input_ids=ids if kind != 2 else _right_padded(ids, torch.as_tensor(rows))[0], pixel_values=px,
                   attention_mask=m)
            assert one_side and image_kept, m
        except VtrError as e:
            assert not (one_side and image_kept), (m, e)
            assert "\n" not in str(e) and "attention_mask" in str(e), str(e)
    # a decode engine that reads a mask does not pair with a prefill engine that takes none (an older batch engine)
    old = load_engine(batch2("fastv").files[-1], threads=1)
    old.padded = False  # as an engine built before batch engines took a mask
    with pytest.raises(VtrError, match=r"does not pair .*attention_mask taken \(prefill: unpadded prompts\)"):
        _ = old.decode


def test_a_row_that_ends_early_is_cut_at_its_eos(tiny, batch2):
    engine = load_engine(batch2("fastv").files[-1], threads=1)
    ids, px, _ = two_prompts(tiny.hf_model.config)
    free = engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=STEPS, eos_token_id=[])
    first = free.tokens[:, 0].tolist()
    assert first[0] != first[1], "the two prompts must start their answers differently for row 0 to end alone"
    eos = first[0]
    out = engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=STEPS, eos_token_id=eos)
    assert out.lengths[0] == 1 and out.ended[0]
    row1 = free.tokens[1].tolist()
    n1 = row1.index(eos) + 1 if eos in row1 else STEPS  # row 1 runs on, unaffected, to its own EOS
    assert out.lengths[1] == n1 and out.ended[1] == (eos in row1)
    assert out.tokens[1, :n1].tolist() == row1[:n1] and out.tokens.shape[1] == n1


def test_batch_engines_keep_their_own_decode_engine_beside_batch_1_ones(tiny, batch2, folder):
    opt = batch2("fastv")
    assert opt.metadata["decode"]["file"] == decode_file_name(opt.metadata["model_id"], "float32", ".onnx", batch=2)
    assert opt.metadata["decode"]["file"].endswith("-b2.onnx")
    assert decode_file_name("abc", "float32", ".onnx") == "decode-abc-float32.onnx"  # batch 1 keeps its name
    one = optimize(load_model("tiny"), "none", {}, folder / "none-b1.onnx")
    assert one.metadata["batch"] == 1 and one.metadata["decode"]["file"] != opt.metadata["decode"]["file"]
    ids, px = tiny.example_inputs
    assert load_engine(one.files[-1], threads=1).generate(input_ids=ids, pixel_values=px, max_new_tokens=3).tokens.shape \
        == (1, 3)
    # a batch-1 prefill engine handed the batch-2 decode engine under its own decode file's name: refused
    decode1 = folder / one.metadata["decode"]["file"]
    saved = decode1.read_bytes()
    shutil.copyfile(folder / opt.metadata["decode"]["file"], decode1)
    try:
        with pytest.raises(VtrError, match=r"does not pair .*batch 2 \(prefill: 1\)"):
            load_engine(one.files[-1], threads=1).generate(input_ids=ids, pixel_values=px, max_new_tokens=3)
    finally:
        decode1.write_bytes(saved)


def test_the_cli_builds_generates_and_profiles_a_batch(tiny, batch2, fastv_b1, tmp_path):
    from PIL import Image

    engine = batch2("fastv").files[-1]
    imgs = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        imgs.append(tmp_path / f"img{i}.png")
        Image.new("RGB", (120, 90), colour).save(imgs[-1])
    run = CliRunner().invoke
    res = run(main, ["generate", str(engine), "--image", str(imgs[0]), "--image", str(imgs[1]), "--ids", "5,6,image,7",
                     "--max-new-tokens", "3", "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output[res.output.index("{\n"):])
    assert [len(s["tokens"]) for s in rec["sequences"]] == [3, 3] and rec["prompt_tokens"] == 3 + 36
    # each row equals that image's answer from a batch-1 engine of the same method and model
    single = fastv_b1
    for img, seq in zip(imgs, rec["sequences"], strict=True):
        res = run(main, ["generate", str(single), "--image", str(img), "--ids", "5,6,image,7", "--max-new-tokens", "3",
                         "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output[res.output.index("{\n"):])["tokens"] == seq["tokens"]
    # two prompts of two lengths: left-padded, each row its prompt's answer from the batch-1 engine
    res = run(main, ["generate", str(engine), "--image", str(imgs[0]), "--image", str(imgs[1]), "--ids", "5,image,7",
                     "--ids", "5,6,8,image,7", "--max-new-tokens", "3", "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output[res.output.index("{\n"):])
    assert rec["prompt_tokens"] == 4 + 36 and [s["prompt_tokens"] for s in rec["sequences"]] == [2 + 36, 4 + 36]
    for img, text, seq in zip(imgs, ["5,image,7", "5,6,8,image,7"], rec["sequences"], strict=True):
        res = run(main, ["generate", str(single), "--image", str(img), "--ids", text, "--max-new-tokens", "3", "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output[res.output.index("{\n"):])["tokens"] == seq["tokens"]
    # an image count that is not the batch, or a prompt count that is neither 1 nor B: one line, exit 2
    for args, words in [(["--image", str(imgs[0]), "--ids", "5,image,7"], "takes 2 images per run"),
                        (["--image", str(imgs[0]), "--image", str(imgs[1]), "--ids", "5,image", "--ids", "5,image,7",
                          "--ids", "6,image,7"], "one per image")]:
        res = run(main, ["generate", str(engine), *args])
        assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output
        assert len([ln for ln in res.output.splitlines() if ln.startswith("error:")]) == 1, res.output
    # profile and eval: engines of two batch sizes are not compared
    res = run(main, ["profile", str(engine), "--baseline", str(single), "--reps", "1", "--new-tokens", "0"])
    assert res.exit_code == 2 and "same --batch" in res.output, res.output
    res = run(main, ["eval", str(engine), "--baseline", str(single), "--count", "2", "--no-speed"])
    assert res.exit_code == 2 and "same --batch" in res.output, res.output


def test_a_bad_batch_is_refused(tmp_path):
    res = CliRunner().invoke(main, ["optimize", "tiny", "--method", "fastv", "--batch", "0", "--out",
                                    str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "--batch" in res.output and not list(tmp_path.iterdir())
    with pytest.raises(VtrError, match="--batch 0"):
        load_model("tiny", batch=0)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen3vl-tiny", "internvl-tiny", "onevision-tiny"])
def test_other_families_generate_each_row_as_its_prompt_alone(model, tmp_path):
    """Qwen-VL (mRoPE positions on the host, DeepStack additions, the tower's per-image split given as ints),
    InternVL and OneVision: each row of a batch-2 FastV pair, one of them left-padded, generates what a batch-1
    pair gives its prompt."""
    from vtrcompile.profile import profile_prompt

    two = optimize(load_model(model, batch=2), "fastv", {"keep": 8}, tmp_path / "b2.onnx")
    one = optimize(load_model(model), "fastv", {"keep": 8}, tmp_path / "b1.onnx")
    e2, e1 = load_engine(two.files[-1], threads=1), load_engine(one.files[-1], threads=1)
    ids, px = profile_prompt(e2.metadata, 6, 5)
    ids[1, :6] = ids[0, :6][::-1].copy()  # two texts as well as two images
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # row 1 three tokens shorter, left-padded
    rows = px.shape[0] // 2
    out = e2.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    for r in range(2):
        ref = e1.generate(input_ids=ids[r:r + 1, 3 * r:], pixel_values=px[r * rows:(r + 1) * rows], max_new_tokens=4,
                          eos_token_id=[])
        assert out.tokens[r].tolist() == ref.tokens[0].tolist()
        assert float(np.abs(out.logits[r] - ref.logits[0]).max()) <= REFERENCE_ATOL


def test_tensorrt_profiles_of_a_batch_engine_fix_its_batch(batch2, folder):
    from vtrcompile.engine.runners import read_engine_metadata
    from vtrcompile.lower.tensorrt import engine_profile

    meta = batch2("fastv").metadata
    shapes = engine_profile(meta, None, None).shapes
    assert [s[0] for s in shapes["input_ids"]] == [2, 2, 2] and shapes["pixel_values"][0][0] == 2
    assert shapes["attention_mask"] == shapes["input_ids"]
    decode = read_engine_metadata(folder / meta["decode"]["file"])
    dshapes = engine_profile(decode, None, 300).shapes
    assert dshapes.pop("past_lengths") == ((4,),) * 3  # one filled length per layer, whatever the batch
    assert all(s[0] == 2 for lo_opt_hi in dshapes.values() for s in lo_opt_hi)
    # the decode engine's mask is the prompt's: up to the longest prompt, the buffers beyond it
    assert dshapes["attention_mask"][2][1] == 300 and dshapes["past_key_values.0.key"][2][2] > 300


def test_decode_buffer_mask_blocks_each_rows_padding_and_the_unfilled_rows():
    from vtrcompile.models.decoder import buffer_mask

    like = torch.zeros(2, 1, 8)
    low = torch.finfo(torch.float32).min
    m = buffer_mask(torch.tensor(3), torch.tensor([0, 2]), 5, like)  # 5 rows, 3 filled
    assert m.shape == (2, 1, 1, 5) and m.dtype == torch.float32
    assert m[0, 0, 0].tolist() == [0.0, 0.0, 0.0, low, low]
    assert m[1, 0, 0].tolist() == [low, low, 0.0, low, low]
    full = buffer_mask(torch.tensor(4), None, 4, like)
    assert full.shape == (1, 1, 1, 4) and full.eq(0).all()


def _rewrite_metadata(path, change) -> None:
    """Apply `change` to an ONNX engine's vtrcompile metadata in place (its weights stay where they are)."""
    import onnx

    from vtrcompile.lower.onnx import METADATA_KEY

    m = onnx.load(str(path), load_external_data=False)
    for p in m.metadata_props:
        if p.key == METADATA_KEY:
            meta = json.loads(p.value)
            change(meta)
            p.value = json.dumps(meta, sort_keys=True)
    onnx.save(m, str(path))


def _drop_mask(meta):  # what a batch decode engine written before prompts could be padded declared
    meta["io"]["inputs"] = [t for t in meta["io"]["inputs"] if t["name"] != "attention_mask"]


STALE = {"no attention_mask input": _drop_mask,
         "another model's": lambda meta: meta.update(model_id="0" * 64),
         "an older engine format": lambda meta: meta.update(format=meta["format"] - 1)}


@pytest.mark.parametrize("stale", [s if s == "no attention_mask input" else pytest.param(s, marks=pytest.mark.slow)
                                   for s in STALE])
def test_a_decode_engine_in_the_folder_is_reused_only_when_it_matches(tiny, batch2, folder, stale, caplog,
                                                                    no_decode_cache):
    """ensure_decode_engine reuses the decode file already beside the prefill when its metadata matches the
    model, dtype, batch and inputs; a stale one under the same name is refused by the prefill engine, then rebuilt,
    and the pair generates what it did before."""
    import logging

    from vtrcompile.decode import ensure_decode_engine
    from vtrcompile.engine.runners import read_engine_metadata
    from vtrcompile.optimize import Target

    opt = batch2("fastv")
    path = folder / opt.metadata["decode"]["file"]
    model = load_model("tiny", batch=2)
    args = (model.hf_model, opt.metadata["model_id"], model.label, folder, Target(), 2)
    before = path.stat()
    with caplog.at_level(logging.INFO, logger="vtrcompile.decode"):
        assert ensure_decode_engine(*args) == path
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert "reused" in caplog.text

    ids, px, _, mask = two_prompts(tiny.hf_model.config, ((5, 8), (1, 3)))
    first = load_engine(opt.files[-1], threads=1).generate(input_ids=ids, pixel_values=px, attention_mask=mask,
                                                           max_new_tokens=3, eos_token_id=[])
    _rewrite_metadata(path, STALE[stale])
    with pytest.raises(VtrError, match="does not pair|no vtrcompile|format"):  # the stale engine is not used as is
        load_engine(opt.files[-1], threads=1).generate(input_ids=ids, pixel_values=px, attention_mask=mask,
                                                       max_new_tokens=3)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vtrcompile.decode"):
        assert ensure_decode_engine(*args) == path
    assert "wrote decode engine" in caplog.text and "reused" not in caplog.text
    meta = read_engine_metadata(path)
    assert meta["model_id"] == opt.metadata["model_id"] and meta["format"] == read_engine_metadata(opt.files[-1])["format"]
    assert [t["name"] for t in meta["io"]["inputs"]][-1] == "attention_mask"
    again = load_engine(opt.files[-1], threads=1).generate(input_ids=ids, pixel_values=px, attention_mask=mask,
                                                           max_new_tokens=3, eos_token_id=[])
    assert again.tokens.tolist() == first.tokens.tolist()  # the rebuilt decode engine generates as the first
    assert float(np.abs(again.logits - first.logits).max()) <= REFERENCE_ATOL
