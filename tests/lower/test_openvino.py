"""OpenVINO IR engines (CPU): every method's tiny engine converted with OpenVINO's own converter equals the
eager reference and the ONNX Runtime engine; generation through the IR decode engine equals ONNX Runtime's;
the engine checks and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import REFERENCE_ATOL, max_diff, prompts
from tests.lower.test_onnx import REFERENCES
from vtrcompile.engine.runners import read_engine_metadata
from vtrcompile.errors import VtrError

ov = pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def irs(tiny_engines, tmp_path_factory):
    """Each tiny ONNX engine and the shared decode engine as OpenVINO IR, in one folder."""
    from vtrcompile.lower.openvino import ir_from_onnx

    d = tmp_path_factory.mktemp("openvino")
    out = {}
    for name, opt in tiny_engines.items():
        path = opt.files[-1]
        out[name] = ir_from_onnx(path, d / f"{name}.xml", read_engine_metadata(path))[-1]
    first = tiny_engines["none"].files[-1]
    decode = first.parent / read_engine_metadata(first)["decode"]["file"]
    ir_from_onnx(decode, d / decode.with_suffix(".xml").name, read_engine_metadata(decode))
    return out


def test_ir_files_and_metadata(irs):
    from vtrcompile.lower.openvino import OvEngine

    path = irs["fastv-k2-18"]
    assert path.suffix == ".xml" and path.with_suffix(".bin").is_file()
    meta = read_engine_metadata(path)
    assert meta["backend"] == "openvino" and meta["decode"]["file"].endswith(".xml")
    eng = OvEngine(path, threads=1)
    assert eng.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert str(eng.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    # float32 engines run in f32 end to end: no layer lowered to another precision behind the user's back
    precisions = set(eng.execution_precisions().values())
    assert "f32" in precisions and not precisions & {"bf16", "f16"}, precisions


@pytest.mark.parametrize("name,ref", REFERENCES)
def test_openvino_equals_eager_reference_and_onnxruntime(tiny, tiny_engines, irs, name, ref):
    from vtrcompile.lower.onnxruntime import OrtEngine
    from vtrcompile.lower.openvino import OvEngine

    m = tiny.hf_model
    eng, ort_eng = OvEngine(irs[name], threads=1), OrtEngine(tiny_engines[name].files[-1], threads=1)
    for ids, px in prompts(m.config):
        got = eng(ids.numpy(), px.numpy())
        assert max_diff(got, ref(m, ids, px)) <= REFERENCE_ATOL
        assert np.abs(got - ort_eng(ids.numpy(), px.numpy())).max() <= REFERENCE_ATOL


def test_generation_equals_onnxruntime(tiny, tiny_engines, irs):
    from vtrcompile import load_engine

    ids, px = prompts(tiny.hf_model.config)[0]
    inputs = {"input_ids": ids.numpy(), "pixel_values": px.numpy()}
    for name in ("none", "fastv-k2-18", "prumerge"):
        a = load_engine(irs[name], threads=1).generate(max_new_tokens=6, eos_token_id=[], **inputs)
        b = load_engine(tiny_engines[name].files[-1], threads=1).generate(max_new_tokens=6, eos_token_id=[], **inputs)
        assert np.array_equal(a.tokens, b.tokens)
        assert np.abs(a.logits - b.logits).max() <= REFERENCE_ATOL
        assert a.cache_lengths == b.cache_lengths


def test_missing_bin_and_damaged_xml_refused_in_one_line(irs, tmp_path):
    import shutil

    src = irs["none"]
    shutil.copy(src, tmp_path / "e.xml")
    with pytest.raises(VtrError, match=r"e\.xml: its weights file e\.bin is missing"):
        read_engine_metadata_strict(tmp_path / "e.xml")
    shutil.copy(src.with_suffix(".bin"), tmp_path / "e.bin")
    (tmp_path / "e.xml").write_text("<net>")
    with pytest.raises(VtrError, match="not a readable OpenVINO IR") as e:
        read_engine_metadata_strict(tmp_path / "e.xml")
    assert "\n" not in str(e.value)


def read_engine_metadata_strict(path):
    from vtrcompile.lower.openvino import read_ir

    return read_ir(path)[1]


def test_precision_the_cpu_lacks_is_refused():
    from vtrcompile.lower.openvino import check_precision

    check_precision("float32", ["FP32", "INT8"])
    check_precision("bfloat16", ["FP32", "BF16"])
    with pytest.raises(VtrError, match="--dtype bfloat16: this CPU has no native BF16"):
        check_precision("bfloat16", ["FP32", "INT8"])


def test_reduced_bf16_engine_runs_its_decoder_matmuls_in_bf16(tiny, tiny_build, tmp_path):
    """The trap of the low-precision path: layers after the reduction site falling back to f32 kernels."""
    from vtrcompile.lower.openvino import OvEngine

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in caps:
        pytest.skip(f"this CPU has no native bf16 for OpenVINO ({', '.join(caps)})")
    from vtrcompile.build import build
    from vtrcompile.models.loading import load_model
    from vtrcompile.optimize import Target, cast_model, write_engine

    src = load_model("tiny")
    cast_model(src, "bfloat16")
    out = write_engine(build(src, "fastv", {"layer": 2, "keep": 18}), src, tmp_path / "f.xml",
                       Target(backend="openvino", dtype="bfloat16"), decode=False).files[-1]
    eng = OvEngine(out, threads=1)
    matmuls = {n: p for n, p in eng.execution_precisions().items() if "layers" in n and "MatMul" in n}
    assert matmuls and all(p == "bf16" for p in matmuls.values()), matmuls
