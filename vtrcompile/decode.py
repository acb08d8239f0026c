"""Model source -> the decode-step engine: one per model, dtype and backend, shared by every method's prefill.

The decode step is never reduced: it reads each layer's cache buffer, whatever its filled length, and returns the
new token's keys and values for the host to write into it (models/decoder.py, engine/kv_cache.py). Its file is
named by the model identity and dtype (`decode-<id>-<dtype>.<ext>`) and sits next to the prefill engines that
pair with it; a matching file already there is reused, not rebuilt, and with
VTRCOMPILE_DECODE_CACHE set one built for another folder is copied from the cache (decode_cache.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from . import decode_cache
from .engine.host_inputs import takes_padding
from .engine.io import FORMAT_VERSION, decode_inputs, decode_outputs, describe
from .engine.metadata import DECODE, stamp
from .engine.runners import read_engine_metadata
from .errors import VtrError
from .lower import onnx_weights
from .lower.onnx import ORT_OPSET
from .models.decoder import DecodeStep, cache_geometry, eos_token_ids
from .models.family import family_of
from .passes.graph_utils import mark_meta_current
from .passes.replace_rsqrt_scaling import replace_rsqrt_scaling
from .passes.strip_runtime_asserts import strip_runtime_asserts

log = logging.getLogger(__name__)

# A cache is never shorter than the two text tokens every prompt keeps (export must not specialise 0/1).
MIN_PAST = 2
# The backends whose decode step writes each layer's rotary table in the plain form (models/decoder.layer_rotary).
# ONNX Runtime's engines are written at ORT_OPSET, where the exporter fuses that form into one RotaryEmbedding node
# per query and key: the demo model's step measured 0.431 -> 0.358 ms, llava15-geometry's 11.82 -> 10.92 ms.
# OpenVINO reads the exporter's default opset, which has no such node, and its steps measured 2-3% slower in the
# plain form (demo f32 0.468 -> 0.483 ms, llava15-geometry bf16 6.14 -> 6.27), so it, AOTInductor (whose compiler
# fuses the arithmetic either way) and TensorRT keep one rotary call for all layers (BENCHMARKS.md, "Fused rotary
# embeddings in the decode step"). Float32 only: in a lower precision the tables' cast sits between the cosine and
# its use, a form the exporter does not fuse.
PLAIN_ROTARY_BACKENDS = ("onnxruntime",)


def decode_file_name(model_id: str, dtype: str, ext: str, device: str = "cpu", weights: str = "none",
                     batch: int = 1) -> str:
    """The decode engine's file name: one per model, dtype, weight format, device and batch (batch 1 unnamed)."""
    return (f"decode-{model_id[:12]}-{dtype}{'' if weights == 'none' else '-' + weights}"
            f"{'' if device == 'cpu' else '-' + device}{'' if batch == 1 else f'-b{batch}'}{ext}")


def capture_decode(model: torch.nn.Module, batch: int, plain_tables: bool = False
                   ) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """torch.export of DecodeStep with every layer's buffer capacity its own dynamic dim; batch > 1 also takes the
    prompt's left-padding attention_mask [B, prompt]. `plain_tables`: DecodeStep's rotary tables per layer in the
    plain form (for PLAIN_ROTARY_BACKENDS, in float32)."""
    geo = cache_geometry(model)
    n, kv, d = geo["llm_layers"], geo["kv_heads"], geo["head_dim"]
    p = next(iter(model.parameters()))
    past = []
    for i in range(n):  # distinct example capacities, so no two layers' dims can be merged by accident
        t = torch.zeros(batch, kv, MIN_PAST + 3 + i, d, dtype=p.dtype, device=p.device)
        past += [t, t.clone()]
    ids = torch.zeros(batch, 1, dtype=torch.int64, device=p.device)
    pos = torch.full((batch, n), MIN_PAST + 3, dtype=torch.int64, device=p.device)
    lengths = torch.full((n,), MIN_PAST + 1, dtype=torch.int64, device=p.device)
    padded = takes_padding(batch)
    mask = [torch.ones(batch, MIN_PAST + 4 + n, dtype=torch.int64, device=p.device)] if padded else []
    past_dims = tuple({2: torch.export.Dim.DYNAMIC(min=MIN_PAST, max=geo["max_context"] - 1)} for _ in range(2 * n))
    mask_dims = ({1: torch.export.Dim.DYNAMIC(min=MIN_PAST + 1, max=geo["max_context"])},) if padded else ()
    dims = {"input_ids": None, "layer_position_ids": None, "rest": (*past_dims, None, *mask_dims)}
    args = (ids, pos, *past, lengths, *mask)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            ep = torch.export.export(DecodeStep(model, padded, plain_tables).eval(), args, dynamic_shapes=dims,
                                    strict=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VtrError(f"torch.export of the decode step failed: {first}") from e
    gm = ep.module()
    mark_meta_current(gm)
    # the RMSNorms in the form ONNX Runtime fuses, as in the prefill
    if replace_rsqrt_scaling(gm).modified:
        with torch.no_grad():
            ep = torch.export.export(gm, args, dynamic_shapes=(None, None, *dims["rest"]), strict=False)
        strip_runtime_asserts(ep.graph_module)
    log.info("decode step exported in %.1fs (%d nodes)", time.perf_counter() - t0, len(ep.graph.nodes))
    sig = ep.graph_signature
    nodes = {nd.name: nd for nd in ep.graph.nodes}
    dim_names = {}
    for i in range(n):
        s = nodes[sig.user_inputs[2 + 2 * i]].meta["val"].shape[2]
        dim_names[s.node.expr] = f"capacity.{i}"
    if padded:
        dim_names[nodes[sig.user_inputs[-1]].meta["val"].shape[1].node.expr] = "prompt"
    return ep, dim_names


def decode_metadata(model: torch.nn.Module, model_id: str, label: str, dtype: str, backend: str,
                    io: dict[str, Any], batch: int = 1) -> dict[str, Any]:
    return stamp(DECODE, {"batch": batch, "model": label, "model_id": model_id, "dtype": dtype, "backend": backend,
                          **cache_geometry(model), "vocab": int(family_of(model).text_config(model.config).vocab_size),
                          "eos_token_ids": eos_token_ids(model), "io": io})


def ensure_decode_engine(model: torch.nn.Module, model_id: str, label: str, folder: Path, target,
                         batch: int, weights=None) -> Path:
    """The decode engine for (model, dtype, backend) in `folder`: reused when one is there, else built."""
    from .optimize import BACKENDS

    ext = BACKENDS[target.backend][0]
    path = folder / decode_file_name(model_id, target.dtype, ext, target.device, target.weights, batch)
    n = cache_geometry(model)["llm_layers"]

    def matches() -> bool:
        meta = read_engine_metadata(path) if path.is_file() else None
        return bool(meta and meta.get("role") == "decode" and meta.get("model_id") == model_id
                    and meta.get("format") == FORMAT_VERSION and meta.get("dtype") == target.dtype
                    and meta.get("weights", "none") == target.weights
                    and meta.get("batch") == batch
                    and (target.backend != "onnxruntime" or meta.get("onnx_opset") == ORT_OPSET)
                    and (target.backend != "onnxruntime" or target.weights == "none"
                         or meta.get("weights_blocks") == onnx_weights.BLOCK_RULE)
                    and [t["name"] for t in meta["io"]["inputs"]] == decode_inputs(n, takes_padding(batch)))

    if matches():
        log.info("decode engine %s already built for this model; reused", path)
        return path
    cacheable = weights is None and target.backend != "tensorrt"
    if cacheable and decode_cache.restore(path.name, folder) and matches():
        return path
    plain = target.backend in PLAIN_ROTARY_BACKENDS and target.dtype == "float32"
    ep, dim_names = capture_decode(model, batch, plain)
    io = describe(ep, decode_inputs(n, takes_padding(batch)), decode_outputs(n), dim_names)
    meta = decode_metadata(model, model_id, label, target.dtype, target.backend, io, batch)
    from .optimize import lower_program

    files = lower_program(ep, path, meta, target, weights)
    log.info("wrote decode engine %s", path)
    if cacheable:
        decode_cache.store(files)
    return path
