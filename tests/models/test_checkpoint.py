"""Hugging Face directories read lazily: weights streamed from the safetensors files into a shared store, the
same engines as the model loaded in memory, the checkpoint's own dtype, and the memory check."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from tests.conftest import max_diff, prompts
from vtrcompile import memory
from vtrcompile.build import build
from vtrcompile.cli import main
from vtrcompile.errors import VtrError
from vtrcompile.lower.onnx import read_metadata
from vtrcompile.lower.onnxruntime import OrtEngine
from vtrcompile.models.loading import load_model
from vtrcompile.models.presets import build_preset
from vtrcompile.optimize import source_id, write_engine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "tiny-hf"
    build_preset("tiny").save_pretrained(d)  # transformers writes the legacy key layout (language_model.model...)
    return d


def _ops(path):
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.fixture(scope="module")
def in_memory(checkpoint, tmp_path_factory):
    """The FastV ONNX engine of the checkpoint loaded in memory (no weight store): what streamed engines equal."""
    loaded = load_model(str(checkpoint), stream=False)
    return loaded, write_engine(build(loaded, "fastv", {"keep": 18}), loaded,
                                tmp_path_factory.mktemp("in-memory") / "f.onnx")


def test_streamed_engines_equal_the_in_memory_ones(checkpoint, in_memory, tmp_path):
    lazy, (loaded, b) = load_model(str(checkpoint)), in_memory
    assert lazy.weights is not None and loaded.weights is None
    assert source_id(lazy) == source_id(loaded)  # the identity hash reads the same values
    a = write_engine(build(lazy, "fastv", {"keep": 18}), lazy, tmp_path / "a" / "f.onnx")
    decode = a.metadata["decode"]["file"]
    assert _ops(a.files[-1]) == _ops(b.files[-1])  # the same graph
    assert _ops(tmp_path / "a" / decode) == _ops(b.files[-1].parent / decode)
    ea, eb = OrtEngine(a.files[-1], threads=1), OrtEngine(b.files[-1], threads=1)
    for ids, px in prompts(lazy.hf_model.config):
        assert float(np.abs(ea(ids.numpy(), px.numpy()) - eb(ids.numpy(), px.numpy())).max()) <= 1e-6
    meta = read_metadata(a.files[-1])
    store = tmp_path / "a" / meta["weights_file"]
    index = json.loads(store.with_suffix(".json").read_text())["tensors"]
    # every stored weight once: the prefill and decode engines point at the same bytes
    spans = sorted(index.values())
    assert sum(n for _, n in spans) == store.stat().st_size
    assert all(o1 + n1 <= o2 for (o1, n1), (o2, _) in zip(spans, spans[1:], strict=False))
    assert read_metadata(tmp_path / "a" / decode)["weights_file"] == meta["weights_file"]
    assert "weights_file" not in read_metadata(b.files[-1])


def test_a_one_file_engine_of_a_checkpoint_reads_the_weight_store(checkpoint, in_memory, tmp_path):
    """--one-file from a checkpoint: the joined engine keeps pointing at the model's weight store (each weight
    once, nothing copied inline) and generates what the in-memory pair generates."""
    from vtrcompile import load_engine
    from vtrcompile.optimize import Target

    lazy, b = load_model(str(checkpoint)), in_memory[1]
    one = write_engine(build(lazy, "fastv", {"keep": 18}), lazy, tmp_path / "f.onnx", Target(one_file=True))
    model = onnx.load(str(one.files[-1]), load_external_data=False)
    stored = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    locations = {e.value for t in stored for e in t.external_data if e.key == "location"}
    assert locations == {one.metadata["weights_file"]}
    spans = [tuple(e.value for e in t.external_data if e.key in ("offset", "length")) for t in stored]
    assert len(spans) == len(set(spans)) > 0  # no stored weight referenced twice
    ids, px = prompts(lazy.hf_model.config)[0]
    got = load_engine(one.files[-1], threads=1).generate(input_ids=ids, pixel_values=px, max_new_tokens=4,
                                                         eos_token_id=[])
    want = load_engine(b.files[-1], threads=1).generate(input_ids=ids, pixel_values=px, max_new_tokens=4,
                                                        eos_token_id=[])
    assert got.tokens.tolist() == want.tokens.tolist()
    assert float(np.abs(got.logits - want.logits).max()) <= 1e-5


def test_a_lazy_model_is_never_run_without_its_weights(checkpoint):
    src = load_model(str(checkpoint))
    ids, px = prompts(src.hf_model.config)[0]
    with pytest.raises(VtrError, match="without its weights"):
        src.module(ids, px)
    ref = build_preset("tiny")
    with torch.no_grad():
        assert max_diff(src.eager().module(ids, px), ref(input_ids=ids, pixel_values=px).logits[:, -1]) <= 1e-6


@pytest.mark.slow
def test_a_bf16_checkpoint_stays_bf16(tmp_path):
    d = tmp_path / "bf16"
    build_preset("tiny").to(torch.bfloat16).save_pretrained(d)
    src = load_model(str(d))
    assert src.dtype == torch.bfloat16 and src.weights.dtype == torch.bfloat16  # never upcast silently
    assert load_model(str(d), dtype=torch.float32).dtype == torch.float32  # unless asked
    out = tmp_path / "e.onnx"
    r = CliRunner().invoke(main, ["optimize", str(d), "--method", "fastv", "--keep", "18", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert read_metadata(out)["dtype"] == "bfloat16"
    # with --weights the engine's activations are float32 (ONNX Runtime's MatMulNBits take no other): without
    # --dtype this was refused with "leave out --dtype"
    out = tmp_path / "int8" / "e.onnx"
    r = CliRunner().invoke(main, ["optimize", str(d), "--method", "fastv", "--keep", "18", "--out", str(out),
                                  "--weights", "int8"])
    assert r.exit_code == 0, r.output
    assert (read_metadata(out)["dtype"], read_metadata(out)["weights"]) == ("float32", "int8")


def test_a_job_the_machine_cannot_hold_is_refused(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: int(0.5e9))
    out = tmp_path / "e.onnx"
    r = CliRunner().invoke(main, ["optimize", str(checkpoint), "--method", "fastv", "--out", str(out), "--profile"])
    assert r.exit_code == 2
    line = r.output.strip()
    assert "\n" not in line and "optimize needs about" in line and "0.5 GB are available" in line
    assert "drop --profile" in line
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_missing_a_weight_is_refused(checkpoint, tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    for f in checkpoint.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(checkpoint / "model.safetensors"))
    tensors.pop(next(k for k in tensors if k.endswith("layers.0.mlp.up_proj.weight")))
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(VtrError, match="1 weight\\(s\\) of the model are not in the checkpoint"):
        load_model(str(d))


def test_openvino_engines_of_a_checkpoint_read_the_weight_store(checkpoint, in_memory, tmp_path):
    """.xml engines from a lazily read checkpoint: each IR's .bin is the model's weight store (one file, linked),
    the constants OpenVINO saved are appended to it once, the IRs take exactly the engines' inputs (no weight
    stand-in left), and they generate what the ONNX Runtime engines of the model loaded in memory generate (the
    OpenVINO tests hold OpenVINO's own IRs to the same engines within REFERENCE_ATOL; here 1e-5)."""
    pytest.importorskip("openvino")
    import os
    import xml.etree.ElementTree as ET

    from vtrcompile import load_engine
    from vtrcompile.lower.openvino import read_ir
    from vtrcompile.optimize import Target

    lazy = load_model(str(checkpoint))
    ov = Target(backend="openvino")
    write_engine(build(lazy, "fastv", {"keep": 18}), lazy, tmp_path / "a" / "f.xml", ov)
    meta = read_ir(tmp_path / "a" / "f.xml")[1]
    store = tmp_path / "a" / meta["weights_file"]
    decode = tmp_path / "a" / meta["decode"]["file"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        ["f.xml", "f.bin", decode.name, decode.with_suffix(".bin").name, store.name, store.with_suffix(".json").name])
    assert os.path.samefile(tmp_path / "a" / "f.bin", store) and os.path.samefile(decode.with_suffix(".bin"), store)
    size = store.stat().st_size
    spans = sorted(json.loads(store.with_suffix(".json").read_text())["tensors"].values())
    assert sum(n for _, n in spans) == size  # every byte once: weights, then each IR's own small constants
    for xml in (tmp_path / "a" / "f.xml", decode):
        layers = ET.parse(xml).getroot().find("layers")
        consts = [ly.find("data").attrib for ly in layers if ly.get("type") == "Const"]
        assert consts and all(int(d["offset"]) + int(d["size"]) <= size for d in consts)
        assert not [ly for ly in layers if ly.get("type") == "Parameter" and "stored_weight" in ly.get("name")]
    onnx_engine = in_memory[1].files[-1]
    engines = [load_engine(p, threads=1) for p in (tmp_path / "a" / "f.xml", onnx_engine)]
    for x, want in (("f.xml", onnx_engine), (decode.name, onnx_engine.parent / decode.with_suffix(".onnx").name)):
        # the stand-ins are gone: the inputs the engine contract names, in its order
        assert [i.get_any_name() for i in read_ir(tmp_path / "a" / x)[0].inputs] == [
            t["name"] for t in read_metadata(want)["io"]["inputs"]]
    for ids, px in prompts(build_preset("tiny").config)[:2]:
        la, lb = (np.asarray(e(input_ids=ids.numpy(), pixel_values=px.numpy())) for e in engines)
        assert float(np.abs(la - lb).max()) <= 1e-5
        ga, gb = (e.generate(input_ids=ids.numpy(), pixel_values=px.numpy(), max_new_tokens=4) for e in engines)
        assert (ga.tokens == gb.tokens).all() and float(np.abs(ga.logits - gb.logits).max()) <= 1e-5


@pytest.mark.slow
def test_an_openvino_one_file_engine_of_a_checkpoint(checkpoint, in_memory, tmp_path):
    """.xml --one-file from a checkpoint: the prefill IR streams into the model's store beside the output (not into
    the temporary folder it is joined in); the joined IR's .bin is that store, as the decode IR's is (its metadata
    names it), every constant of both bodies lies in the store, each decode weight at a prefill weight's bytes;
    nothing else is left, and it generates what the in-memory ONNX engine does."""
    pytest.importorskip("openvino")
    import os
    import xml.etree.ElementTree as ET

    from vtrcompile import load_engine
    from vtrcompile.lower.openvino import read_ir
    from vtrcompile.optimize import Target

    lazy = load_model(str(checkpoint))
    one = write_engine(build(lazy, "fastv", {"keep": 18}), lazy, tmp_path / "f.xml",
                       Target(backend="openvino", one_file=True))
    model, meta = read_ir(tmp_path / "f.xml")
    assert meta["decode"]["file"] == "f.xml"
    decode = next(tmp_path.glob("decode-*.xml"))
    store = tmp_path / read_ir(decode)[1]["weights_file"]
    assert meta["weights_file"] == store.name
    assert os.path.samefile(decode.with_suffix(".bin"), store) and os.path.samefile(tmp_path / "f.bin", store)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["f.xml", "f.bin", decode.name, decode.with_suffix(".bin").name, store.name, store.with_suffix(".json").name])
    assert [str(p) for p in one.files] == [str(tmp_path / "f.bin"), str(tmp_path / "f.xml")]
    size = store.stat().st_size
    bodies = [b for node in ET.parse(tmp_path / "f.xml").getroot().iter("layer") if node.get("type") == "If"
              for b in (node.find("then_body/layers"), node.find("else_body/layers"))]
    spans = [[(int(ly.find("data").get("offset")), int(ly.find("data").get("size"))) for ly in body
              if ly.get("type") == "Const"] for body in bodies]
    assert len(spans) == 2 and all(spans) and all(o + n <= size for body in spans for o, n in body)
    weights = [{s for s in body if s[1] >= 1 << 16} for body in spans]
    assert weights[1] and weights[1] <= weights[0]  # the decode body's weights are bytes the prefill body reads
    ids, px = prompts(lazy.hf_model.config)[0]
    got = load_engine(tmp_path / "f.xml", threads=1).generate(input_ids=ids, pixel_values=px, max_new_tokens=4,
                                                             eos_token_id=[])
    want = load_engine(in_memory[1].files[-1], threads=1).generate(input_ids=ids, pixel_values=px, max_new_tokens=4,
                                                                  eos_token_id=[])
    assert got.tokens.tolist() == want.tokens.tolist()
    assert float(np.abs(got.logits - want.logits).max()) <= 1e-5


@pytest.mark.slow
def test_compressed_openvino_engines_of_a_checkpoint_leave_no_float_store(checkpoint, tmp_path):
    """.xml --weights int4 from a checkpoint, the pair and the one file in one folder: NNCF writes each IR's own .bin,
    so the float weights stream into a scratch store that goes with the build (the one file once tried to read its
    ONNX export's store from the output folder and failed); the one file generates what the pair does."""
    pytest.importorskip("nncf")
    from vtrcompile import load_engine
    from vtrcompile.lower.openvino import read_ir
    from vtrcompile.optimize import Target

    lazy = load_model(str(checkpoint))
    b = build(lazy, "fastv", {"keep": 18})
    pair = write_engine(b, lazy, tmp_path / "p.xml", Target(backend="openvino", weights="int4"))
    write_engine(b, lazy, tmp_path / "o.xml", Target(backend="openvino", weights="int4", one_file=True))
    decode = tmp_path / pair.metadata["decode"]["file"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["p.xml", "p.bin", "o.xml", "o.bin", decode.with_suffix(".xml").name, decode.with_suffix(".bin").name])
    assert read_ir(tmp_path / "o.xml")[1]["weights"] == "int4" and "weights_file" not in read_ir(tmp_path / "o.xml")[1]
    ids, px = prompts(lazy.hf_model.config)[0]
    got, want = (load_engine(tmp_path / name, threads=1).generate(input_ids=ids, pixel_values=px, max_new_tokens=4,
                                                                  eos_token_id=[]) for name in ("o.xml", "p.xml"))
    assert got.tokens.tolist() == want.tokens.tolist()
    assert float(np.abs(got.logits - want.logits).max()) <= 1e-5


def test_a_checkpoint_asked_for_in_another_dtype_is_in_that_dtype_everywhere():
    """The demo model's config.json names float32 for its vision sub-config too: read lazily in bfloat16, every
    parameter and buffer has the dtype transformers' own loading gives it (none is left float32 by the
    sub-config)."""
    from pathlib import Path

    demo = Path(__file__).resolve().parents[2] / "models" / "vqa-synth-llava"
    lazy = load_model(str(demo), dtype=torch.bfloat16)
    loaded = load_model(str(demo), dtype=torch.bfloat16, stream=False)
    assert lazy.weights is not None and loaded.weights is None
    assert {n: p.dtype for n, p in lazy.module.named_parameters()} == {
        n: p.dtype for n, p in loaded.module.named_parameters()}
    assert {p.dtype for p in lazy.module.parameters()} == {torch.bfloat16}
    assert {n: b.dtype for n, b in lazy.module.named_buffers()} == {n: b.dtype for n, b in loaded.module.named_buffers()}


def test_a_failed_openvino_build_leaves_no_weight_store(checkpoint, tmp_path, monkeypatch):
    """The IR writer fails after the ONNX export streamed the weights: the store that build began goes too."""
    pytest.importorskip("openvino")
    from vtrcompile.lower import openvino_store
    from vtrcompile.optimize import Target

    def broken(*_a, **_k):
        raise VtrError("injected failure")

    monkeypatch.setattr(openvino_store, "stand_in_weights", broken)
    lazy = load_model(str(checkpoint))
    with pytest.raises(VtrError, match="injected failure"):
        write_engine(build(lazy, "fastv", {"keep": 18}), lazy, tmp_path / "e" / "f.xml", Target(backend="openvino"))
    assert [p.name for p in (tmp_path / "e").iterdir()] == []


def test_openvino_estimate_follows_what_reads_the_weights(checkpoint):
    """A lazily read checkpoint to .xml streams like .onnx (the IR points at the weight store); with --weights int8
    or int4 both stream the float weights and compress them one at a time (ONNX Runtime's quantizer maps each one,
    NNCF reads each from OpenVINO's memory-mapped model), holding the compressed engine: 1.2 or 0.7 bytes a
    parameter. TensorRT's parser holds every weight; an in-memory model keeps the larger 1.5x, and 2.0x or 2.9x (one
    file) compressed to int8."""
    from vtrcompile.memory import RUNTIME, optimize_estimate, weight_bytes

    src = load_model(str(checkpoint))
    w = weight_bytes(src, torch.float32)
    streamed = optimize_estimate(src, "onnxruntime", torch.float32, False)[0]
    assert optimize_estimate(src, "openvino", torch.float32, False)[0] == streamed
    for backend in ("onnxruntime", "openvino"):
        need, what, advice = optimize_estimate(src, backend, torch.float32, False, "int8")
        assert need == pytest.approx(streamed + 0.3 * w) and "compressed to int8" in what
        assert any("drop --weights int8" in a for a in advice) == (backend == "openvino")
        need = optimize_estimate(src, backend, torch.float32, False, "int4")[0]
        assert need == pytest.approx(streamed + 0.175 * w)
    # in bf16 the same engine: half the float bytes, the same compressed ones
    assert optimize_estimate(src, "openvino", torch.bfloat16, False, "int4")[0] == pytest.approx(streamed + 0.175 * w)
    need, what, _ = optimize_estimate(src, "tensorrt", torch.float32, False)  # its parser holds every weight
    assert need == pytest.approx(RUNTIME + w) and "TensorRT's parser" in what
    eager = load_model("tiny")
    assert optimize_estimate(eager, "openvino", torch.float32, False)[0] == pytest.approx(
        RUNTIME + 1.5 * weight_bytes(eager, torch.float32))
    # from memory to .onnx with --weights int8: the weights and the int8 engine, one file or two (the join writes
    # piecewise and holds no more than compressing does)
    w = weight_bytes(eager, torch.float32)
    two, what, advice = optimize_estimate(eager, "onnxruntime", torch.float32, False, "int8")
    one = optimize_estimate(eager, "onnxruntime", torch.float32, False, "int8", one_file=True)
    assert two == one[0] == pytest.approx(RUNTIME + 2.0 * w)
    assert "compressed to int8" in what and any("Hugging Face checkpoint" in a for a in one[2])


def test_profile_estimate_counts_the_engines_that_hold_weights():
    """--profile opens the reduced and the unmodified engine: with their decode engines four copies of the weights,
    as one-file engines two (each decode phase shares its prefill's session)."""
    from vtrcompile.memory import optimize_estimate, weight_bytes

    src = load_model("tiny")
    w = weight_bytes(src, torch.float32)
    alone = optimize_estimate(src, "onnxruntime", torch.float32, False)[0]
    pair = optimize_estimate(src, "onnxruntime", torch.float32, True)
    one = optimize_estimate(src, "onnxruntime", torch.float32, True, one_file=True)
    assert pair[0] == pytest.approx(alone + 4 * w) and one[0] == pytest.approx(alone + 2 * w)
    assert "one-file" in one[1] and "one-file" not in pair[1]
    # engines of compressed weights hold them compressed, except OpenVINO's with bf16 activations (decompressed)
    for backend, dtype, held in (("onnxruntime", torch.float32, 0.175 * w), ("openvino", torch.float32, 0.175 * w),
                                 ("openvino", torch.bfloat16, w / 2)):
        alone = optimize_estimate(src, backend, dtype, False, "int4")[0]
        assert optimize_estimate(src, backend, dtype, True, "int4")[0] == pytest.approx(alone + 4 * held)


def test_aoti_estimate_counts_the_packed_weight_copies(checkpoint):
    """AOTInductor compiles from the weights in memory and packs a copy of each linear layer's: more than the
    generic in-memory estimate, whether the model streams or not."""
    from vtrcompile.memory import AOTI_COPIES, RUNTIME, optimize_estimate, weight_bytes

    for src in (load_model(str(checkpoint)), load_model("tiny")):
        w = weight_bytes(src, torch.float32)
        need, what, advice = optimize_estimate(src, "aoti", torch.float32, False)
        assert need == pytest.approx(RUNTIME + AOTI_COPIES * w) and AOTI_COPIES >= 3.1  # 3.1 measured
        assert "packed copies" in what and any(".onnx or .xml" in a for a in advice)


def _with_header(path, edit) -> None:
    """Rewrite a safetensors file's JSON header through `edit` (data bytes unchanged)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = edit(json.loads(raw[8:8 + n]))
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


@pytest.mark.parametrize("edit, message", [
    (lambda h: {k: ({kk: vv for kk, vv in v.items() if kk != "data_offsets"} if k == "w" else v) for k, v in h.items()},
     "tensor 'w' has a damaged header entry"),  # a flipped bit renamed the key (fuzz seed 45: KeyError)
    (lambda h: {**h, "w": {**h["w"], "shape": "4x3"}}, "tensor 'w' has a damaged header entry"),
    (lambda h: {**h, "w": {**h["w"], "shape": [4, 4]}}, "tensor 'w' has a damaged header entry"),  # 64 B, 48 B held
    (lambda h: {**h, "w": {**h["w"], "data_offsets": [0, 48.0]}}, "tensor 'w' has a damaged header entry"),
    (lambda h: {**h, "w": {**h["w"], "data_offsets": [48, 0]}}, "tensor 'w' has a damaged header entry"),
    (lambda h: {**h, "w": {**h["w"], "data_offsets": [4000, 4048]}}, r"truncated \(tensor 'w' ends at byte"),
    (lambda h: {"b": h["b"], "w\nx": {**h["w"], "shape": [9]}}, r"tensor 'w\\nx' has a damaged header entry"),
    (lambda h: {**h, "w": 7}, "tensor 'w' has dtype None"),
    (lambda h: [h], "its header is not a JSON object"),
])
def test_a_damaged_safetensors_header_is_one_line(tmp_path, edit, message):
    from vtrcompile.models.checkpoint import read_header

    f = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4, 3), "b": torch.zeros(3)}, str(f))
    assert set(read_header(f)) == {"w", "b"}  # the intact file reads
    _with_header(f, edit)
    with pytest.raises(VtrError, match=message) as e:
        read_header(f)
    assert "\n" not in str(e.value) and str(f) in str(e.value)
