"""The IR that points at the weight store (lower/openvino_store.py): on a hand-made ONNX file with one weight in
a store and one inline, the stand-in swap, the XML edit, and the IR's numbers against numpy."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from vtrcompile.errors import VtrError
from vtrcompile.lower.weight_store import WeightStore

ov = pytest.importorskip("openvino")
from vtrcompile.lower.openvino_store import point_at_store, stand_in_weights, stored_initializers  # noqa: E402

RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 5)).astype(np.float32)
B = RNG.standard_normal(5).astype(np.float32)


def _onnx(path, store: WeightStore | None, location: str | None = None):
    """y = x @ W + B; W in `store` (appended after another tensor, so its offset is not 0), or inline."""
    if store is not None:
        store.tensor("other", lambda: torch.arange(7, dtype=torch.float32))
        offset, length = store.tensor("W", lambda: torch.from_numpy(W))
        w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=W.shape)
        w.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location or store.data.name), ("offset", str(offset)), ("length", str(length))):
            w.external_data.add(key=k, value=v)
    else:
        w = helper.make_tensor("W", TensorProto.FLOAT, W.shape, W.ravel())
    b = helper.make_tensor("B", TensorProto.FLOAT, B.shape, B)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], initializer=[w, b])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _skeleton(tmp_path, store):
    model = ov.Core().read_model(str(tmp_path / "m.onnx"))
    spans = stand_in_weights(model, tmp_path / "m.onnx", store.data.name)
    ov.save_model(model, str(tmp_path / "skeleton.xml"), compress_to_fp16=False)
    return model, spans


def test_a_stored_weight_becomes_a_constant_at_its_offset_in_the_store(tmp_path):
    store = WeightStore(tmp_path, "m", "float32")
    _onnx(tmp_path / "m.onnx", store)
    model, spans = _skeleton(tmp_path, store)
    assert [p.get_friendly_name() for p in model.get_parameters()] == ["x", *spans]  # the stand-in, after x
    assert list(spans.values()) == [tuple(store.index["W"])]
    before = store.data.stat().st_size
    xml = point_at_store(tmp_path / "skeleton.xml", tmp_path / "skeleton.bin", spans, store)
    small = (tmp_path / "skeleton.bin").read_bytes()
    assert store.data.stat().st_size == before + len(small)  # the saved constants (B), appended once
    point_at_store(tmp_path / "skeleton.xml", tmp_path / "skeleton.bin", spans, store)
    assert store.data.stat().st_size == before + len(small)  # the same bytes again: not appended twice
    layers = ET.fromstring(xml).find("layers")
    kinds = {ly.get("name"): ly.get("type") for ly in layers}
    assert [n for n, k in kinds.items() if k == "Parameter"] == ["x"]
    consts = {ly.get("name"): ly.find("data").attrib for ly in layers if ly.get("type") == "Const"}
    (name,) = spans
    assert consts[name]["offset"] == str(store.index["W"][0]) and consts[name]["size"] == str(W.nbytes)
    assert consts[name]["shape"] == "8, 5" and consts[name]["element_type"] == "f32"
    (tmp_path / "ir.xml").write_bytes(xml)
    (tmp_path / "ir.bin").write_bytes(store.data.read_bytes())
    compiled = ov.Core().compile_model(str(tmp_path / "ir.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    assert [i.get_any_name() for i in compiled.inputs] == ["x"]
    np.testing.assert_allclose(compiled(x)[0], x @ W + B, rtol=1e-5, atol=1e-6)


def test_a_model_without_stored_weights_is_left_as_it_is(tmp_path):
    store = WeightStore(tmp_path, "m", "float32")
    _onnx(tmp_path / "m.onnx", None)
    model, spans = _skeleton(tmp_path, store)
    assert spans == {} and [p.get_friendly_name() for p in model.get_parameters()] == ["x"]
    xml = point_at_store(tmp_path / "skeleton.xml", tmp_path / "skeleton.bin", spans, store)
    (tmp_path / "ir.xml").write_bytes(xml)
    (tmp_path / "ir.bin").write_bytes(store.data.read_bytes())
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    compiled = ov.Core().compile_model(str(tmp_path / "ir.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(compiled(x)[0], x @ W + B, rtol=1e-5, atol=1e-6)


def test_a_weight_outside_the_store_is_refused(tmp_path):
    store = WeightStore(tmp_path, "m", "float32")
    _onnx(tmp_path / "m.onnx", store, location="other.data")
    with pytest.raises(VtrError, match="not in the weight store"):
        stored_initializers(tmp_path / "m.onnx", store.data.name)
