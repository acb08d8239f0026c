"""One-file OpenVINO engines (`optimize --out x.xml --one-file`, lower/openvino_phases.py): the prefill and the decode
IR as the bodies of one If, every weight stored once and mapped once; generation unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import check_generation, prompts
from tests.lower.test_onnx_phases import ENGINES, GENERATION_PARAMS, STEPS, assert_generates_as_the_pair
from vtrcompile import load_engine
from vtrcompile.engine.metadata import PHASE_INPUT
from vtrcompile.errors import VtrError
from vtrcompile.optimize import Target, write_engine

ov = pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def one_ir(tiny, tiny_build, tmp_path_factory):
    """name -> (the one-file IR, the prefill IR of the pair it was joined from (FastV only), the decode IR), each
    built on first use."""
    folder = tmp_path_factory.mktemp("one-file-ir")

    class OneIrs(dict):
        def __missing__(self, name):
            method, opts = ENGINES[name]
            b = tiny_build(method, **opts)
            pair = write_engine(b, tiny, folder / f"{name}.pair.xml", Target(backend="openvino")) \
                if name == "fastv-k2-18" else None
            one = write_engine(b, tiny, folder / f"{name}.xml", Target(backend="openvino", one_file=True))
            self[name] = (one.files[-1], pair and pair.files[-1], next(folder.glob("decode-*.xml")))
            return self[name]

    return OneIrs()


def _big_constants(model, min_bytes=4096) -> list:
    return [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant" and op.get_byte_size() >= min_bytes]


def test_one_ir_maps_each_weight_once(one_ir):
    """One If on the phase flag; every weight of the decode body is mapped onto the same bytes as a prefill body
    constant (what the CPU plugin packs once), so the memory check counts the LLM's weights once."""
    from vtrcompile.lower.openvino import compiled_weight_bytes, read_ir

    one_path, prefill_path, decode_path = one_ir["fastv-k2-18"]
    model, meta = read_ir(one_path)
    assert [op.get_type_name() for op in model.get_ordered_ops() if op.get_type_name() not in
            ("Parameter", "Result")] == ["If"]
    assert model.inputs[0].get_any_name() == PHASE_INPUT
    node = next(op for op in model.get_ordered_ops() if op.get_type_name() == "If")
    prefill_body, decode_body = node.get_function(0), node.get_function(1)
    at = {(c.get_data().ctypes.data, c.get_byte_size()) for c in _big_constants(prefill_body)}
    decode_weights = _big_constants(decode_body)
    assert decode_weights and all((c.get_data().ctypes.data, c.get_byte_size()) in at for c in decode_weights)
    prefill, decode = read_ir(prefill_path)[0], read_ir(decode_path)[0]
    one_bytes, prefill_bytes = compiled_weight_bytes(model, "f32"), compiled_weight_bytes(prefill, "f32")
    assert prefill_bytes <= one_bytes < prefill_bytes + 0.01 * compiled_weight_bytes(decode, "f32")
    # on disk too: the joined .bin holds the prefill's bytes, not the decode engine's again
    assert one_path.with_suffix(".bin").stat().st_size <= 1.01 * prefill_path.with_suffix(".bin").stat().st_size
    assert meta["decode"]["file"] == one_path.name and meta["decode"]["metadata"]["role"] == "decode"
    assert meta["backend"] == meta["decode"]["metadata"]["backend"] == "openvino"


@pytest.mark.parametrize("name,positions,prefill", GENERATION_PARAMS)
def test_one_ir_generates_the_spec_reference(tiny, one_ir, name, positions, prefill):
    """The decode phase runs on the prefill's compiled model, and the generated tokens, per-step logits and cache
    lengths equal the spec's eager reference, as the pair's do."""
    engine = load_engine(one_ir[name][0], threads=1)
    assert engine.decode.compiled is engine.prefill.compiled
    assert engine.decode.metadata["role"] == "decode"
    check_generation(engine, tiny.hf_model, prompts(tiny.hf_model.config)[:2], prefill, positions, STEPS)


def test_one_ir_equals_the_pair(tiny, one_ir):
    """Sampled, so that the token each step feeds back is the sampled one in both."""
    one_path, prefill_path, _ = one_ir["fastv-k2-18"]
    assert_generates_as_the_pair(one_path, prefill_path, tiny.hf_model.config, temperature=2.0, seed=3)


def test_a_one_ir_whose_decode_half_is_damaged_is_refused_in_one_line(one_ir, tmp_path):
    import openvino as ov

    from vtrcompile.lower.onnx import METADATA_KEY
    from vtrcompile.lower.openvino import OvEngine, read_ir

    model, meta = read_ir(one_ir["fastv-k2-18"][0])
    meta["decode"]["metadata"] = {"role": "prefill"}
    model.set_rt_info(json.dumps(meta), [METADATA_KEY])
    ov.save_model(model, str(tmp_path / "bad.xml"), compress_to_fp16=False)
    with pytest.raises(VtrError, match="decode half is damaged") as e:
        OvEngine(tmp_path / "bad.xml", threads=1)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_cli_writes_one_ir_when_asked(tmp_path):
    """`optimize --out x.xml --one-file` writes one IR (its metadata names itself as the decode engine) beside the
    decode IR it was joined with; no staging folder is left."""
    from tests.test_cli import _run
    from vtrcompile.engine.runners import read_engine_metadata

    out = tmp_path / "x.xml"
    res = _run("optimize", "tiny", "--method", "fastv", "--keep", "8", "--out", str(out), "--one-file")
    assert res.exit_code == 0, res.output
    meta = read_engine_metadata(out)
    assert meta["decode"]["file"] == out.name and "metadata" in meta["decode"]
    assert f"decode engine: in {out} (one file)" in res.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_the_cpu_plugin_packs_a_weight_both_bodies_read_once(tmp_path):
    """What the layout rests on, measured: a 64 MiB weight read by a MatMul in each phase. Two compiled models take
    a packed copy each; the joined IR, both bodies run, takes one (anonymous memory the process grew by)."""
    import gc

    import openvino as ov
    import openvino.opset13 as ops

    from vtrcompile.lower.openvino_phases import join_phases
    from vtrcompile.memory import anonymous_bytes

    n = 4096
    w = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)

    def phase(rows: int):
        x = ops.parameter([rows, n], ov.Type.f32, name="x")
        x.output(0).get_tensor().set_names({"x"})
        y = ops.matmul(x, ops.constant(w), False, True)
        y.output(0).get_tensor().set_names({"y"})
        return ov.Model([ops.result(y)], [x])

    for name, rows in (("prefill", 8), ("decode", 1)):
        ov.save_model(phase(rows), str(tmp_path / f"{name}.xml"), compress_to_fp16=False)
    core = ov.Core()
    joined = join_phases(core.read_model(tmp_path / "prefill.xml"), core.read_model(tmp_path / "decode.xml"),
                         {"decode": {}}, {"role": "decode"}, "one.xml")
    ov.save_model(joined, str(tmp_path / "one.xml"), compress_to_fp16=False)
    del joined
    config = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"}

    def growth(run) -> float:
        gc.collect()
        before = anonymous_bytes()
        held = run()
        grown = (anonymous_bytes() - before) / w.nbytes
        del held
        return grown

    def pair():
        compiled = [core.compile_model(core.read_model(tmp_path / f"{p}.xml"), "CPU", config) for p in ("prefill", "decode")]
        for c, rows in zip(compiled, (8, 1), strict=True):
            c.create_infer_request().infer({"x": np.ones((rows, n), np.float32)})
        return compiled

    def one():
        compiled = core.compile_model(core.read_model(tmp_path / "one.xml"), "CPU", config)
        request = compiled.create_infer_request()
        for flag, rows in ((True, 8), (False, 1)):
            request.infer({"prefill": np.array(flag), "x": np.ones((rows, n), np.float32)})
        return compiled, request

    one_copy, two_copies = growth(one), growth(pair)  # the one file first: nothing freed before it to reuse
    assert two_copies > 1.6, two_copies  # the check can fail: two compiled models pack two copies
    assert one_copy < 1.4, one_copy


def _saved_if(tmp_path, outside_constant=False):
    """A saved IR of one If whose bodies each add a 64 KiB weight (and, if asked, a constant outside the If)."""
    import openvino.opset13 as ops

    def body(value):
        x = ops.parameter([4, 4096], ov.Type.f32, name="x")
        w = ops.constant(np.full((4, 4096), value, np.float32))
        w.set_friendly_name(f"weight{value}")
        return ov.Model([ops.result(ops.add(x, w))], [x])

    flag, x = ops.parameter([], ov.Type.boolean, name="flag"), ops.parameter([4, 4096], ov.Type.f32, name="x")
    node = ops.if_op(flag.output(0))
    then_body, else_body = body(1), body(2)
    node.set_then_body(then_body)
    node.set_else_body(else_body)
    node.set_input(x.output(0), then_body.get_parameters()[0], else_body.get_parameters()[0])
    out = node.set_output(then_body.get_results()[0], else_body.get_results()[0])
    if outside_constant:
        out = ops.add(out, ops.constant(np.ones((4, 4096), np.float32)))
    ov.save_model(ov.Model([ops.result(out)], [flag, x]), str(tmp_path / "if.xml"), compress_to_fp16=False)
    return tmp_path / "if.xml"


def test_the_bodies_constants_are_pointed_at_their_spans_of_the_store(tmp_path):
    """Each body's constant gets its own span by name (the two bodies' spans are looked up apart); a constant
    outside the If, or one the spans do not name or size, is an internal error, never a wrong offset."""
    import xml.etree.ElementTree as ET

    from vtrcompile.lower.openvino_store import point_bodies_at_store

    size = 4 * 4096 * 4
    xml = point_bodies_at_store(_saved_if(tmp_path), {"weight1": (1000, size)}, {"weight2": (7 * size, size)})
    got = {ly.get("name"): ly.find("data").get("offset") for ly in ET.fromstring(xml).iter("layer")
           if ly.get("type") == "Const"}
    assert got == {"weight1": "1000", "weight2": str(7 * size)}
    for then_spans, else_spans in (({"weight1": (0, size)}, {"weight1": (0, size)}),  # weight2 not named
                                   ({"weight1": (0, size - 4)}, {"weight2": (0, size)}),  # the size differs
                                   ({"weight1": (0, size), "extra": (0, 4)}, {"weight2": (0, size)})):  # one missing
        with pytest.raises(VtrError, match="internal"):
            point_bodies_at_store(tmp_path / "if.xml", then_spans, else_spans)
    with pytest.raises(VtrError, match="outside the If"):
        point_bodies_at_store(_saved_if(tmp_path, outside_constant=True), {"weight1": (0, size)},
                              {"weight2": (0, size)})


def test_blanking_swaps_only_the_weights_for_unwritten_zeros():
    """Floating constants of 64 KiB or more become zeros over one buffer, keeping their names, types and shapes;
    small ones and integer ones (shape arithmetic reads them) keep their values."""
    import openvino.opset13 as ops

    from vtrcompile.lower.openvino_store import blank_weights

    x = ops.parameter([2, 8192], ov.Type.f32, name="x")
    weight = ops.constant(np.full((2, 8192), 3.0, np.float32))
    weight.set_friendly_name("weight")
    small = ops.constant(np.full((2, 1), 5.0, np.float32))
    shape = ops.constant(np.array([8192, 2], np.int64))
    y = ops.reshape(ops.add(ops.add(x, weight), small), shape, special_zero=False)
    model = ov.Model([ops.result(y)], [x])
    zeros = blank_weights(model)
    consts = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
    blank = consts["weight"]
    assert blank.get_data().ctypes.data == zeros.ctypes.data and not blank.get_data().any()
    assert list(blank.get_output_shape(0)) == [2, 8192] and blank.get_element_type() == ov.Type.f32
    kept = [c.get_data().tolist() for n, c in consts.items() if n != "weight"]
    assert sorted(kept, key=str) == sorted([[[5.0], [5.0]], [8192, 2]], key=str)
