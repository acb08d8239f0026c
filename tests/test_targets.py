"""Backend choice by extension, --dtype (precision from the exported graph), and the CLI's at-once errors."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from vtrcompile.cli import main
from vtrcompile.errors import VtrError
from vtrcompile.lower.tensorrt_preflight import preflight
from vtrcompile.models.loading import load_model
from vtrcompile.optimize import Target, backend_for, optimize


@pytest.mark.parametrize("name,backend", [("a.onnx", "onnxruntime"), ("a.plan", "tensorrt"),
                                          ("a.engine", "tensorrt"), ("a.pt2", "aoti")])
def test_extension_picks_the_backend(name, backend):
    assert backend_for(Path(name), None) == backend
    assert backend_for(Path(name), "onnxruntime") == "onnxruntime"


def test_unknown_extension_is_an_error():
    with pytest.raises(VtrError, match=r"\.onnx.*\.plan.*\.pt2"):
        backend_for(Path("a.bin"), None)


def test_float16_graph_keeps_float32_io_and_passes_preflight(tmp_path):
    out = tmp_path / "h.onnx"
    res = optimize(load_model("tiny"), "fastv", {"layer": 2, "keep": 8}, out,
                   target=Target(dtype="float16", max_prompt=256))
    m = onnx.load(str(out))
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    weights = {i.data_type for i in m.graph.initializer if len(i.dims) >= 2 and i.data_type in floats}
    assert weights == {onnx.TensorProto.FLOAT16}
    io = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]}
    cache = {k: v for k, v in io.items() if k.startswith("present.")}
    assert len(cache) == 8 and set(cache.values()) == {onnx.TensorProto.FLOAT16}  # the KV cache in the engine dtype
    assert {k: v for k, v in io.items() if k not in cache} == {
        "input_ids": onnx.TensorProto.INT64, "pixel_values": onnx.TensorProto.FLOAT, "logits": onnx.TensorProto.FLOAT,
        "next_layer_position_ids": onnx.TensorProto.INT64}
    assert preflight(out) == [] and res.metadata["dtype"] == "float16"


@pytest.mark.parametrize("args,words", [
    (["--out", "{d}/e.plan"], "TensorRT"),
    (["--out", "{d}/e.pt2", "--device", "cuda"], "no CUDA GPU"),
    (["--out", "{d}/e.onnx", "--triton-repo", "{d}/repo"], "needs a TensorRT engine"),
    (["--out", "{d}/e.onnx", "--device", "cuda"], "runs on the CPU"),
    (["--out", "{d}/e.onnx", "--min-prompt", "500", "--max-prompt", "100"], "larger than --max-prompt"),
])
def test_cli_target_errors_are_immediate_and_write_nothing(tmp_path, args, words):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = CliRunner().invoke(main, ["optimize", "tiny", "--method", "fastv", *[a.format(d=tmp_path) for a in args]])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0]
    assert list(tmp_path.iterdir()) == []
