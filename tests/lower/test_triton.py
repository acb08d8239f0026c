"""Triton model repository: config.pbtxt parses strictly with Triton's own protobuf schema and matches the
engine; layout; folders we did not write are never replaced."""

from __future__ import annotations

import pytest

from vtrcompile.errors import VtrError
from vtrcompile.lower import tensorrt as trt_lower
from vtrcompile.lower.triton import MARKER, config_pbtxt, model_name, write_model
from vtrcompile.optimize import Target, engine_metadata

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")


@pytest.fixture(scope="module")
def sidecars(tiny, tiny_build):
    out = {}
    for name, method, opts in (("reduced", "fastv", {"layer": 2, "keep": 18}), ("baseline", "none", {})):
        meta = engine_metadata(tiny_build(method, **opts), tiny, target=Target(backend="tensorrt", device="cuda"))
        out[name] = trt_lower.sidecar(meta, trt_lower.profile_shapes(meta, 40, 300),
                                      {"tensorrt": "10.13.0"}, {"name": "gpu", "compute_capability": "9.0"})
    return out


def _parse(text: str):
    # text_format.Parse rejects unknown fields, wrong enum names and malformed values: a strict check.
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_config_matches_engine(sidecars):
    sc = sidecars["reduced"]
    cfg = _parse(config_pbtxt("llava_fastv", sc))
    assert cfg.name == "llava_fastv" and cfg.platform == "tensorrt_plan"
    assert cfg.max_batch_size == 0  # batch is an explicit, fixed dim of every tensor
    ins = {i.name: i for i in cfg.input}
    assert list(ins["input_ids"].dims) == [1, -1]  # prompt length is dynamic in the profile
    assert ins["input_ids"].data_type == model_config_pb2.TYPE_INT64
    assert list(ins["pixel_values"].dims) == [1, 3, 84, 84]
    assert ins["pixel_values"].data_type == model_config_pb2.TYPE_FP32
    out, *cache, pos = cfg.output
    assert out.name == "logits" and list(out.dims) == [1, 320] and out.data_type == model_config_pb2.TYPE_FP32
    assert [c.name for c in cache[:2]] == ["present.0.key", "present.0.value"] and len(cache) == 8
    assert list(cache[0].dims) == [1, 2, -1, 16]  # each layer's cache length follows the prompt
    assert pos.name == "next_layer_position_ids" and pos.data_type == model_config_pb2.TYPE_INT64
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


def test_strict_parse_rejects_a_broken_config(sidecars):
    bad = config_pbtxt("m", sidecars["reduced"]).replace("TYPE_INT64", "TYPE_LONG")
    with pytest.raises(text_format.ParseError):
        _parse(bad)


def test_repository_layout_for_both_engines(sidecars, tmp_path):
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"plan")
    repo = tmp_path / "repo"
    for stem, key in (("engine", "reduced"), ("engine.baseline", "baseline")):
        d = write_model(repo, model_name(stem), plan, sidecars[key])
        assert (d / "1" / "model.plan").read_bytes() == b"plan"
        assert _parse((d / "config.pbtxt").read_text()).name == d.name
        assert (d / MARKER).is_file()
    assert sorted(p.name for p in repo.iterdir()) == ["engine", "engine_baseline"]
    # Rewriting our own folder replaces it; a folder someone else made is refused.
    plan.write_bytes(b"plan2")
    write_model(repo, "engine", plan, sidecars["reduced"])
    assert (repo / "engine" / "1" / "model.plan").read_bytes() == b"plan2"
    (repo / "theirs").mkdir()
    with pytest.raises(VtrError, match="not written by vtrcompile"):
        write_model(repo, "theirs", plan, sidecars["reduced"])
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]


def test_model_names_are_triton_safe():
    assert model_name("my engine.v2") == "my_engine_v2"
    with pytest.raises(VtrError):
        model_name("...")
