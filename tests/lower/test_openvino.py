"""OpenVINO IR engines (CPU): every method's tiny engine converted with OpenVINO's own converter equals the
eager reference and the ONNX Runtime engine; generation through the IR decode engine equals ONNX Runtime's;
the engine checks and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import REFERENCE_ATOL, max_diff, prompts
from tests.lower.bf16_generation import INT4_LOGIT_ATOL, check_fastv64_demo_generation
from tests.lower.test_onnx import REFERENCES
from vtrcompile.engine.runners import read_engine_metadata
from vtrcompile.errors import VtrError

ov = pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def irs(tiny_engines, tmp_path_factory):
    """name -> the tiny ONNX engine converted to OpenVINO IR (on first use), with the decode engine as IR
    beside them."""
    from vtrcompile.lower.openvino import ir_from_onnx

    d = tmp_path_factory.mktemp("openvino")
    first = tiny_engines["none"].files[-1]
    decode = first.parent / read_engine_metadata(first)["decode"]["file"]
    ir_from_onnx(decode, d / decode.with_suffix(".xml").name, read_engine_metadata(decode))

    class Irs(dict):
        def __missing__(self, name):
            path = tiny_engines[name].files[-1]
            self[name] = ir_from_onnx(path, d / f"{name}.xml", read_engine_metadata(path))[-1]
            return self[name]

    return Irs()


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


def test_compressed_weights_count_at_the_precision_the_engine_runs_in():
    """int8 weights of a bf16 engine are counted decompressed (a 7B engine with 7.2 GB of int8 constants held 16.5 GB
    once compiled), those of an f32 engine as stored (its kernels read them compressed)."""
    import openvino.opset13 as ops

    from vtrcompile.lower.openvino import compiled_weight_bytes

    x = ops.parameter([1, 64], np.float32)
    w8 = ops.constant(np.ones((64, 32), np.uint8))
    w32 = ops.constant(np.ones((32, 8), np.float32))
    y = ops.matmul(ops.matmul(x, ops.convert(w8, np.float32), False, False), w32, False, False)
    model = ov.Model([y], [x])
    assert compiled_weight_bytes(model, "bf16") == 64 * 32 * 2 + 32 * 8 * 4
    assert compiled_weight_bytes(model, "f32") == 64 * 32 * 1 + 32 * 8 * 4


def test_an_ir_whose_weights_do_not_fit_is_refused_before_it_is_compiled(tiny_engines, irs, monkeypatch):
    """The IR's constants are the weights OpenVINO packs a copy of for the compiled engine: the same bytes as the
    ONNX engine's initializers it was converted from, give or take the constants each converter folds; an engine
    whose constants exceed the memory available is refused in one line before compiling."""
    from vtrcompile import memory
    from vtrcompile.lower.onnxruntime import read_engine
    from vtrcompile.lower.openvino import OvEngine, compiled_weight_bytes, read_ir

    path = irs["fastv-k2-18"]
    model = read_ir(path)[0]
    weights = compiled_weight_bytes(model, "f32")  # each block of the .bin once: equal constants share theirs
    assert weights <= sum(op.get_byte_size() for op in model.get_ops() if op.get_type_name() == "Constant")
    onnx_weights = read_engine(tiny_engines["fastv-k2-18"].files[-1])[1]
    assert 0.8 * onnx_weights < weights < 1.25 * onnx_weights, (weights, onnx_weights)
    monkeypatch.setattr(memory, "available_bytes", lambda: weights - 1)
    with pytest.raises(VtrError, match=f"^opening {path.name} needs about .* GB of weights, which the runtime keeps"):
        OvEngine(path, threads=1)
    monkeypatch.setattr(memory, "available_bytes", lambda: weights + 1)
    OvEngine(path, threads=1)


def test_weights_packed_at_the_first_run_are_held_back_until_then(tiny, irs, monkeypatch):
    """OpenVINO's CPU plugin takes an engine's weights at its first run, not when it compiles it, so a decode
    engine opened before the prefill has run must leave room for the prefill's. Until a run, every memory check
    holds an open engine's weights back; after one, what the process holds is in the memory available."""
    import gc

    from vtrcompile import load_engine, memory
    from vtrcompile.lower import openvino as openvino_lowering
    from vtrcompile.lower.openvino import compiled_weight_bytes, read_ir

    def constants(path) -> int:
        return compiled_weight_bytes(read_ir(path)[0], "f32")

    before = memory.held_back()  # engines other tests of this process left open and never ran, if any
    # as with a large engine's bf16 weights, compiling takes none of them (on this tiny one, OpenVINO's own
    # allocations while compiling outweigh its 0.9 MB of weights)
    monkeypatch.setattr(openvino_lowering, "anonymous_bytes", lambda: 0)
    prefill = load_engine(irs["fastv-k2-18"], threads=1)
    weights = constants(irs["fastv-k2-18"])
    decode_weights = constants(irs["fastv-k2-18"].parent / prefill.metadata["decode"]["file"])
    assert memory.held_back() == before + weights > before
    monkeypatch.setattr(memory, "available_bytes", lambda: before + weights + decode_weights - 1)
    with pytest.raises(VtrError, match=r"needs about .* available, after .* GB held back for engines that take their "
                                       "weights at their first run"):
        prefill.decode  # noqa: B018
    ids, px = tiny.example_inputs
    prefill(input_ids=ids, pixel_values=px)
    assert memory.held_back() == before
    assert prefill.decode is not None  # the prefill's weights are no longer held back: the decode engine fits
    assert memory.held_back() == before + decode_weights  # its own, until it runs
    del prefill
    gc.collect()
    assert memory.held_back() == before  # an engine that is gone holds nothing back


# OpenVINO reads the same ONNX files ONNX Runtime runs (tests/lower/test_onnx.py checks each against its
# reference); by default one engine per kind of rewrite is converted and checked here, the rest with -m slow.
OV_DEFAULT = {"fastv-k2-18", "pyramiddrop", "pumer", "prumerge", "divprune+fastv"}


@pytest.mark.parametrize("name,ref", [p if p[0] in OV_DEFAULT else pytest.param(*p, marks=pytest.mark.slow)
                                      for p in REFERENCES])
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
    sampled = {"temperature": 3.0, "top_p": 0.95, "seed": 5}  # the host's draws are the same on every backend
    for name, how in (("none", {}), ("fastv-k2-18", {}), ("prumerge", {}), ("fastv-k2-18", sampled)):
        a = load_engine(irs[name], threads=1).generate(max_new_tokens=6, eos_token_id=[], **how, **inputs)
        b = load_engine(tiny_engines[name].files[-1], threads=1).generate(max_new_tokens=6, eos_token_id=[], **how,
                                                                          **inputs)
        assert np.array_equal(a.tokens, b.tokens)
        assert np.abs(a.logits - b.logits).max() <= REFERENCE_ATOL
        assert a.cache_lengths == b.cache_lengths


def test_decode_runs_read_the_cache_buffers_in_place_and_shared_runs_return_views(tiny, irs):
    """The generation loop's decode runs read the KvCache's buffers where they are (OpenVINO is handed their memory)
    and, `shared=True`, hand back views of OpenVINO's own output buffers (the new rows) that KvCache writes in
    place; unshared runs return copies, equal to them."""
    from vtrcompile import load_engine
    from vtrcompile.engine.generate import decode_dtype, decode_feeds
    from vtrcompile.engine.io import past_names
    from vtrcompile.engine.kv_cache import KvCache

    engine = load_engine(irs["fastv-k2-18"], threads=1)
    ids, px = prompts(tiny.hf_model.config)[0]
    out = engine.prefill.run({"input_ids": ids.numpy(), "pixel_values": px.numpy()})
    n = engine.metadata["llm_layers"]
    decode = engine.decode
    kv = KvCache(out, n, decode_dtype(decode.metadata), 4)
    lengths = list(kv.lengths)
    first = decode.run(decode_feeds(out, out["logits"].argmax(-1), kv), shared=True)
    request = decode._chain[0]  # the request the first shared run took
    for k, buf in zip(past_names(n), kv.buffers, strict=True):
        assert np.shares_memory(request.get_tensor(k).data, buf.numpy()), k
    assert not any(v.flags.owndata for v in first.values())  # views: nothing was copied
    assert {first[f"present.{i}.key"].shape[2] for i in range(n)} == {1}
    kv.append(first)
    assert kv.lengths == [x + 1 for x in lengths]
    assert all(np.array_equal(kv.buffers[2 * i][:, :, lengths[i]].numpy(), first[f"present.{i}.key"][:, :, 0])
               for i in range(n))
    second_feeds = decode_feeds(first, first["logits"].argmax(-1), kv)
    held = {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in second_feeds.items()}  # first's views
    second = decode.run(second_feeds, shared=True)
    copies = decode.run(second_feeds)
    assert all(v.flags.owndata for v in copies.values())
    for k, v in copies.items():  # the same step unshared: the same outputs
        assert np.array_equal(second[k], v), k
    third = decode.run(held, shared=True)  # the first request again, the same step
    # set once per request: the buffers it holds are the KvCache's own memory, which append wrote into in place
    assert decode._held[id(request)]["past_key_values.0.key"][0] == kv.buffers[0].data_ptr()
    assert np.array_equal(third["logits"], copies["logits"])


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


def test_bf16_on_one_thread_is_refused_on_amx_cpus():
    """OpenVINO's CPU plugin dies (SIGFPE) compiling a bf16 LLM MLP for AMX on one thread: refused in one line."""
    from vtrcompile.lower.openvino import check_threads

    check_threads("bf16", 2, usable=2, amx=True)
    check_threads("bf16", 1, usable=1, amx=False)  # AVX-512 BF16 without AMX compiles on one thread
    check_threads("f32", 1, usable=1, amx=True)
    for threads, usable in ((1, 2), (2, 1)):
        with pytest.raises(VtrError, match="bfloat16 OpenVINO engine on one thread") as e:
            check_threads("bf16", threads, usable=usable, amx=True)
        assert "\n" not in str(e.value)


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
    from vtrcompile.lower.openvino import usable_cores

    if usable_cores() < 2:
        pytest.skip("one usable core: OpenVINO's bf16 path crashes there on AMX CPUs (refused, tested below)")
    eng = OvEngine(out, threads=2)
    # Every nn.Linear (aten.linear) and attention product of the graph, by the name the ONNX export gives it;
    # the selector's own products (FastV's last-row scores) are not among them and may stay f32.
    heavy = {n: p for n, p in eng.execution_precisions().items()
             if n.startswith(("node_linear_", "node_scaled_dot_product_attention_"))}
    decoder_linears = 4 * 7  # q, k, v, o, gate, up, down in each of the 4 decoder layers
    assert len(heavy) >= decoder_linears and all(p == "bf16" for p in heavy.values()), heavy


# int8 (asymmetric): u8 weight tensors; int4 (symmetric): i4 ones, the embeddings and the lm_head in u8 as NNCF
# keeps them by default. The tiny preset's widths (48, 128) are no multiple of int4's groups of 128: NNCF's groups
# are then the largest divisor of at least 32 (lower/openvino.ir_from_onnx), where an error was its default. The
# tiny preset's random weights give logits of about 0.5 at most; int4 moved them by up to 27% of that (measured), so
# its top-1 is not compared; the trained demo model's generation is int4's accuracy check (test below).
@pytest.mark.parametrize("weights,stored,shrink,rtol", [("int8", {"u8"}, 0.5, 0.05), ("int4", {"i4", "u8"}, 0.4, 0.4)])
def test_compressed_weights_shrink_the_ir_and_keep_the_logits_close(tiny, tiny_engines, tmp_path, weights, stored,
                                                                     shrink, rtol):
    """NNCF weight-only int8 and int4: the .bin shrinks, the logits stay close (int8: the same argmax)."""
    pytest.importorskip("nncf")
    from vtrcompile.lower.openvino import OvEngine, ir_from_onnx

    src = tiny_engines["fastv-k2-18"].files[-1]
    f32 = ir_from_onnx(src, tmp_path / "f32.xml", read_engine_metadata(src))[-1]
    q = ir_from_onnx(src, tmp_path / "q.xml", read_engine_metadata(src), weights=weights)[-1]
    assert read_engine_metadata(q)["weights"] == weights
    assert q.with_suffix(".bin").stat().st_size < shrink * f32.with_suffix(".bin").stat().st_size
    a, b = OvEngine(f32, threads=1), OvEngine(q, threads=1)
    assert stored <= _constant_types(q) and not stored & _constant_types(f32)
    # a compressed engine's weights count decompressed in bf16 (nearly what the float engine's count in bf16), as
    # stored in f32
    from vtrcompile.lower.openvino import compiled_weight_bytes, read_ir

    (qm, _), (fm, _) = read_ir(q), read_ir(f32)
    assert 0.9 < compiled_weight_bytes(qm, "bf16") / (compiled_weight_bytes(fm, "f32") / 2) < 1.1
    assert compiled_weight_bytes(qm, "f32") < 0.5 * compiled_weight_bytes(fm, "f32")
    # the compressed engine quantizes its activations in groups of 128, the float one keeps the plugin's default
    from vtrcompile.lower.openvino import DYNAMIC_QUANTIZATION_GROUP

    key = "DYNAMIC_QUANTIZATION_GROUP_SIZE"
    assert b.compiled.get_property(key) == DYNAMIC_QUANTIZATION_GROUP != ov.Core().get_property("CPU", key)
    assert a.compiled.get_property(key) == ov.Core().get_property("CPU", key)
    for ids, px in prompts(tiny.hf_model.config):
        la, lb = a(ids.numpy(), px.numpy()), b(ids.numpy(), px.numpy())
        assert 0 < np.abs(la - lb).max() <= rtol * np.abs(la).max()
        assert weights == "int4" or (la.argmax(-1) == lb.argmax(-1)).all()


def _constant_types(path) -> set:
    from vtrcompile.lower.openvino import read_ir

    model = read_ir(path)[0]
    return {op.get_output_element_type(0).get_type_name() for op in model.get_ordered_ops()
            if op.get_type_name() == "Constant"}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int4_engine_pair_generates_what_the_float32_reference_does(tmp_path, dtype):
    """`--weights int4`: NNCF's int4 weights with float32 activations (the fast path: the plugin keeps them
    compressed) and on the bf16 path, a FastV 64 pair of the trained demo model: the decode engine is int4 too, and the
    pair generates the float32 spec reference's tokens, per-step logits within INT4_LOGIT_ATOL, each layer's cache
    the schedule's length."""
    pytest.importorskip("nncf")
    if dtype == "bfloat16" and "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no native bf16 for OpenVINO")
    from tests.models.test_demo_model import MODEL
    from vtrcompile import load_engine
    from vtrcompile.models.loading import load_model
    from vtrcompile.optimize import Target, optimize

    out = optimize(load_model(str(MODEL)), "fastv", {"keep": 64}, tmp_path / "f.xml",
                   target=Target(backend="openvino", dtype=dtype, weights="int4")).files[-1]
    engine = load_engine(out, threads=2)
    assert engine.metadata["weights"] == "int4" and engine.decode.metadata["weights"] == "int4"
    decode = out.parent / engine.metadata["decode"]["file"]
    assert decode.name.endswith(f"-{dtype}-int4.xml") and "i4" in _constant_types(decode)
    check_fastv64_demo_generation(engine, atol=INT4_LOGIT_ATOL)


def test_weights_option_refused_where_it_does_not_apply():
    from vtrcompile.optimize import Target, check_target

    for backend in ("aoti", "tensorrt"):
        for weights in ("int8", "int4"):
            with pytest.raises(VtrError, match=f"--weights {weights} compresses ONNX Runtime and OpenVINO engines"):
                check_target(Target(backend=backend, weights=weights))
    with pytest.raises(VtrError, match="--weights int2: use one of none, int8, int4"):
        check_target(Target(weights="int2"))


def test_bf16_engine_pair_generates_what_the_float32_reference_does(tmp_path):
    """Generation on the low-precision path: a FastV 64 engine pair built with --dtype bfloat16 (OpenVINO, the
    CPU's bf16 kernels) passes each layer's reduced cache from the prefill to the decode engine and back in bf16;
    on the trained demo model it generates the tokens the float32 spec reference generates (reference/
    generation.py), per-step logits within BF16_LOGIT_ATOL (tests/lower/bf16_generation.py), each layer's cache the
    schedule's length."""
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in caps:
        pytest.skip(f"this CPU has no native bf16 for OpenVINO ({', '.join(caps)})")
    from vtrcompile.lower.openvino import usable_cores

    if usable_cores() < 2:
        pytest.skip("one usable core: OpenVINO's bf16 path crashes there on AMX CPUs (refused, tested above)")
    from tests.models.test_demo_model import MODEL
    from vtrcompile import load_engine
    from vtrcompile.models.loading import load_model
    from vtrcompile.optimize import Target, optimize

    out = optimize(load_model(str(MODEL)), "fastv", {"keep": 64}, tmp_path / "f.xml",
                   target=Target(backend="openvino", dtype="bfloat16")).files[-1]
    engine = load_engine(out, threads=2)
    assert engine.metadata["dtype"] == "bfloat16"
    caches = [o for o in engine.decode.compiled.outputs if o.get_any_name().startswith("present.")]
    assert caches and {o.get_element_type().get_type_name() for o in caches} == {"bf16"}
    check_fastv64_demo_generation(engine)
    # the cache buffers go in as OpenVINO tensors over their own memory (OpenVINO's dict path would copy each one
    # into a fresh tensor on every step), and float32 caches are rounded to bfloat16: the same step either way
    import torch

    from vtrcompile.engine.generate import decode_feeds
    from vtrcompile.engine.kv_cache import KvCache
    from vtrcompile.profile import profile_prompt

    ids, px = profile_prompt(engine.metadata)[:2]
    out = engine.prefill.run({"input_ids": ids, "pixel_values": px})
    kv = KvCache(out, engine.metadata["llm_layers"], "bfloat16", 3)
    feeds = decode_feeds(out, out["logits"].argmax(-1), kv)
    cache = feeds["past_key_values.0.key"]
    assert cache.dtype == torch.bfloat16
    engine.decode.bind(feeds)
    bound = engine.decode._feeds["past_key_values.0.key"]
    assert isinstance(bound, ov.Tensor) and bound.element_type == ov.Type.bf16
    assert np.shares_memory(bound.data, cache.view(torch.int16).numpy())
    step = engine.decode.run(feeds)["logits"]
    as_numpy = {k: v.view(torch.float16).numpy() if isinstance(v, torch.Tensor) else v for k, v in feeds.items()}
    request = engine.decode.compiled.create_infer_request()  # OpenVINO's own (copying) path, numpy feeds
    request.infer({k: np.asarray(v) for k, v in as_numpy.items()})
    assert np.array_equal(step, request.get_tensor("logits").data)
    widened = {k: v.float().numpy() if isinstance(v, torch.Tensor) else v for k, v in feeds.items()}
    assert np.array_equal(engine.decode.run(widened)["logits"], step)
    with pytest.raises(VtrError, match="past_key_values.0.key: the engine takes bfloat16 values, got int64"):
        engine.decode.bind({**feeds, "past_key_values.0.key": cache.view(torch.int16).numpy().astype(np.int64)})
