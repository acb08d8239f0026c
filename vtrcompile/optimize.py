"""The `optimize` job: build a reduced (or baseline) program, measure its FLOPs, lower it, preflight it."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from .build import Build, build
from .engine.io import describe, prefill_outputs
from .engine.metadata import PREFILL, stamp
from .engine.runners import BACKENDS
from .errors import VtrError
from .lower.atomic import check_writable
from .lower.onnx import ORT_OPSET, export_onnx
from .lower.tensorrt_preflight import Finding, preflight
from .models.loading import ModelSource

log = logging.getLogger(__name__)


def _cpu_attention_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """QK^T and PV: 2*B*H*Sq*Sk*(d_qk + d_v). torch's counter has no formula for the CPU kernel."""
    b, h, sq, d = q_shape
    sk, dv = k_shape[-2], v_shape[-1]
    return 2 * b * h * sq * sk * (d + dv)


_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_flops(gm: fx.GraphModule, *inputs: torch.Tensor) -> int:
    """FLOPs of one prefill, counted on fake tensors (no real compute, works for meta weights too)."""
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t.to(device)) for t in inputs]
        with FlopCounterMode(display=False, custom_mapping=_ATTENTION_FLOPS) as fc:
            gm(*fake)
    return int(fc.get_total_flops())


def flops_polynomial(b: Build, image_token_id: int) -> list[float]:
    """FLOPs are exactly quadratic in the prompt length S (linear layers ~S, attention ~S^2, reductions
    drop a constant): count at three lengths and solve for (a, b, c) in a + b S + c S^2."""
    ids, px = b.example_inputs[:2]
    n = int((ids[0] == image_token_id).sum())
    lengths = [n + 8, n + 40, n + 72]
    ys = []
    for s in lengths:
        extra = s - ids.shape[1]
        if extra >= 0:
            pad = torch.full((ids.shape[0], extra), int(ids[0, -1]))
            ids_s = torch.cat([ids, pad], dim=1)
        else:
            ids_s = torch.cat([ids[:, :extra - 1], ids[:, -1:]], dim=1)
        ys.append(count_flops(b.graph_module, *b.inputs(ids_s, px)))
    a = torch.tensor([[1.0, s, s * s] for s in lengths], dtype=torch.float64)
    coef = torch.linalg.solve(a, torch.tensor(ys, dtype=torch.float64))
    return [float(c) for c in coef]


def model_id(module: torch.nn.Module | None, program: torch.export.ExportedProgram | None, weights=None) -> str:
    """A hash of parameter names, shapes and values (values skipped for meta tensors). With `weights` (a model
    read lazily from its checkpoint) each parameter's values are read from the checkpoint, one at a time: the
    same hash as the model loaded in memory in that dtype."""
    h = hashlib.sha256()
    state = module.state_dict() if module is not None else program.state_dict  # type: ignore[union-attr]
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        stored = weights.name_of(t) if weights is not None else None
        if stored is not None:
            t = weights.read(stored)
        if t.device.type != "meta":
            h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def source_id(source: ModelSource) -> str:
    """The model identity of a source (cached: hashing a streamed 7B model reads 14 GB)."""
    if "model_id" not in source.captured:
        source.captured["model_id"] = model_id(source.module, source.program, source.weights)
    return source.captured["model_id"]


def prefill_io(b: Build) -> dict[str, Any]:
    ids = next(n for n in b.program.graph.nodes if n.op == "placeholder"
               and n.name == b.program.graph_signature.user_inputs[0])
    s = ids.meta["val"].shape[1]
    return describe(b.program, b.input_names, prefill_outputs(len(b.facts.layers)), {s.node.expr: "prompt"})


def generation_metadata(source: ModelSource, mid: str, target: Target, n_layers: int) -> dict[str, Any]:
    """What a prefill engine records for generation: its decode engine, EOS, cache geometry, preprocessing.
    Built from an exported program (no eager model) it records no decode engine and what it cannot know as
    null."""
    m = source.hf_model
    if m is None:
        return {"decode": None, "processor": None, "eos_token_ids": [], "llm_layers": n_layers, "kv_heads": None,
                "head_dim": None, "max_context": None}
    from .decode import decode_file_name
    from .engine.prompting import has_tokenizer, tokenizer_folder_name
    from .models.decoder import cache_geometry, eos_token_ids

    model_dir = Path(source.label) if source.kind == "hf-dir" else None
    processor = {**source.family.processor_facts(m.config, model_dir),
                 "tokenizer": tokenizer_folder_name(mid) if has_tokenizer(model_dir) else None}
    decode = {"file": decode_file_name(mid, target.dtype, BACKENDS[target.backend][0], target.device, target.weights,
                                       source.batch), "model_id": mid}
    return {"decode": decode, "eos_token_ids": eos_token_ids(m), **cache_geometry(m), "processor": processor}


def engine_metadata(b: Build, source: ModelSource, mid: str | None = None, target: Target | None = None
                    ) -> dict[str, Any]:
    """A prefill engine's metadata (keys declared in engine/metadata.py)."""
    f = b.facts
    t = target or Target()
    ids, px = b.example_inputs[:2]
    s = ids.shape[1]
    tokens = b.llm_tokens(s)
    mid = mid or source_id(source)
    return stamp(PREFILL, {
        "model": source.label, "model_id": mid, "io": prefill_io(b), "dtype": t.dtype, "backend": t.backend,
        "method": b.method, "options": b.options,
        "reductions": [{"method": r.method, "site": r.site, "layer": r.layer,
                        "count": r.count + r.recorded.get("protected_rows", 0),
                        "positions": r.positions, **r.recorded} for r in b.reductions],
        "image_token_id": f.boundary.image_token_id, "n_image": f.boundary.n_image, "batch": f.boundary.batch,
        "pixel_shape": list(px.shape[1:]), "pixel_rows": px.shape[0] // f.boundary.batch, "tiles": source.tiles,
        "host_inputs": b.host_inputs, "vocab": _vocab(b), "prompt_range": list(b.prompt_range),
        "llm_token_drop": [s - t for t in tokens],
        "flops_poly": flops_polynomial(b, f.boundary.image_token_id),
        **generation_metadata(source, mid, t, len(f.layers)),
    })


def _vocab(b: Build) -> int:
    out = next(n for n in b.program.graph.nodes if n.op == "output")
    return int(out.args[0][0].meta["val"].shape[-1])



@dataclass
class Optimized:
    build: Build
    files: list[Path]
    metadata: dict[str, Any]
    findings: list[Finding] | None  # None: the TensorRT preflight was not run (an ONNX Runtime engine of int8 or
    # int4 weights)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


WEIGHTS = ("none", "int8", "int4")
# backends that take --weights int8 / int4: OpenVINO (NNCF) and ONNX Runtime (MatMulNBits, lower/onnx_weights.py)
WEIGHTS_BACKENDS = ("onnxruntime", "openvino")

# backends whose prefill and decode engines `--one-file` joins into one file that holds each weight once
ONE_FILE_BACKENDS = ("onnxruntime", "openvino")


@dataclass(frozen=True)
class Target:
    """How to lower a build: backend, device, precision, the prompt range an engine must serve."""

    backend: str = "onnxruntime"
    device: str = "cpu"
    dtype: str = "float32"
    min_prompt: int | None = None
    max_prompt: int | None = None  # None: capture.DEFAULT_MAX_PROMPT, or N + TEXT_ROOM when N needs more
    workspace_gb: float = 8.0
    weights: str = "none"  # "int8" / "int4": weight-only compression of the linear layers (OpenVINO: NNCF; ONNX
    # Runtime: MatMulNBits)
    one_file: bool = False  # prefill and decode in one file, each weight held once (ONNX Runtime, OpenVINO)


def backend_for(out: Path, backend: str | None) -> str:
    """The output's extension picks the backend; --backend overrides it."""
    if backend:
        if backend not in BACKENDS:
            raise VtrError(f"unknown backend '{backend}'; use one of {', '.join(BACKENDS)}")
        return backend
    ext = out.suffix.lower()
    for name, exts in BACKENDS.items():
        if ext in exts:
            return name
    raise VtrError(f"{out}: unknown output type '{ext}'; use .onnx (ONNX Runtime), .xml (OpenVINO), .plan/.engine "
                   "(TensorRT) or .pt2 (AOTInductor), or pass --backend")


def default_one_file(t: Target, source: ModelSource) -> bool:
    """`optimize`'s layout when neither --one-file nor --two-files is given: one file for ONNX Runtime when the
    model can decode (an eager model; an exported program gets a prefill engine alone), two files elsewhere."""
    return t.backend == "onnxruntime" and source.hf_model is not None


def default_dtype(own: str, weights: str) -> str:
    """The precision to export in when --dtype is not given: the model's own (never upcast silently), except with
    --weights int8/int4, whose engines run float32 activations around the compressed weights: ONNX Runtime's
    MatMulNBits take no other, and OpenVINO keeps compressed weights compressed only in float32 (in bf16 its CPU
    plugin decompresses them and decodes slower than plain bf16: BENCHMARKS.md, "int4 weights")."""
    if weights == "none" or own == "float32":
        return own
    log.info("--weights %s: activations in float32 (the model's weights are %s; the linear layers' are stored as %s)",
             weights, own, weights)
    return "float32"


def check_target(t: Target) -> None:
    """Fail at once, before any build work, when the target cannot be produced on this machine."""
    if t.dtype not in DTYPES:
        raise VtrError(f"--dtype {t.dtype}: use one of {', '.join(DTYPES)}")
    if t.weights not in WEIGHTS:
        raise VtrError(f"--weights {t.weights}: use one of {', '.join(WEIGHTS)}")
    if t.weights != "none" and t.backend not in WEIGHTS_BACKENDS:
        raise VtrError(f"--weights {t.weights} compresses ONNX Runtime and OpenVINO engines: write --out engine.onnx "
                       "or engine.xml")
    if t.weights != "none" and t.backend == "onnxruntime" and t.dtype != "float32":
        raise VtrError(f"--weights {t.weights} with an ONNX Runtime engine runs its activations in float32 (ONNX "
                       f"Runtime's int8 kernels take no {t.dtype}); leave out --dtype, or write --out engine.xml")
    if t.backend == "tensorrt":
        from .lower.tensorrt import check_cuda, import_tensorrt

        import_tensorrt()
        check_cuda()
    elif t.backend == "aoti":
        from .lower.aoti import check_device

        check_device(t.device)
    elif t.device != "cpu":
        raise VtrError(f"--device {t.device}: the {t.backend} backend here runs on the CPU; use .pt2 or .plan "
                       "for a GPU engine")
    if t.one_file and t.backend not in ONE_FILE_BACKENDS:
        raise VtrError(f"--one-file joins ONNX Runtime and OpenVINO engines; the {t.backend} backend keeps a prefill "
                       "and a decode engine: write --out engine.onnx or engine.xml, or leave out --one-file")
    if t.backend == "openvino":
        from .lower.openvino import check_nncf, check_precision

        check_precision(t.dtype)
        if t.weights != "none":
            check_nncf()


def cast_model(source: ModelSource, dtype: str) -> None:
    """Reduced precision comes from the graph's own dtype (TensorRT 11 has no FP16/BF16 builder flags)."""
    if source.module is not None and source.dtype == DTYPES[dtype]:
        return
    if source.weights is not None:  # read lazily: rebuild the empty model in the asked dtype
        from .models.loading import load_model

        fresh = load_model(source.label, dtype=DTYPES[dtype], tiles=source.tiles, image_size=source.image_size)
        source.module, source.hf_model, source.weights, source.captured = (fresh.module, fresh.hf_model,
                                                                           fresh.weights, {})
        return
    if dtype == "float32" and source.module is None:
        return
    if source.module is None:
        raise VtrError(f"--dtype {dtype} needs an eager model (a preset, a Hugging Face directory or a pickle); "
                       "an exported program keeps the dtype it was exported in")
    source.module.to(DTYPES[dtype])


def lower_program(program: torch.export.ExportedProgram, out: Path, meta: dict[str, Any], t: Target,
                  weights=None) -> list[Path]:
    """One program (prefill or decode) -> the target backend's engine file(s), written atomically. `weights`:
    stream the parameters from a checkpoint (ONNX, and the ONNX that OpenVINO and TensorRT read)."""
    if t.backend == "onnxruntime":
        return export_onnx(program, out, meta, weights, opset=ORT_OPSET, compress=t.weights)
    if t.backend == "openvino":
        from .lower.openvino import export_openvino

        return export_openvino(program, out, meta, t.weights, weights)
    if t.backend == "tensorrt":
        from .lower.tensorrt import export_plan

        return export_plan(program, out, meta, t.min_prompt, t.max_prompt, int(t.workspace_gb * 2**30),
                           weights)
    from .lower.aoti import export_aoti

    return export_aoti(program, out, meta, t.device)


def write_engine(b: Build, source: ModelSource, out: Path, target: Target | None = None,
                 decode: bool = True) -> Optimized:
    """Lower a build to an engine file, stamp its metadata, run the TensorRT preflight on what TensorRT eats.
    Its tokenizer copy and decode engine (built once per model, dtype and backend) are written first, so the
    prefill file appears only when everything it names is beside it: an interrupted run leaves at most those
    complete, reusable files."""
    t = target or Target()
    mid = source_id(source)
    meta = engine_metadata(b, source, mid, t)
    check_writable(out)
    if t.one_file and (not decode or meta["decode"] is None):
        raise VtrError(f"{out}: --one-file holds the decode engine too, and an exported program has none (generation "
                       "needs an eager model: a Hugging Face directory, a preset or a pickled module)")
    if (meta["processor"] or {}).get("tokenizer"):
        from .engine.prompting import copy_tokenizer

        copy_tokenizer(Path(source.label), out.parent, mid)
    decode_path = None
    if decode and meta["decode"] is not None:
        from .decode import ensure_decode_engine

        assert source.hf_model is not None
        decode_path = ensure_decode_engine(source.hf_model, mid, source.label, out.parent, t,
                                           b.facts.boundary.batch, source.weights)
    elif source.hf_model is None:
        log.warning("%s: built from an exported program; no decode engine (generation needs an eager model: "
                    "a Hugging Face directory, a preset or a pickled module)", out)
    findings: list[Finding] = []
    # no preflight of a compressed ONNX Runtime engine: its MatMulNBits nodes are ONNX Runtime's own, and TensorRT would
    # read the float engine instead
    skip = t.backend == "onnxruntime" and t.weights != "none"
    check = (lambda path: []) if skip else preflight
    if t.one_file and decode_path is not None and t.backend == "openvino":
        from .lower.openvino import export_openvino
        from .lower.openvino_phases import write_one_file as write_one_ir

        files, meta = write_one_ir(out, decode_path, lambda path: export_openvino(
            b.program, path, meta, t.weights, source.weights, store_folder=out.parent))
    elif t.one_file and decode_path is not None:  # the prefill engine is joined before anything reaches `out`
        from .lower.onnx_phases import write_one_file

        def prefill(path: Path) -> None:
            export_onnx(b.program, path, meta, source.weights, store_folder=out.parent, opset=ORT_OPSET,
                        compress=t.weights)
            findings.extend(check(path))

        files, meta = write_one_file(out, decode_path, prefill)
    else:
        files = lower_program(b.program, out, meta, t, source.weights)
        findings = check(out) if t.backend == "onnxruntime" else []
    return Optimized(b, files, meta, None if skip else findings)


def optimize(source: ModelSource, method: str, options: dict[str, Any], out: Path,
             max_prompt: int | None = None, backend: str | None = None, target: Target | None = None) -> Optimized:
    t = target or Target(backend=backend_for(out, backend), max_prompt=max_prompt)
    check_target(t)
    check_writable(out)  # fail before minutes of work, not after
    if source.weights is not None and t.backend == "aoti":
        source.eager()  # AOTInductor compiles the program with its weights in memory
    cast_model(source, t.dtype)
    return write_engine(build(source, method, options, t.max_prompt), source, out, t)
