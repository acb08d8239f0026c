"""One-file ONNX Runtime engines (`optimize --one-file`, lower/onnx_phases.py): the prefill and the decode engine
as the branches of one If, every weight stored once; generation unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.conftest import check_generation, prompts
from vtrcompile import load_engine
from vtrcompile.engine.metadata import PHASE_INPUT
from vtrcompile.errors import VtrError
from vtrcompile.lower.onnx import initializer_bytes
from vtrcompile.lower.onnx_phases import _content_key, merge_phases
from vtrcompile.lower.onnxruntime import reduction_share, selector_node_names
from vtrcompile.optimize import Target, write_engine
from vtrcompile.reference.methods import fastv_reference, pyramiddrop_reference

STEPS = 8
ENGINES = {"fastv-k2-18": ("fastv", {"layer": 2, "keep": 18}), "pyramiddrop": ("pyramiddrop", {})}
# each engine of ENGINES, its position policy, and the spec's eager prefill its generation is checked against (the
# OpenVINO one-file tests take the same cases)
GENERATION_CASES = [
    ("fastv-k2-18", "keep", lambda m, i, p: fastv_reference(m, i, p, 2, 18)),
    ("pyramiddrop", "renumber", lambda m, i, p: pyramiddrop_reference(m, i, p, 0.5)),
]
# FastV in the default run; PyramidDrop's renumbered positions through a one file in the slow set (the default run
# has them through the pair: tests/engine/test_generation.py)
GENERATION_PARAMS = [c if c[0] == "fastv-k2-18" else pytest.param(*c, marks=pytest.mark.slow) for c in GENERATION_CASES]


def assert_generates_as_the_pair(one_path, prefill_path, config, **sampling) -> None:
    """A one-file engine generates the tokens of the pair it was joined from, per-step logits and the prefill's
    logits within 1e-5."""
    one, pair = load_engine(one_path, threads=1), load_engine(prefill_path, threads=1)
    ids, px = prompts(config)[2]
    a = one.generate(input_ids=ids, pixel_values=px, max_new_tokens=STEPS, eos_token_id=[], **sampling)
    b = pair.generate(input_ids=ids, pixel_values=px, max_new_tokens=STEPS, eos_token_id=[], **sampling)
    assert a.tokens.tolist() == b.tokens.tolist()
    assert float(np.abs(a.logits - b.logits).max()) <= 1e-5
    assert float(np.abs(one(input_ids=ids, pixel_values=px) - pair(input_ids=ids, pixel_values=px)).max()) <= 1e-5


@pytest.fixture(scope="module")
def one_file(tiny, tiny_build, tmp_path_factory):
    """name -> (the one-file engine's path, the pair it was joined from: prefill path, decode path)."""
    folder = tmp_path_factory.mktemp("one-file")
    out = {}
    for name, (method, opts) in ENGINES.items():
        b = tiny_build(method, **opts)
        pair = write_engine(b, tiny, folder / f"{name}.pair.onnx")
        one = write_engine(b, tiny, folder / f"{name}.onnx", Target(one_file=True))
        out[name] = (one.files[-1], pair.files[-1], folder / pair.metadata["decode"]["file"])
    return out


def test_one_file_holds_each_weight_once(tiny, one_file):
    one_path, prefill_path, decode_path = one_file["fastv-k2-18"]
    one = onnx.load(str(one_path))
    onnx.checker.check_model(one, full_check=True)  # every name a branch reads is defined in scope
    assert [n.op_type for n in one.graph.node] == ["If"]
    assert one.graph.input[0].name == PHASE_INPUT
    keys = [_content_key(t, [one_path.parent]) for t in one.graph.initializer]
    assert len(keys) == len(set(keys))
    prefill, decode = onnx.load(str(prefill_path)), onnx.load(str(decode_path))
    union = {_content_key(t, [prefill_path.parent]): t for t in [*prefill.graph.initializer, *decode.graph.initializer]}
    assert set(keys) == set(union)
    shared = {_content_key(t, [decode_path.parent]) for t in decode.graph.initializer} & \
        {_content_key(t, [prefill_path.parent]) for t in prefill.graph.initializer}
    shared_bytes = sum(initializer_bytes(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], [union[k]])))
                       for k in shared)
    assert initializer_bytes(one) == initializer_bytes(prefill) + initializer_bytes(decode) - shared_bytes
    # the LLM's weights are what the two engines share: most of the decode engine's bytes
    assert shared_bytes > 0.9 * initializer_bytes(decode)
    # the selector's nodes are found inside the prefill branch, and ONNX Runtime's profile times them there
    assert len(selector_node_names(one)) == len(selector_node_names(prefill)) > 0
    ids, px = prompts(tiny.hf_model.config)[0]
    assert reduction_share(one_path, ids.numpy(), px.numpy(), 1, 2, threads=1)["selector"] > 0


@pytest.mark.parametrize("name,positions,prefill", GENERATION_PARAMS)
def test_one_file_generates_the_spec_reference(tiny, one_file, name, positions, prefill):
    """The decode phase runs in the prefill's session, and the generated tokens, per-step logits and cache
    lengths equal the spec's eager reference, as the engine pair's do."""
    engine = load_engine(one_file[name][0], threads=1)
    assert engine.decode.session is engine.prefill.session
    assert engine.decode.metadata["role"] == "decode"
    check_generation(engine, tiny.hf_model, prompts(tiny.hf_model.config)[:2], prefill, positions, STEPS)


def test_one_file_equals_the_pair(tiny, one_file):
    one_path, prefill_path, _ = one_file["fastv-k2-18"]
    assert_generates_as_the_pair(one_path, prefill_path, tiny.hf_model.config)


def test_profile_names_each_layout_and_warns_when_they_differ(one_file, caplog):
    """`profile` of a one-file engine against a pair: the ratios then include what the If costs, so the report
    names each engine's layout and the log says they differ; two engines of one layout raise no such warning."""
    import logging

    from vtrcompile.profile import compare

    one_path, prefill_path, _ = one_file["fastv-k2-18"]
    with caplog.at_level(logging.WARNING, logger="vtrcompile.profile"):
        mixed = compare(one_path, prefill_path, warmup=0, reps=2, threads=1, selector_reps=1)
    assert [mixed["engines"][k]["layout"] for k in ("reduced", "baseline")] == ["one file", "two files"]
    assert any("the ratios include the layouts' difference" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vtrcompile.profile"):
        same = compare(one_path, one_path, warmup=0, reps=2, threads=1, selector_reps=1)
    assert same["engines"]["baseline"]["layout"] == "one file"
    assert not any("layouts' difference" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("preset", ["qwen2vl-tiny", pytest.param("qwen3vl-tiny", marks=pytest.mark.slow),
                                    pytest.param("internvl-tiny", marks=pytest.mark.slow),
                                    pytest.param("llavanext-tiny", marks=pytest.mark.slow)])
def test_one_file_engines_of_every_family_generate_as_the_pair(preset, tmp_path):
    """`optimize` writes one file for every family now: a FastV one-file engine generates what the pair it was
    joined from generates (the pair is checked against the spec's reference in each family's tests), with the
    family's host inputs (Qwen: mRoPE positions computed from input_ids) fed to the right phase."""
    from tests.conftest import REFERENCE_ATOL
    from vtrcompile.build import build
    from vtrcompile.models.loading import load_model

    src = load_model(preset)
    b = build(src, "fastv", {})
    pair = write_engine(b, src, tmp_path / "pair.onnx").files[-1]
    one = write_engine(b, src, tmp_path / "one.onnx", Target(one_file=True)).files[-1]
    ids, px = (t.numpy() for t in src.example_inputs[:2])
    a, c = (load_engine(p, threads=1).generate(input_ids=ids, pixel_values=px, max_new_tokens=6, eos_token_id=[])
            for p in (pair, one))
    assert c.tokens.tolist() == a.tokens.tolist() and c.cache_lengths == a.cache_lengths
    assert float(np.abs(c.logits - a.logits).max()) <= REFERENCE_ATOL


@pytest.mark.slow
def test_one_file_with_its_own_external_data(tiny, tiny_build, one_file, tmp_path, monkeypatch):
    """A prefill engine whose weights go to external data (above 1.5 GB; here every size) is joined inside the
    temporary folder: its data file lands beside the one file under the one file's name, nothing else is left,
    and the engine generates what the one file with inline weights does."""
    from vtrcompile.lower import onnx as onnx_lower
    from vtrcompile.lower.onnx import external_data_problem

    monkeypatch.setattr(onnx_lower, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "x.onnx"
    res = write_engine(tiny_build("fastv", layer=2, keep=18), tiny, out, Target(one_file=True))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [p.name for p in res.files] == ["x.onnx.data", "x.onnx"] and "x.onnx.data" in names, names
    assert not [n for n in names if n.startswith(".")], names
    model = onnx.load(str(out), load_external_data=False)
    assert external_data_problem(model, tmp_path) is None
    ids, px = prompts(tiny.hf_model.config)[1]
    a, b = (load_engine(p, threads=1).generate(input_ids=ids, pixel_values=px, max_new_tokens=4, eos_token_id=[])
            for p in (out, one_file["fastv-k2-18"][0]))
    assert a.tokens.tolist() == b.tokens.tolist() and float(np.abs(a.logits - b.logits).max()) <= 1e-5


def test_a_failed_join_leaves_no_engine_at_the_output(tiny, tiny_build, tmp_path, monkeypatch):
    """The one file is written in one step: when the join fails, no prefill engine is left at the output path
    (before, the prefill engine was written there first), nor any temporary file; the decode engine, complete and
    written before, stays for the next build."""
    from vtrcompile.lower import onnx_phases

    def fail(*args, **kwargs):
        raise RuntimeError("join failed")

    monkeypatch.setattr(onnx_phases, "merge_phases", fail)
    with pytest.raises(RuntimeError, match="join failed"):
        write_engine(tiny_build("fastv", layer=2, keep=18), tiny, tmp_path / "x.onnx", Target(one_file=True))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "x.onnx" not in names and not [n for n in names if n.startswith(".")], names
    assert [n for n in names if n.startswith("decode-")], names


def test_a_piecewise_written_one_file_is_the_model_onnx_save_writes(one_file, tmp_path, monkeypatch):
    """save_piecewise (the join's writer: each initializer serialized alone) writes a file that loads as exactly the
    model written, ONNX Runtime's session gives what it gives for onnx.save's file, and the two files are the same
    size (the same fields, the graph's initializers last)."""
    import onnxruntime as ort

    from vtrcompile.lower.onnx import _varint, save_piecewise

    for n in (0, 1, 127, 128, 300, 2**31 + 5):  # protobuf's own varint encoding of an int64 field (key 0x18)
        assert _varint(n) == onnx.AttributeProto(i=n).SerializeToString()[1:]
    one_path = one_file["fastv-k2-18"][0]
    model = onnx.load(str(one_path))
    assert len(model.graph.initializer) > 10 and model.graph.node[0].op_type == "If" and model.metadata_props
    piecewise, whole = tmp_path / "piecewise.onnx", tmp_path / "whole.onnx"
    save_piecewise(model, piecewise)
    onnx.save(model, str(whole))
    assert piecewise.read_bytes() != whole.read_bytes() and piecewise.stat().st_size == whole.stat().st_size
    assert onnx.load(str(piecewise)).SerializeToString() == model.SerializeToString()
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (piecewise, whole)]
    assert [i.name for i in sessions[0].get_inputs()] == [i.name for i in sessions[1].get_inputs()]
    # over protobuf's limit, refused as onnx.save refuses it (no reader could parse the file)
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", piecewise.stat().st_size - 1)
    with pytest.raises(VtrError, match="over protobuf's 2 GB limit"):
        save_piecewise(model, tmp_path / "too-large.onnx")


def test_merge_refuses_engines_whose_outputs_differ(one_file):
    _, prefill_path, decode_path = one_file["fastv-k2-18"]
    prefill = onnx.load(str(prefill_path), load_external_data=False)
    decode = onnx.load(str(decode_path), load_external_data=False)
    del decode.graph.output[-1]
    with pytest.raises(ValueError, match="outputs differ"):
        merge_phases(prefill, decode, [prefill_path.parent], "x.onnx")


def test_one_file_needs_onnxruntime_or_openvino_and_a_decode_engine(tiny, tiny_build, tmp_path):
    from vtrcompile.optimize import check_target

    with pytest.raises(VtrError, match="--one-file joins ONNX Runtime and OpenVINO engines"):
        check_target(Target(backend="aoti", one_file=True))
    out = tmp_path / "e.onnx"
    with pytest.raises(VtrError, match="an exported program has none"):
        write_engine(tiny_build("fastv", layer=2, keep=18), tiny, out, Target(one_file=True), decode=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_one_file_for_another_backend(tmp_path):
    from tests.test_cli import _assert_clean_error, _run

    res = _run("optimize", "tiny", "--method", "fastv", "--out", str(tmp_path / "x.pt2"), "--one-file")
    _assert_clean_error(res, tmp_path, "--one-file", "aoti")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flags,one", [([], True), (["--two-files"], False),
                                       pytest.param(["--one-file"], True, marks=pytest.mark.slow)])
def test_cli_writes_one_file_by_default_and_two_files_when_asked(tmp_path, flags, one):
    """`optimize --out x.onnx` writes one file (its metadata names itself as the decode engine, and its graph takes
    the phase flag); --two-files writes the prefill engine alone, paired with the decode engine beside it."""
    import json

    from tests.test_cli import _run
    from vtrcompile.lower.onnx import read_metadata

    out = tmp_path / "x.onnx"
    res = _run("optimize", "tiny", "--method", "fastv", "--keep", "8", "--out", str(out), *flags)
    assert res.exit_code == 0, res.output
    meta = read_metadata(out)
    takes_flag = PHASE_INPUT in {i.name for i in onnx.load(str(out), load_external_data=False).graph.input}
    assert (meta["decode"]["file"] == out.name) == one == takes_flag, (flags, json.dumps(meta["decode"])[:200])
    assert ("metadata" in meta["decode"]) == one and (tmp_path / meta["decode"]["file"]).is_file()
    said = f"decode engine: in {out} (one file)" if one else f"decode engine: {tmp_path / meta['decode']['file']}"
    assert said in res.output


def test_an_exported_program_gets_a_prefill_engine_alone_by_default(tiny, tmp_path):
    """A model given as an exported program cannot decode: without a flag `optimize` writes the prefill engine
    alone (as before one file was the default); --one-file asked for explicitly is refused in one line."""
    import torch

    from tests.test_cli import _assert_clean_error, _run
    from vtrcompile.capture import capture
    from vtrcompile.lower.onnx import read_metadata

    program = tmp_path / "m.pt2"
    torch.export.save(capture(tiny), program)
    out = tmp_path / "out" / "x.onnx"
    out.parent.mkdir()
    res = _run("optimize", str(program), "--method", "fastv", "--keep", "8", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert read_metadata(out)["decode"] is None and [p.name for p in out.parent.iterdir()] == ["x.onnx"]
    refused = tmp_path / "refused"
    refused.mkdir()
    _assert_clean_error(_run("optimize", str(program), "--method", "fastv", "--keep", "8", "--one-file", "--out",
                             str(refused / "y.onnx")), refused, "--one-file", "exported program")
    assert not any(refused.iterdir())


@pytest.mark.parametrize("damage", ["not a dict", "prefill role", "no io", "flag input renamed"])
def test_a_damaged_one_file_engine_is_one_line(one_file, tmp_path, damage):
    import json

    from vtrcompile.lower.onnx import METADATA_KEY

    model = onnx.load(str(one_file["fastv-k2-18"][0]))
    prop = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(prop.value)
    if damage == "not a dict":
        meta["decode"]["metadata"] = "x"
    elif damage == "prefill role":
        meta["decode"]["metadata"]["role"] = "prefill"
    elif damage == "no io":
        del meta["decode"]["metadata"]["io"]
    else:
        model.graph.input[0].name = "phase"
        model.graph.node[0].input[0] = "phase"
    prop.value = json.dumps(meta)
    path = tmp_path / "damaged.onnx"
    onnx.save(model, str(path))
    with pytest.raises(VtrError, match="damaged|lacks io"):
        load_engine(path, threads=1)


@pytest.mark.slow
def test_a_batch_one_file_engine_takes_left_padded_prompts(tmp_path):
    """Batch engines: both phases read attention_mask (one input of the joined graph); a left-padded row
    generates what the pair generates."""
    from vtrcompile.models.loading import load_model
    from vtrcompile.optimize import optimize

    src = load_model("tiny", batch=2)
    pair = optimize(src, "fastv", {"keep": 8}, tmp_path / "pair.onnx").files[-1]
    one = optimize(src, "fastv", {"keep": 8}, tmp_path / "one.onnx", target=Target(one_file=True)).files[-1]
    a, b = load_engine(pair, threads=1), load_engine(one, threads=1)
    (ids, px), (ids2, px2) = prompts(src.hf_model.config)[:2]
    width = max(ids.shape[1], ids2.shape[1])
    rows = np.zeros((2, width), dtype=np.int64)
    mask = np.zeros((2, width), dtype=np.int64)
    for r, x in enumerate((ids, ids2)):
        rows[r, width - x.shape[1]:], mask[r, width - x.shape[1]:] = x[0].numpy(), 1
    pixels = np.concatenate([px.numpy(), px2.numpy()])
    got = b.generate(input_ids=rows, pixel_values=pixels, attention_mask=mask, max_new_tokens=STEPS, eos_token_id=[])
    want = a.generate(input_ids=rows, pixel_values=pixels, attention_mask=mask, max_new_tokens=STEPS,
                      eos_token_id=[])
    assert got.tokens.tolist() == want.tokens.tolist()
    assert float(np.abs(got.logits - want.logits).max()) <= 1e-5
