"""ONNX lowering: ONNX Runtime equals the eager references; the TensorRT preflight; atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from tests.conftest import REFERENCE_ATOL, SECOND_BUDGETS, SLOW_ENGINES, budget_params, max_diff, prompts
from vtrcompile.errors import VtrError
from vtrcompile.lower.atomic import write_atomically
from vtrcompile.lower.onnx import export_onnx, read_metadata
from vtrcompile.lower.onnxruntime import OrtEngine, check_prompt
from vtrcompile.lower.tensorrt_preflight import preflight
from vtrcompile.reference.baselines import (
    dart_site,
    divprune_stage,
    gprune_stage,
    pool_stage,
    random_site,
    random_stage,
)
from vtrcompile.reference.methods import (
    fastv_reference,
    fastv_site,
    gprune_reference,
    pumer_reference,
    pyramiddrop_reference,
    pyramiddrop_sites,
    run_stages,
    vtw_reference,
)
from vtrcompile.reference.vision import prumerge_plus_reference, prumerge_reference, visionzip_reference


@pytest.fixture(scope="module")
def engines(tiny_engines):
    return tiny_engines


def _run(opt, ids, px):
    return OrtEngine(opt.files[-1], threads=1)(ids.numpy(), px.numpy())


def test_engine_io_matches_the_contract(engines):
    sess = OrtEngine(engines["fastv-k2-18"].files[-1]).session
    ins = {i.name: i for i in sess.get_inputs()}
    assert list(ins) == ["input_ids", "pixel_values"]
    assert ins["input_ids"].type == "tensor(int64)" and ins["pixel_values"].type == "tensor(float)"
    assert ins["input_ids"].shape == [1, "prompt"]  # dynamic prompt length, named as the metadata says
    outs = sess.get_outputs()
    assert outs[0].name == "logits" and outs[0].shape == [1, 320] and outs[0].type == "tensor(float)"
    # every decoder layer's cache, [B, kv_heads, S_l, head_dim], then the next positions
    assert [o.name for o in outs[1:-1]] == [f"present.{i}.{kv}" for i in range(4) for kv in ("key", "value")]
    assert outs[1].shape == [1, 2, "prompt", 16] and outs[-3].shape == [1, 2, "prompt - 18", 16]
    assert outs[-1].name == "next_layer_position_ids" and outs[-1].shape == [1, 4]
    meta = engines["fastv-k2-18"].metadata
    assert [t["name"] for t in meta["io"]["outputs"]] == [o.name for o in outs]
    assert meta["format"] == 4 and meta["role"] == "prefill" and meta["host_inputs"] == {}
    assert meta["pixel_rows"] == 1 and meta["decode"]["model_id"] == meta["model_id"]


def test_decode_engine_io_matches_the_contract(engines):
    """The decode engine reads each layer's cache buffer (its own capacity dim) and past_lengths, and returns the new
    token's keys and values: one row per layer (docs/engine.md, "Decode engine")."""
    meta = engines["fastv-k2-18"].metadata
    sess = OrtEngine(engines["fastv-k2-18"].files[-1].parent / meta["decode"]["file"]).session
    ins = {i.name: i for i in sess.get_inputs()}
    assert list(ins) == ["input_ids", "layer_position_ids",
                         *(f"past_key_values.{i}.{kv}" for i in range(4) for kv in ("key", "value")), "past_lengths"]
    assert ins["past_key_values.0.key"].shape == [1, 2, "capacity.0", 16]
    assert ins["past_key_values.3.value"].shape == [1, 2, "capacity.3", 16]
    assert ins["past_lengths"].shape == [4] and ins["past_lengths"].type == "tensor(int64)"
    outs = {o.name: o for o in sess.get_outputs()}
    assert list(outs) == ["logits", *(f"present.{i}.{kv}" for i in range(4) for kv in ("key", "value")),
                          "next_layer_position_ids"]
    assert all(outs[f"present.{i}.{kv}"].shape == [1, 2, 1, 16] for i in range(4) for kv in ("key", "value"))


def test_shared_runs_bind_the_cache_buffers_by_address_and_decode_outputs_to_buffers_taken_in_turn(tiny, engines):
    """ONNX Runtime shared runs (the generation loop) reuse their bindings: the KvCache's torch buffers are bound by
    their address (a write into a buffer is what the next run reads, no copy); a decode step, whose outputs have
    fixed shapes, writes them into buffers of two bindings taken in turn, so its outputs stay intact through the
    next shared run and are overwritten by the one after; a prefill's outputs, whose shapes follow the prompt, are
    new every run and may change shape from one shared run to the next."""
    from vtrcompile import load_engine
    from vtrcompile.engine.generate import decode_feeds
    from vtrcompile.engine.kv_cache import KvCache

    engine = load_engine(engines["fastv-k2-18"].files[-1], threads=1)
    assert engine.prefill._fixed is None and engine.decode._fixed is not None
    (ids, px), (ids2, px2) = prompts(tiny.hf_model.config)[:2]
    assert ids.shape[1] != ids2.shape[1]
    out = engine.prefill.run({"input_ids": ids.numpy(), "pixel_values": px.numpy()}, shared=True)
    kv = KvCache(out, 4, "float32", 3)
    feeds = decode_feeds(out, out["logits"].argmax(-1), kv)
    first = engine.decode.run(feeds, shared=True)
    kept = {k: v.copy() for k, v in first.items()}
    again = engine.decode.run(feeds, shared=True)
    assert all(np.array_equal(first[k], kept[k]) and not np.shares_memory(first[k], again[k]) for k in first)
    assert np.array_equal(again["logits"], kept["logits"])
    kv.buffers[0][:, :, : kv.lengths[0]] += 1.0  # in place: the bound buffer, read by the next run
    moved = engine.decode.run(feeds, shared=True)  # the first binding again: first's buffers, overwritten
    assert all(np.shares_memory(moved[k], first[k]) for k in first)
    assert not np.array_equal(moved["logits"], kept["logits"])
    assert all(shared.keys["past_key_values.0.key"][0] == kv.buffers[0].data_ptr()  # bound, not copied
               for shared in engine.decode._shared)
    unshared = engine.decode.run(feeds)  # bound anew, its outputs ONNX Runtime's
    assert np.array_equal(unshared["logits"], moved["logits"]) and not np.shares_memory(unshared["logits"],
                                                                                         moved["logits"])
    out2 = engine.prefill.run({"input_ids": ids2.numpy(), "pixel_values": px2.numpy()}, shared=True)
    assert out2["present.0.key"].shape[2] == ids2.shape[1] and out["present.0.key"].shape[2] == ids.shape[1]


# tiny engine -> the eager reference it must equal (every method, two budgets each)
REFERENCES = [
    ("fastv-k2-18", lambda m, i, p: fastv_reference(m, i, p, 2, 18)),
    ("fastv-k1-5", lambda m, i, p: fastv_reference(m, i, p, 1, 5)),
    ("gprune-9", lambda m, i, p: gprune_reference(m, i, p, 9)),
    ("gprune-default", lambda m, i, p: gprune_reference(m, i, p, 18)),
    ("pyramiddrop", lambda m, i, p: pyramiddrop_reference(m, i, p, 0.5)),
    ("vtw", lambda m, i, p: vtw_reference(m, i, p, 2)),
    ("pumer", lambda m, i, p: pumer_reference(m, i, p, 0.1, 0.3)),
    ("prumerge", lambda m, i, p: prumerge_reference(m, i, p, 8)),
    ("prumerge-plus", lambda m, i, p: prumerge_plus_reference(m, i, p, 0.125)),
    ("visionzip", lambda m, i, p: visionzip_reference(m, i, p, 8, 4)),
    ("pyramiddrop-0.7", lambda m, i, p: pyramiddrop_reference(m, i, p, 0.7)),
    ("vtw-1", lambda m, i, p: vtw_reference(m, i, p, 1)),
    ("pumer-0.2", lambda m, i, p: pumer_reference(m, i, p, 0.2, 0.2)),
    ("prumerge-20", lambda m, i, p: prumerge_reference(m, i, p, 20)),
    ("prumerge-plus-0.25", lambda m, i, p: prumerge_plus_reference(m, i, p, 0.25)),
    ("visionzip-20-6", lambda m, i, p: visionzip_reference(m, i, p, 20, 6)),
    ("random", lambda m, i, p: run_stages(m, i, p, first=random_stage(36))),
    ("pool", lambda m, i, p: run_stages(m, i, p, first=pool_stage(3))),
    ("divprune-9", lambda m, i, p: run_stages(m, i, p, first=divprune_stage(9))),
    ("dart-12", lambda m, i, p: run_stages(m, i, p, sites={2: dart_site(m, keep=12)})),
    ("divprune+fastv", lambda m, i, p: run_stages(m, i, p, first=divprune_stage(20), sites={2: fastv_site(m, 8)})),
    ("gprune+pyramiddrop", lambda m, i, p: run_stages(m, i, p, first=gprune_stage(20),
                                                       sites=pyramiddrop_sites(m, 4))),
    ("random-llm2", lambda m, i, p: run_stages(m, i, p, sites={2: random_site(10, seed=3)})),
    ("pool-9", lambda m, i, p: run_stages(m, i, p, first=pool_stage(side=3))),
    ("divprune-default", lambda m, i, p: run_stages(m, i, p, first=divprune_stage(4))),
    ("dart-20", lambda m, i, p: run_stages(m, i, p, sites={1: dart_site(m, keep=20)})),
    ("pool+dart", lambda m, i, p: run_stages(m, i, p, first=pool_stage(side=4), sites={1: dart_site(m, keep=12)})),
]


@pytest.mark.parametrize("name,ref", budget_params(REFERENCES))
def test_onnxruntime_equals_eager_reference(tiny, engines, name, ref):
    """Every method, two budgets each, several prompt lengths through one engine."""
    m = tiny.hf_model
    for ids, px in prompts(m.config):
        assert max_diff(_run(engines[name], ids, px), ref(m, ids, px)) <= REFERENCE_ATOL


def test_random_engine_records_its_subset(engines):
    """The drawn indices and numpy's version are in the metadata; the engine keeps exactly those tokens."""
    meta = read_metadata(engines["random"].files[-1])
    (red,) = meta["reductions"]
    assert red["indices"] == sorted(np.random.Generator(np.random.PCG64(0)).permutation(36)[:18].tolist())
    assert red["numpy"] == np.__version__ and red["positions"] == "renumber" and red["site"] == "projector"


def test_stacked_engine_records_both_stages(engines):
    meta = read_metadata(engines["divprune+fastv"].files[-1])
    assert meta["method"] == "divprune+fastv" and meta["options"]["then"] == "fastv keep=8"
    assert [(r["method"], r["layer"], r["count"], r["positions"]) for r in meta["reductions"]] == [
        ("divprune", 0, 20, "renumber"), ("fastv", 2, 8, "keep")]


def test_baseline_engine_equals_the_model(tiny, engines):
    for ids, px in prompts(tiny.hf_model.config):
        with torch.no_grad():
            assert max_diff(_run(engines["none"], ids, px), tiny.module(ids, px)) <= REFERENCE_ATOL


@pytest.mark.slow  # exports the demo model's one-file engine in float16 (about 30 s on 2 cores)
def test_float16_one_file_generates_what_the_float32_reference_does(tmp_path):
    """`--dtype float16`, the precision a GPU user builds: the demo model's FastV 64 one-file engine holds its
    weights and every layer's cache in float16 and generates the float32 spec reference's tokens, per-step logits
    within F16_LOGIT_ATOL, each layer's cache the schedule's length."""
    from tests.lower.bf16_generation import F16_LOGIT_ATOL, check_fastv64_demo_generation
    from tests.models.test_demo_model import MODEL
    from vtrcompile import load_engine
    from vtrcompile.models.loading import load_model
    from vtrcompile.optimize import Target, optimize

    out = optimize(load_model(str(MODEL)), "fastv", {"keep": 64}, tmp_path / "f.onnx",
                   target=Target(dtype="float16", one_file=True)).files[-1]
    engine = load_engine(out, threads=2)
    assert engine.metadata["dtype"] == "float16"
    caches = {io["dtype"] for io in engine.metadata["io"]["outputs"] if io["name"].startswith("present.")}
    assert caches == {"float16"}
    check_fastv64_demo_generation(engine, atol=F16_LOGIT_ATOL)


def test_engines_pass_the_tensorrt_preflight(engines):
    for name in engines:
        if name not in SLOW_ENGINES:
            assert engines[name].findings == [], name


@pytest.mark.slow
def test_every_method_s_engine_passes_the_tensorrt_preflight(engines):
    for name in SLOW_ENGINES - SECOND_BUDGETS:
        assert engines[name].findings == [], name


def test_metadata_describes_the_engine(engines):
    meta = read_metadata(engines["fastv-k2-18"].files[-1])
    assert meta["method"] == "fastv" and meta["n_image"] == 36 and meta["image_token_id"] == 319
    assert meta["reductions"] == [{"method": "fastv", "site": "llm", "layer": 2, "count": 18, "positions": "keep"}]
    assert meta["llm_token_drop"] == [0, 0, 18, 18]
    base = read_metadata(engines["none"].files[-1])
    assert base["model_id"] == meta["model_id"]
    a, b, c = meta["flops_poly"]
    assert c > 0 and b > 0  # attention ~S^2, linear layers ~S


def test_engines_carry_no_stack_traces_of_the_machine_that_built_them(engines):
    """torch.onnx's per-node Python stack traces (the builder's file paths) are dropped at export; the name scopes
    that locate the selector's nodes stay. Checked on a reduced engine and on its decode engine."""
    import vtrcompile
    from vtrcompile.lower.onnx import STACK_TRACE_KEY
    from vtrcompile.lower.onnxruntime import selector_node_names

    opt = engines["fastv-k2-18"]
    prefill = onnx.load(str(opt.files[-1]), load_external_data=False)
    decode = onnx.load(str(opt.files[-1].parent / opt.metadata["decode"]["file"]), load_external_data=False)
    checkout = str(Path(vtrcompile.__file__).resolve().parents[1]).encode()
    for model in (prefill, decode):
        assert not [n.name for n in model.graph.node if any(p.key == STACK_TRACE_KEY for p in n.metadata_props)]
        assert checkout not in model.SerializeToString()
    assert {"selector", "gather"} <= set(selector_node_names(prefill).values())


def test_unreplaced_masked_scatter_fails_the_preflight(tiny, tmp_path):
    """The stock export (masked_scatter -> NonZero + ScatterND) is what the preflight exists to catch."""
    from vtrcompile.build import reexport
    from vtrcompile.capture import capture, editable_module
    from vtrcompile.passes.strip_runtime_asserts import strip_runtime_asserts

    ep = capture(tiny)
    gm = editable_module(ep)
    strip_runtime_asserts(gm)
    prog = reexport(gm, tiny.example_inputs, 38, 1024)
    export_onnx(prog, tmp_path / "stock.onnx", {})
    findings = preflight(tmp_path / "stock.onnx")
    assert any(f.op_type == "NonZero" and "data" in f.problem for f in findings)
    assert all(f.node for f in findings)  # named by node


def _topk_model(k_from_input: bool, k: int = 4) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5000])
    vals = helper.make_tensor_value_info("v", TensorProto.FLOAT, None)
    idx = helper.make_tensor_value_info("i", TensorProto.INT64, None)
    inputs, inits = [x], []
    if k_from_input:
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
    else:
        inits.append(helper.make_tensor("k", TensorProto.INT64, [1], [k]))
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="my_topk")
    return helper.make_model(helper.make_graph([node], "g", inputs, [vals, idx], inits))


def test_preflight_flags_topk_rules():
    assert preflight(_topk_model(False, 4)) == []
    (f,) = preflight(_topk_model(True))
    assert f.node == "my_topk" and "run time" in f.problem
    (f,) = preflight(_topk_model(False, 4000))
    assert "3840" in f.problem


def test_preflight_flags_unsupported_ops():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    n = helper.make_node("Unique", ["x"], ["y"], name="u")
    (f,) = preflight(helper.make_model(helper.make_graph([n], "g", [x], [y])))
    assert f.node == "u" and f.op_type == "Unique"


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path):
    out = tmp_path / "e.onnx"

    def boom(p: Path) -> None:
        p.write_bytes(b"partial")
        raise RuntimeError("exporter died")

    with pytest.raises(RuntimeError):
        write_atomically(out, boom)
    assert list(tmp_path.iterdir()) == []


def test_host_check_rejects_bad_prompts():
    ok = np.array([[1, 9, 9, 9, 2]])
    check_prompt(ok, 9, 3)
    with pytest.raises(VtrError, match="contiguous run of 3"):
        check_prompt(np.array([[9, 1, 9, 9, 2]]), 9, 3)
    with pytest.raises(VtrError, match="found 2"):
        check_prompt(np.array([[1, 9, 9, 2, 2]]), 9, 3)
    with pytest.raises(VtrError, match="followed by at least one text token"):
        check_prompt(np.array([[1, 2, 9, 9, 9]]), 9, 3)


def test_sessions_stop_spinning_after_each_run(engines):
    """A session's idle workers must not hold the cores while the next engine (the decode step, or the other
    engine of a timed pair) runs: lower/onnxruntime._thread_options."""
    eng = OrtEngine(engines["none"].files[-1], threads=2)
    opts = eng.session.get_session_options()
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    assert opts.intra_op_num_threads == 2


def test_onnxruntime_fuses_every_rmsnorm(engines, tmp_path):
    """The engines' RMSNorms (9 on the tiny preset's 4-layer LLM: two per layer and the final one) reach ONNX
    Runtime as divisions by a square root, which its optimizer fuses: one SimplifiedLayerNormalization each, no
    Reciprocal left (passes/replace_rsqrt_scaling.py; the decode step runs the same pass in decode.py)."""
    import collections

    import onnxruntime as ort

    prefill = [engines[name].files[-1] for name in ("none", "fastv-k2-18")]
    decode = sorted(prefill[0].parent.glob("decode-*.onnx"))  # the pair's decode step (no reduction), as well
    assert len(decode) == 1
    for i, path in enumerate([*prefill, *decode]):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(tmp_path / f"{i}.opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath,
                                                               load_external_data=False).graph.node)
        assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] == 9, ops
        assert ops["Reciprocal"] == 0


def test_onnxruntime_engines_run_each_attention_as_one_node(engines, tiny, tmp_path):
    """ONNX Runtime engines are written at ORT_OPSET, where each attention of the prefill is one `Attention` node
    (lower/onnx.py): no Softmax is left in the unmodified prefill, and FastV's only Softmax is its selector's. The
    ONNX that OpenVINO and TensorRT read is written at the exporter's default, with the attentions spelled out."""
    import collections

    from vtrcompile.engine.runners import read_engine_metadata
    from vtrcompile.lower.onnx import ORT_OPSET

    def ops(path):
        model = onnx.load(str(path), load_external_data=False)
        return {o.domain: o.version for o in model.opset_import}[""], collections.Counter(
            n.op_type for n in model.graph.node)

    layers = tiny.hf_model.config.text_config.num_hidden_layers
    for name, softmax in (("none", 0), ("fastv-k2-18", 1)):
        path = engines[name].files[-1]
        opset, counts = ops(path)
        assert opset == ORT_OPSET == read_engine_metadata(path)["onnx_opset"]
        assert counts["Attention"] > layers and counts["Softmax"] == softmax, counts  # the LLM's and the vision's
    default = tmp_path / "default.onnx"
    export_onnx(engines["none"].build.program, default, {})
    opset, counts = ops(default)
    assert opset < ORT_OPSET and counts["Attention"] == 0 and counts["Softmax"] > layers


def test_the_decode_step_rotates_each_query_and_key_with_one_node(engines, tiny):
    """The decode step writes each layer's rotary table in the plain form (models/decoder.layer_rotary), which the
    exporter fuses at ORT_OPSET: one `RotaryEmbedding` node for each layer's query and key, and no rotate-half
    (Neg) left; the prefill's reduced layers, whose tables are gathered to the kept tokens, keep theirs."""
    import collections

    layers = tiny.hf_model.config.text_config.num_hidden_layers
    decode = sorted(engines["none"].files[-1].parent.glob("decode-*.onnx"))
    assert len(decode) == 1
    ops = collections.Counter(n.op_type for n in onnx.load(str(decode[0]), load_external_data=False).graph.node)
    assert ops["RotaryEmbedding"] == 2 * layers and ops["Neg"] == 0, ops
    fastv = collections.Counter(n.op_type for n in onnx.load(str(engines["fastv-k2-18"].files[-1]),
                                                             load_external_data=False).graph.node)
    assert 0 < fastv["RotaryEmbedding"] < 2 * layers and fastv["Neg"] > 0, fastv


def test_an_engine_that_loads_but_cannot_run_fails_in_one_line(engines, tiny, tmp_path):
    """A damaged attribute can leave a graph that ONNX Runtime loads and then fails to run (found by fuzzing: one
    flipped bit gave the vision tower's convolution a kernel shape its weight does not fit). Every run path says so
    in one line that names the engine: the prefill, generation, and profile's timed runs."""
    import shutil

    from click.testing import CliRunner

    from vtrcompile import load_engine
    from vtrcompile.cli import main

    src = engines["fastv-k2-18"].files[-1]
    for f in src.parent.glob("decode-*.onnx"):
        shutil.copy(f, tmp_path / f.name)
    model = onnx.load(str(src))
    (conv,) = [n for n in model.graph.node if n.op_type == "Conv"]
    next(a for a in conv.attribute if a.name == "kernel_shape").ints[1] += 32
    path = tmp_path / "damaged.onnx"
    onnx.save(model, str(path))
    ids, px = prompts(tiny.hf_model.config)[0]
    engine = load_engine(path)  # it loads
    feeds = {"input_ids": ids.numpy(), "pixel_values": px.numpy()}
    for run in (lambda: engine(**feeds), lambda: engine.generate(max_new_tokens=2, **feeds)):
        with pytest.raises(VtrError) as e:
            run()
        assert str(e.value).startswith(f"{path}: ONNX Runtime failed running this engine") and "\n" not in str(e.value)
    res = CliRunner().invoke(main, ["profile", str(path), "--baseline", str(src), "--reps", "1", "--warmup", "0"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert line.startswith(f"error: {path}: ONNX Runtime failed running this engine") and "rebuild it" in line


def test_selector_share_survives_a_node_name_that_is_not_utf8(engines, tiny, tmp_path):
    """A node name whose bytes are not UTF-8 (a damaged copy that still runs): ONNX Runtime writes it into its
    profile as it is, and the selector-share measurement of `profile` must still read that profile."""
    import shutil

    from vtrcompile.lower.onnxruntime import reduction_share

    src = Path(engines["fastv-k2-18"].files[-1])
    for f in src.parent.glob("*.data"):
        shutil.copy(f, tmp_path / f.name)
    model = onnx.load(str(src), load_external_data=False)
    name = next(n.name for n in model.graph.node if n.name.startswith("node_") and len(n.name) > 8).encode()
    data = bytearray(src.read_bytes())
    at = data.find(name)
    data[at + len(name) - 1] = 0xB2  # the name's last byte: not UTF-8 on its own
    damaged = tmp_path / src.name
    damaged.write_bytes(bytes(data))
    ids, px = tiny.example_inputs
    share = reduction_share(damaged, ids.numpy(), px.numpy(), 1, 2, threads=1)
    assert set(share) == {"selector", "gather"} and 0 < share["selector"] < 1


def test_external_data_entries_are_read_once_and_damaged_numbers_are_a_problem(tmp_path):
    """Where a weight lies in its external file, read by one helper for the checks on load and for the weight
    bytes the memory check counts: an empty length counts as 0 (as the load check always read it), and an offset
    or length that is not a number is a one-line problem, not a ValueError."""
    from vtrcompile.lower.onnx import external_data_problem, initializer_bytes

    def model(length: str, offset: str = "0"):
        t = helper.make_tensor("w", TensorProto.FLOAT, [4], np.zeros(4, np.float32))
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", "w.data"), ("offset", offset), ("length", length)):
            e = t.external_data.add()
            e.key, e.value = k, v
        inline = helper.make_tensor("b", TensorProto.FLOAT16, [3, 5], np.zeros(15, np.float16))
        return helper.make_model(helper.make_graph([], "g", [], [], initializer=[t, inline]))

    (tmp_path / "w.data").write_bytes(bytes(16))
    assert external_data_problem(model("16"), tmp_path) is None
    assert initializer_bytes(model("16")) == 16 + 15 * 2
    assert external_data_problem(model(""), tmp_path) is None and initializer_bytes(model("")) == 15 * 2
    assert "truncated" in external_data_problem(model("16", "8"), tmp_path)
    for length, offset in (("x1", "0"), ("16", "1e3")):
        problem = external_data_problem(model(length, offset), tmp_path)
        assert problem is not None and "'w'" in problem and "damaged" in problem and "\n" not in problem
