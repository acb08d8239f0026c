"""TensorRT lowering up to the builder (CPU): profile shapes, sidecar, the ONNX handed to the parser, the
builder calls (against a recording stand-in for the `tensorrt` module), and the missing-TensorRT error.
The real build runs only where TensorRT and a GPU exist (marked, skipped here)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import onnx
import pytest
import torch

from vtrcompile.errors import VtrError
from vtrcompile.lower import tensorrt as trt_lower
from vtrcompile.lower.tensorrt_preflight import preflight
from vtrcompile.optimize import Target, check_target, engine_metadata


@pytest.fixture(scope="module")
def meta(tiny, tiny_build):
    return engine_metadata(tiny_build("pumer"), tiny, target=Target(backend="tensorrt", device="cuda"))


def test_profile_covers_the_requested_prompt_range(meta):
    n, (lo, hi) = meta["n_image"], meta["prompt_range"]
    assert lo == n + 2
    p = trt_lower.profile_shapes(meta, None, None).shapes
    assert p["input_ids"] == ((1, lo), (1, min(hi, n + 64)), (1, hi))
    assert p["pixel_values"][0] == p["pixel_values"][2] == (1, 3, 84, 84)
    p = trt_lower.profile_shapes(meta, 50, 200).shapes
    assert p["input_ids"][0] == (1, 50) and p["input_ids"][2] == (1, 200) and 50 <= p["input_ids"][1][1] <= 200


@pytest.mark.parametrize("lo,hi,words", [(10, None, "below"), (None, 10**6, "above"), (300, 100, "larger")])
def test_profile_range_errors_name_the_problem(meta, lo, hi, words):
    with pytest.raises(VtrError, match=words):
        trt_lower.profile_shapes(meta, lo, hi)


def test_sidecar_describes_io_ranges_and_reduction(meta):
    shapes = trt_lower.profile_shapes(meta, 40, 300)
    sc = trt_lower.sidecar(meta, shapes, {"tensorrt": "10.13.0", "torch": torch.__version__},
                           {"name": "NVIDIA H100", "compute_capability": "9.0"})
    assert [i["name"] for i in sc["inputs"]] == ["input_ids", "pixel_values"]
    assert sc["inputs"][0]["shape"] == [1, -1] and sc["inputs"][0]["profile"]["min"] == [1, 40]
    assert sc["inputs"][0]["profile"]["max"] == [1, 300]
    assert sc["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": [1, meta["vocab"]]}
    assert [o["name"] for o in sc["outputs"]] == [t["name"] for t in meta["io"]["outputs"]]
    assert sc["outputs"][1]["name"] == "present.0.key" and sc["outputs"][1]["shape"][2] == -1
    assert sc["n_image"] == 36 and sc["kept_tokens"] == [r["count"] for r in meta["reductions"]]
    assert sc["method"] == "pumer" and len(sc["reductions"]) == len(meta["reductions"]) > 1
    assert sc["gpu"]["compute_capability"] == "9.0" and sc["versions"]["tensorrt"] == "10.13.0"
    json.dumps(sc)  # serialisable as is


class _Recorder:
    """Stands in for the tensorrt module: records the builder calls vtrcompile makes (TensorRT 10 names)."""

    def __init__(self, version: str, has_fp16_flag: bool):
        self.calls: list[tuple] = []
        rec = self
        m = types.ModuleType("tensorrt")
        m.__version__ = version

        class Logger:
            WARNING = 2

            def __init__(self, level):
                rec.calls.append(("Logger", level))

        class Parser:
            def __init__(self, network, logger):
                self.num_errors = 0

            def parse_from_file(self, path):
                rec.calls.append(("parse_from_file", path))
                rec.onnx = onnx.load(path)
                return True

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                rec.calls.append(("set_shape", name, list(lo), list(opt), list(hi)))

        class Config:
            def set_memory_pool_limit(self, pool, size):
                rec.calls.append(("workspace", pool, size))

            def add_optimization_profile(self, p):
                rec.calls.append(("add_optimization_profile",))

            def set_flag(self, flag):
                rec.calls.append(("set_flag", flag))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                rec.calls.append(("create_network", flags))
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                rec.calls.append(("build",))
                return b"PLAN-BYTES"

        m.Logger, m.Builder, m.OnnxParser = Logger, Builder, Parser
        m.Dims = list
        m.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        m.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        m.BuilderFlag = types.SimpleNamespace(**({"FP16": "FP16"} if has_fp16_flag else {}))
        self.module = m


@pytest.fixture(scope="module")
def onnx_file(tiny_build, meta, tmp_path_factory):
    from vtrcompile.lower.onnx import export_onnx

    out = tmp_path_factory.mktemp("trt") / "model.onnx"
    export_onnx(tiny_build("pumer").program, out, meta)
    return out


@pytest.mark.parametrize("version,fp16_flag", [("10.13.0", True), ("11.2.0", False)])
def test_builder_calls_on_both_versions(onnx_file, meta, monkeypatch, version, fp16_flag):
    """What reaches the builder: a strongly typed network parsed from the file, the workspace limit, one
    profile with the requested ranges; no precision flag on either version (11 has none)."""
    rec = _Recorder(version, fp16_flag)
    monkeypatch.setitem(sys.modules, "tensorrt", rec.module)
    plan = trt_lower.build_plan(onnx_file, trt_lower.profile_shapes(meta, 40, 300), 2 << 30)
    assert plan == b"PLAN-BYTES"
    names = [c[0] for c in rec.calls]
    assert names.index("create_network") < names.index("parse_from_file") < names.index("build")
    assert ("create_network", 1 << 1) in rec.calls  # STRONGLY_TYPED bit
    assert "set_flag" not in names
    assert ("workspace", "WORKSPACE", 2 << 30) in rec.calls
    shapes = {c[1]: c[2:] for c in rec.calls if c[0] == "set_shape"}
    assert shapes["input_ids"][0] == [1, 40] and shapes["input_ids"][2] == [1, 300]
    assert shapes["pixel_values"][0] == [1, 3, 84, 84]


def test_export_plan_writes_plan_and_sidecar_from_a_preflighted_onnx(tiny_build, meta, tmp_path, monkeypatch):
    rec = _Recorder("10.13.0", True)
    monkeypatch.setitem(sys.modules, "tensorrt", rec.module)
    monkeypatch.setattr(trt_lower, "gpu_info", lambda: {"name": "test-gpu", "compute_capability": "9.0"})
    out = tmp_path / "engine.plan"
    files = trt_lower.export_plan(tiny_build("pumer").program, out, meta, 40, 300, 2 << 30)
    assert files == [trt_lower.sidecar_path(out), out]
    assert out.read_bytes() == b"PLAN-BYTES"
    assert [i.name for i in rec.onnx.graph.input] == ["input_ids", "pixel_values"]
    parsed = tmp_path / "parsed.onnx"
    onnx.save(rec.onnx, parsed)
    assert preflight(parsed) == []  # what the parser received passes the preflight
    sc = json.loads(trt_lower.sidecar_path(out).read_text())
    assert sc["versions"]["tensorrt"] == "10.13.0" and sc["prompt_min"] == 40 and sc["prompt_max"] == 300
    assert not list(tmp_path.glob(".engine.plan.*"))  # no temp folder left behind


def test_opening_a_plan_without_tensorrt_names_the_engine(meta, tmp_path, monkeypatch):
    """A .plan whose sidecar reads fine, on a machine without TensorRT: the one-line error names the engine
    (a command may open two: `profile a.plan --baseline b.plan`) and says what to install."""
    from vtrcompile.lower.tensorrt_runner import TrtEngine

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs gives
    plan = tmp_path / "e.plan"
    plan.write_bytes(b"PLAN-BYTES")
    shapes = trt_lower.profile_shapes(meta, 40, 300)
    trt_lower.sidecar_path(plan).write_text(json.dumps(trt_lower.sidecar(meta, shapes, {"tensorrt": "10.13.0"},
                                                                         {"name": "test-gpu"})))
    with pytest.raises(VtrError, match="TensorRT is not installed") as e:
        TrtEngine(plan)
    assert str(e.value).startswith(f"{plan}: ") and "\n" not in str(e.value) and "pip install" in str(e.value)


def test_old_tensorrt_and_stub_only_installs_are_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs gives
    with pytest.raises(VtrError, match="only its type stubs"):
        trt_lower.import_tensorrt()
    old = _Recorder("8.6.1", True).module
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(VtrError, match="too old"):
        trt_lower.import_tensorrt()


def test_plan_target_fails_at_once_without_tensorrt_or_gpu():
    with pytest.raises(VtrError, match=r"TensorRT|CUDA") as e:
        check_target(Target(backend="tensorrt"))
    assert "\n" not in str(e.value) and (".onnx" in str(e.value) or "pip install" in str(e.value))


def _have_trt_gpu() -> bool:
    try:
        trt_lower.import_tensorrt()
        trt_lower.check_cuda()
        return True
    except VtrError:
        return False


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not _have_trt_gpu(), reason="needs TensorRT and a CUDA GPU")
def test_real_plan_matches_onnxruntime(tiny, tiny_build, tmp_path):
    from tests.conftest import max_diff, prompts
    from vtrcompile.lower.tensorrt_runner import TrtEngine
    from vtrcompile.optimize import write_engine

    b = tiny_build("fastv", layer=2, keep=18)
    plan = write_engine(b, tiny, tmp_path / "e.plan", Target(backend="tensorrt", max_prompt=256)).files[-1]
    eng = TrtEngine(plan)
    for ids, px in prompts(tiny.hf_model.config):
        with torch.no_grad():
            ref = b.logits(ids, px)
        assert max_diff(eng(ids.numpy(), px.numpy()), ref) < 1e-3
    assert Path(str(plan) + ".json").is_file()


def test_decode_engine_profile_covers_every_layers_cache_and_reaches_the_builder(tiny, tmp_path, monkeypatch):
    """The TensorRT decode engine: its own profile over each layer's cache length, parsed from the decode ONNX,
    written with a sidecar that says it is a decode engine."""
    from vtrcompile.decode import capture_decode, decode_metadata
    from vtrcompile.engine.io import decode_inputs, decode_outputs, describe

    ep, dims = capture_decode(tiny.hf_model, 1)
    io = describe(ep, decode_inputs(4), decode_outputs(4), dims)
    meta = decode_metadata(tiny.hf_model, "0123456789abcdef", "preset:tiny", "float32", "tensorrt", io)
    shapes = trt_lower.engine_profile(meta, None, 256).shapes
    assert shapes["input_ids"] == ((1, 1), (1, 1), (1, 1)) and shapes["layer_position_ids"][0] == (1, 4)
    for i in range(4):
        for kv in ("key", "value"):
            lo, opt, hi = shapes[f"past_key_values.{i}.{kv}"]
            assert lo == (1, 2, 2, 16) and hi == (1, 2, 256 + trt_lower.DECODE_NEW_TOKENS, 16) and lo <= opt <= hi
    rec = _Recorder("11.2.0", False)
    monkeypatch.setitem(sys.modules, "tensorrt", rec.module)
    monkeypatch.setattr(trt_lower, "gpu_info", lambda: {"name": "test-gpu", "compute_capability": "9.0"})
    out = tmp_path / "decode.plan"
    files = trt_lower.export_plan(ep, out, meta, None, 256, 1 << 30)
    assert files == [trt_lower.sidecar_path(out), out]
    assert [i.name for i in rec.onnx.graph.input] == decode_inputs(4)
    assert [o.name for o in rec.onnx.graph.output] == decode_outputs(4)
    set_shapes = {c[1]: c[2:] for c in rec.calls if c[0] == "set_shape"}
    assert set(set_shapes) == set(decode_inputs(4))
    sc = json.loads(trt_lower.sidecar_path(out).read_text())
    assert sc["role"] == "decode" and sc["inputs"][2]["shape"] == [1, 2, -1, 16]
    from vtrcompile.lower.tensorrt_runner import TrtEngine

    runner = TrtEngine.__new__(TrtEngine)
    runner.sidecar = sc
    assert runner.max_cache_rows == 256 + trt_lower.DECODE_NEW_TOKENS


def test_generate_refuses_buffers_longer_than_the_decode_engines_profile(tmp_path):
    """A TensorRT decode engine takes cache buffers up to its profile's max: a prompt plus new tokens that need more
    rows is refused in one line before the prefill runs."""
    import numpy as np

    from vtrcompile.engine.generate import Engine

    eng = Engine.__new__(Engine)
    eng.path, eng.padded = tmp_path / "p.plan", False
    eng.metadata = {"prompt_range": [4, 100], "max_context": 4096, "llm_layers": 2, "eos_token_ids": [],
                    "decode": {"file": "decode.plan"}}
    eng._decode = types.SimpleNamespace(max_cache_rows=40)
    eng.prefill = types.SimpleNamespace(run=lambda *a, **k: pytest.fail("the prefill ran"))
    eng._inputs = lambda inputs: {"input_ids": np.zeros((1, 30), np.int64)}
    with pytest.raises(VtrError, match=r"30 prompt tokens \+ 12 new tokens need cache buffers of 41 rows; the "
                                       r"decode engine decode.plan was built for at most 40"):
        eng.generate(max_new_tokens=12)
    eng._decode = types.SimpleNamespace(max_cache_rows=41, run=lambda *a, **k: pytest.fail("decode ran"))
    with pytest.raises(pytest.fail.Exception, match="the prefill ran"):
        eng.generate(max_new_tokens=12)  # 41 rows fit: it goes on to the prefill


class _RecordingContext:
    """Stands in for a TensorRT execution context of a decode engine (CPU tensors): records the addresses bound
    and, on launch, writes each present (the new row) as the step's number, next positions + 1."""

    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.launches = engine, {}, {}, 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        if name.startswith("present."):
            b, h, _, d = self.shapes[name.replace("present", "past_key_values")]
            return (b, h, 1, d)
        return {"logits": (1, 8), "next_layer_position_ids": self.shapes["layer_position_ids"]}[name]

    def execute_async_v3(self, stream):
        self.launches += 1
        bound = self.engine._bound
        for name in self.engine.outputs:
            if name.startswith("present."):
                bound[name].fill_(self.launches)
        bound["next_layer_position_ids"].copy_(bound["layer_position_ids"] + 1)
        bound["logits"].zero_()
        return True


def test_shared_decode_runs_bind_the_cache_buffers_where_they_are_and_return_new_rows_on_the_device():
    """The generation loop's decode runs (`shared=True`) bind the KvCache's device buffers by their own address
    (no cache crosses to the host and back) and hand back the new rows as device tensors, which KvCache writes in
    place. Unshared runs copy every output to the host. (A recording context on CPU tensors: no GPU here.)"""
    from vtrcompile.engine.generate import decode_feeds
    from vtrcompile.engine.io import decode_inputs, decode_outputs, past_names, present_names
    from vtrcompile.engine.kv_cache import KvCache
    from vtrcompile.lower.tensorrt_runner import TrtEngine

    n = 2
    eng = TrtEngine.__new__(TrtEngine)
    eng.path, eng._torch, eng._device, eng._bound = Path("fake.plan"), torch, "cpu", {}
    eng.inputs, eng.outputs = decode_inputs(n), decode_outputs(n)
    eng._dtypes = {**{k: torch.float16 for k in (*past_names(n), *present_names(n))}, "logits": torch.float32,
                   "input_ids": torch.int64, "layer_position_ids": torch.int64, "next_layer_position_ids": torch.int64,
                   "past_lengths": torch.int64}
    eng.metadata = {"llm_layers": n, "io": {"inputs": [
        {"name": k, "dtype": "float16" if k.startswith("past_key") else "int64",
         "shape": ["batch", 2, "capacity", 4] if k.startswith("past_key") else
         ([n] if k == "past_lengths" else [1, "x"])} for k in eng.inputs]}}
    eng.context = _RecordingContext(eng)
    eng.stream = types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None)

    import numpy as np

    host = {"logits": np.zeros((1, 8), np.float32), "next_layer_position_ids": np.array([[5, 3]]),
            **{k: np.full((1, 2, 3 + i // 2, 4), 7, np.float32) for i, k in enumerate(present_names(n))}}
    kv = KvCache(host, n, "float16", extra_rows=3)
    assert kv.lengths == [3, 4] and kv.capacity == [6, 7]
    first = eng.run(decode_feeds(host, np.array([1]), kv), shared=True)
    for k, buf in zip(past_names(n), kv.buffers, strict=True):
        assert eng.context.addresses[k] == buf.data_ptr()  # bound where the buffer is
    assert all(isinstance(first[k], torch.Tensor) and first[k].shape == (1, 2, 1, 4) for k in present_names(n))
    assert isinstance(first["logits"], np.ndarray) and first["next_layer_position_ids"].tolist() == [[6, 4]]
    kv.append(first)
    second = eng.run(decode_feeds(first, np.array([1]), kv), shared=True)
    assert eng.context.shapes["past_lengths"] == (2,) and eng.context.addresses["past_key_values.0.key"] == \
        kv.buffers[0].data_ptr()
    kv.append(second)
    assert kv.lengths == [5, 6]
    assert kv.buffers[0][0, 0, :, 0].tolist() == [7, 7, 7, 1, 2, 0]  # the prefill's rows, one row per step, room
    assert kv.buffers[3][0, 0, :, 0].tolist() == [7, 7, 7, 7, 1, 2, 0]
    copies = eng.run(decode_feeds(second, np.array([1]), kv))
    assert all(isinstance(v, np.ndarray) for v in copies.values())
    assert copies["present.1.value"].dtype == np.float32 and copies["present.1.value"].shape == (1, 2, 1, 4)
