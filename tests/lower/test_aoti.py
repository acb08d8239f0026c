"""AOTInductor (.pt2): compiles the rewritten graph for CPU, equals it within 1e-4 over prompt lengths,
carries the metadata, and profiles like the other backends. CUDA runs are marked gpu."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REFERENCE_ATOL, max_diff, prompts
from vtrcompile.errors import VtrError
from vtrcompile.lower.aoti import AotiEngine, check_device, compile_configs, export_aoti
from vtrcompile.optimize import Target, write_engine
from vtrcompile.profile import compare


@pytest.fixture(scope="module")
def packages(tiny, tiny_build, tmp_path_factory):
    d = tmp_path_factory.mktemp("aoti")
    t = Target(backend="aoti", device="cpu", max_prompt=256)
    return {name: write_engine(tiny_build(m, **o), tiny, d / f"{name}.pt2", t)
            for name, m, o in (("fastv", "fastv", {"layer": 2, "keep": 8}), ("none", "none", {}))}


@pytest.mark.slow  # compiles two C++ packages (about 2 minutes on 2 cores)
def test_package_equals_the_rewritten_graph(tiny, tiny_build, packages):
    b = tiny_build("fastv", layer=2, keep=8)
    eng = AotiEngine(packages["fastv"].files[-1])
    assert eng.metadata["method"] == "fastv" and eng.metadata["device"] == "cpu"
    for ids, px in prompts(tiny.hf_model.config):
        with torch.no_grad():
            ref = b.logits(ids, px)
        assert max_diff(eng(ids.numpy(), px.numpy()), ref) <= REFERENCE_ATOL


@pytest.mark.slow  # compiles two C++ packages (about 2 minutes on 2 cores)
def test_profile_compares_two_packages(packages):
    r = compare(packages["fastv"].files[-1], packages["none"].files[-1], warmup=1, reps=3, prefix=5, suffix=8)
    assert r["environment"]["backend"] == "aoti-cpu"
    red = r["engines"]["reduced"]
    assert red["llm_tokens_per_layer"][2] == red["llm_tokens_per_layer"][0] - 28  # 36 -> 8 image tokens
    assert red["latency"]["reps"] == 3 and r["selector"] is None
    assert set(red["trtexec"]["gpuComputeTime"]) >= {"median", "percentile(99%)"}


@pytest.mark.slow  # compiles two C++ packages (about 2 minutes on 2 cores)
def test_package_pair_generates_what_the_spec_reference_does(tiny, packages):
    """AOTInductor prefill + decode packages: per-step logits equal the eager generation reference."""
    from vtrcompile import load_engine
    from vtrcompile.reference.generation import generate_reference
    from vtrcompile.reference.methods import fastv_reference

    engine = load_engine(packages["fastv"].files[-1])
    ids, px = prompts(tiny.hf_model.config)[1]
    out = engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, eos_token_id=[])
    tokens, logits, lengths = generate_reference(tiny.hf_model, ids, px, lambda m, i, p: fastv_reference(m, i, p, 2, 8),
                                                 "keep", 6)
    assert out.tokens[0].tolist() == tokens.tolist() and out.cache_lengths == lengths
    assert float(np.abs(out.logits[0] - logits.numpy()).max()) <= REFERENCE_ATOL
    assert engine.decode_path.suffix == ".pt2"


@pytest.mark.slow  # compiles two C++ packages (about 2 minutes on 2 cores)
def test_mixed_backends_are_refused(packages, tiny, tiny_build, tmp_path):
    onnx_file = write_engine(tiny_build("none"), tiny, tmp_path / "b.onnx", decode=False).files[-1]
    with pytest.raises(VtrError, match="same backend"):
        compare(packages["fastv"].files[-1], onnx_file, warmup=0, reps=1)


@pytest.mark.slow  # compiles two C++ packages (about 2 minutes on 2 cores)
def test_cpu_package_runs_linear_layers_on_prepacked_weights(packages):
    """The compiled wrapper calls oneDNN's linear kernel on weights packed at compile time, not aten::mm."""
    with zipfile.ZipFile(packages["fastv"].files[-1]) as z:
        wrapper = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
    assert wrapper.count("_linear_pointwise") >= 6  # every projection and MLP matmul of the tiny model's layers
    assert "aoti_torch_cpu_mm_out" not in wrapper and "aoti_torch_cpu_addmm_out" not in wrapper


def test_cpu_packages_are_compiled_with_frozen_weights(tmp_path, monkeypatch):
    """export_aoti hands Inductor `freezing` with gradients off (Inductor ignores it otherwise); CUDA keeps the
    defaults."""
    seen = []

    def fake_compile(ep, package_path, inductor_configs):
        seen.append((dict(inductor_configs), torch.is_grad_enabled()))
        Path(package_path).write_bytes(b"package")
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_compile)
    ep = torch.export.export(torch.nn.Linear(4, 3), (torch.zeros(2, 4),))
    export_aoti(ep, tmp_path / "m.pt2", {"method": "none"}, "cpu")
    (configs, grad), = seen
    assert configs["freezing"] is True and grad is False
    assert compile_configs("cuda") == {}
    assert (tmp_path / "m.pt2").read_bytes() == b"package"


def test_bf16_tensors_handed_back_are_bound_contiguous():
    """A prefill package returns its bf16 caches as transposed views; the decode package reads its inputs with
    contiguous strides, so the runner binds them contiguous (with the views as they were, every decode step of a
    bf16 pair read a scrambled cache)."""
    eng = AotiEngine.__new__(AotiEngine)
    eng.device = "cpu"
    eng.metadata = {"io": {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", 1]},
                                      {"name": "past", "dtype": "bfloat16", "shape": ["batch", 2, "past", 3]}]}}
    past = torch.arange(24, dtype=torch.bfloat16).reshape(1, 4, 2, 3).transpose(1, 2)  # [1, 2, 4, 3], a view
    assert not past.is_contiguous()
    eng.bind({"input_ids": np.array([[5]]), "past": past})
    ids, bound = eng._bound
    assert bound.is_contiguous() and torch.equal(bound, past) and ids.tolist() == [[5]]


def test_timed_runs_keep_the_previous_outputs_alive_until_the_next_returns():
    """As in a generation loop, a timed run's outputs are freed only after the next run returns (freed at once, a
    CPU package's large cache outputs went back to the OS between isolated decode steps, 4x too slow)."""
    import weakref

    alive_during_run = []

    class Runner:
        def __init__(self):
            self.last = None

        def __call__(self, *inputs):
            alive_during_run.append(self.last is not None and self.last() is not None)
            out = [torch.zeros(4)]
            self.last = weakref.ref(out[0])
            return out

    eng = AotiEngine.__new__(AotiEngine)
    eng.device, eng.runner, eng._bound, eng._last_outputs = "cpu", Runner(), [], None
    for _ in range(3):
        assert eng.time_ms() >= 0
    assert alive_during_run == [False, True, True]
    assert eng._last_outputs[0] is eng.runner.last()


def test_a_package_damaged_inside_is_refused_before_its_code_is_loaded(tmp_path, monkeypatch):
    """A flipped bit in a package's shared library can crash the process that loads it (found by
    benchmarks/fuzz.py: exit -11). The archive's CRC-32s are checked first, so the damage is one clear error."""
    loaded = []

    def loader(path, *a, **k):
        loaded.append(path)
        raise RuntimeError("not a real package")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", loader)
    good = tmp_path / "e.pt2"
    payload = bytes(range(256)) * 64
    with zipfile.ZipFile(good, "w", zipfile.ZIP_STORED) as z:
        z.writestr("e/data/aotinductor/model/x.wrapper.so", payload)
    data = bytearray(good.read_bytes())
    at = data.index(payload) + 1000
    data[at] ^= 0x10
    bad = tmp_path / "bad" / "e.pt2"
    bad.parent.mkdir()
    bad.write_bytes(bytes(data))
    with pytest.raises(VtrError, match="x.wrapper.so' fails its checksum") as e:
        AotiEngine(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(VtrError, match="not a readable AOTInductor package"):
        (tmp_path / "cut.pt2").write_bytes(bytes(data[: len(data) // 2]))
        AotiEngine(tmp_path / "cut.pt2")
    cd = data.index(b"PK\x01\x02")  # the central directory's entry: its flags, then its compression method
    for at, what in ((cd + 8, "encrypted"), (cd + 10, "compression method")):
        flipped = bytearray(good.read_bytes())
        flipped[at] ^= 1
        (tmp_path / "hdr.pt2").write_bytes(bytes(flipped))
        with pytest.raises(VtrError, match=f"not a readable AOTInductor package.*{what}"):
            AotiEngine(tmp_path / "hdr.pt2")
    assert loaded == []
    with pytest.raises(VtrError, match="not a loadable AOTInductor package"):  # the intact archive passes the check
        AotiEngine(good)
    assert loaded == [str(good)]


def test_a_package_larger_than_the_memory_available_is_refused_before_it_is_loaded(tmp_path, monkeypatch):
    """A package carries its weights; loading it holds them in memory. Its size is checked against the memory
    available before its code is loaded (its metadata, role and dtype included, is only readable after)."""
    from vtrcompile import memory

    loaded = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path, *a, **k: loaded.append(path))
    pkg = tmp_path / "e.pt2"
    with zipfile.ZipFile(pkg, "w", zipfile.ZIP_STORED) as z:
        z.writestr("e/data/aotinductor/model/x.wrapper.so", bytes(4096))
    monkeypatch.setattr(memory, "available_bytes", lambda: pkg.stat().st_size - 1)
    with pytest.raises(VtrError, match="^opening e.pt2 needs about .* of weights, which the runtime keeps") as e:
        AotiEngine(pkg)
    assert "\n" not in str(e.value) and loaded == []


def test_cuda_without_gpu_is_one_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(VtrError, match="no CUDA GPU"):
        check_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_package_matches_cpu_graph(tiny, tiny_build, tmp_path):
    b = tiny_build("fastv", layer=2, keep=8)
    out = write_engine(b, tiny, tmp_path / "g.pt2", Target(backend="aoti", device="cuda", max_prompt=256))
    eng = AotiEngine(out.files[-1])
    ids, px = prompts(tiny.hf_model.config)[0]
    with torch.no_grad():
        ref = b.logits(ids, px)
    assert np.isfinite(eng(ids.numpy(), px.numpy())).all()
    assert max_diff(eng(ids.numpy(), px.numpy()), ref) < 1e-3


@pytest.mark.slow  # compiles the demo model's prefill and decode packages (about 2 minutes on 2 cores)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_package_pair_generates_what_the_float32_reference_does(tmp_path, dtype):
    """AOTInductor on the low-precision paths: a FastV 64 pair of the trained demo model compiled with --dtype
    bfloat16 (float16) hands each layer's reduced cache from the prefill to the decode package in that dtype and
    generates the tokens the float32 spec reference generates, per-step logits within the bf16 tolerance
    OpenVINO's pair meets (F16_LOGIT_ATOL; tests/lower/bf16_generation.py), each layer's cache the schedule's
    length."""
    from tests.lower.bf16_generation import BF16_LOGIT_ATOL, F16_LOGIT_ATOL, check_fastv64_demo_generation
    from tests.models.test_demo_model import MODEL
    from vtrcompile import load_engine
    from vtrcompile.engine.host_inputs import prefill_feeds
    from vtrcompile.models.loading import load_model
    from vtrcompile.optimize import optimize

    out = optimize(load_model(str(MODEL)), "fastv", {"keep": 64}, tmp_path / "f.pt2",
                   target=Target(backend="aoti", dtype=dtype)).files[-1]
    engine = load_engine(out, threads=2)
    assert engine.metadata["dtype"] == dtype and engine.decode_path.suffix == ".pt2"

    def caches_in_the_dtype(ids, px):
        engine.prefill.bind(prefill_feeds(engine.prefill.metadata, ids.numpy(), px.numpy()))
        caches = [t for t, io in zip(engine.prefill.run(), engine.prefill.metadata["io"]["outputs"], strict=True)
                  if io["name"].startswith("present.")]
        assert caches and {t.dtype for t in caches} == {getattr(torch, dtype)}

    check_fastv64_demo_generation(engine, before=caches_in_the_dtype,
                                  atol=BF16_LOGIT_ATOL if dtype == "bfloat16" else F16_LOGIT_ATOL)
