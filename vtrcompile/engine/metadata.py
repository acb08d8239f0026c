"""Every key of an engine's metadata, defined once: which roles carry it and what it means.

The writers (`optimize.engine_metadata`, `decode.decode_metadata`) go through `stamp`, which refuses a key
that is not declared here or a declared one that is missing; the runners go through `check_metadata` on
load. docs/engine.md documents the same table (a test keeps them equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import VtrError
from .io import FORMAT_VERSION

PREFILL, DECODE = "prefill", "decode"
BOTH = (PREFILL, DECODE)

# key -> (roles that carry it, meaning). Keys marked LOWERING are added by the backend's writer.
KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "vtrcompile": (BOTH, "the vtrcompile version that wrote the engine"),
    "torch": (BOTH, "the torch version it was captured with"),
    "format": (BOTH, "engine format version"),
    "role": (BOTH, "prefill or decode"),
    "model": (BOTH, "the model's label (path or preset)"),
    "model_id": (BOTH, "hash of the model's parameter names, shapes and values"),
    "dtype": (BOTH, "compute precision of the graph"),
    "backend": (BOTH, "onnxruntime, aoti or tensorrt"),
    "io": (BOTH, "names, dtypes and shapes of the inputs and outputs"),
    "batch": (BOTH, "the fixed batch size"),
    "vocab": (BOTH, "vocabulary size (width of logits)"),
    "llm_layers": (BOTH, "decoder layers (cache geometry)"),
    "kv_heads": (BOTH, "key/value heads per layer (cache geometry)"),
    "head_dim": (BOTH, "width of one head (cache geometry)"),
    "max_context": (BOTH, "the model's max_position_embeddings"),
    "eos_token_ids": (BOTH, "token ids that end generation"),
    "decode": ((PREFILL,), "the paired decode engine: {file, model_id}, or null; a one-file engine (optimize's "
                           "default for .onnx, --one-file for .xml) also holds it: file is its own name, and metadata "
                           "the decode engine's"),
    "processor": ((PREFILL,), "image preprocessing, prompt template and tokenizer folder"),
    "method": ((PREFILL,), "the reduction method"),
    "options": ((PREFILL,), "the method's options as given"),
    "reductions": ((PREFILL,), "each reduction site: {method, site, layer, count (image tokens it leaves, "
                               "protected rows included), positions} and its constants (protected_rows: "
                               "image rows every site keeps, e.g. LLaVA-NeXT row ends)"),
    "image_token_id": ((PREFILL,), "the image placeholder id"),
    "n_image": ((PREFILL,), "image placeholders per prompt"),
    "pixel_shape": ((PREFILL,), "shape of one row of pixel_values: [3, H, W] of one image (tile), or one "
                                "flattened patch (Qwen-VL)"),
    "pixel_rows": ((PREFILL,), "rows of pixel_values per prompt: pixel_values is [batch * pixel_rows, "
                               "*pixel_shape]"),
    "tiles": ((PREFILL,), "images (tiles) per prompt"),
    "host_inputs": ((PREFILL,), "engine inputs the runner derives from input_ids: {name: {kind, ...}} (mRoPE "
                                "position_ids), {} for none"),
    "prompt_range": ((PREFILL,), "[min, max] prompt length the engine accepts"),
    "llm_token_drop": ((PREFILL,), "per decoder layer: S - S_l"),
    "flops_poly": ((PREFILL,), "prefill FLOPs = a + b S + c S^2"),
    "has_weights": (BOTH, "LOWERING (ONNX): false when written without weights"),
    "onnx_opset": (BOTH, "LOWERING (ONNX): the ONNX opset written (ORT_OPSET for ONNX Runtime engines)"),
    "weights_file": (BOTH, "LOWERING (ONNX, OpenVINO): the model's shared weight store the initializers (the "
                           "IR's .bin link) point at, when the weights were streamed from a checkpoint"),
    "device": (BOTH, "LOWERING (AOTInductor): the device it was compiled for"),
    "weights": (BOTH, "LOWERING (OpenVINO; ONNX Runtime when compressed): none, int8 or int4 (weight-only "
                      "compression of the linear layers: NNCF for OpenVINO, MatMulNBits for ONNX Runtime)"),
    "weights_blocks": (BOTH, "LOWERING (ONNX Runtime when compressed): the MatMulNBits block rule, [large, small]: "
                             "blocks of `large` rows where a layer's K is a multiple of it, else of `small`"),
}

STAMPED = ("vtrcompile", "torch", "format", "role")


def keys_for(role: str, lowering: bool = False) -> set[str]:
    """The keys an engine of `role` carries (with `lowering`, also those a backend's writer may add)."""
    return {k for k, (roles, meaning) in KEYS.items()
            if role in roles and (lowering or not meaning.startswith("LOWERING"))}


def stamp(role: str, fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` plus the version stamps; every declared key of the role present, nothing undeclared."""
    meta = {"vtrcompile": __version__, "format": FORMAT_VERSION, "torch": torch.__version__, "role": role,
            **fields}
    want = keys_for(role)
    if set(meta) != want:
        raise AssertionError(f"{role} metadata: missing {sorted(want - set(meta))}, "
                             f"undeclared {sorted(set(meta) - want)} (declare keys in engine/metadata.py)")
    return meta


# A one-file engine's boolean input: true runs the prefill phase, false the decode phase.
PHASE_INPUT = "prefill"


def is_one_file(meta: dict[str, Any]) -> bool:
    """Whether an engine holds its decode engine too (lower/onnx_phases.py, lower/openvino_phases.py)."""
    return bool((meta.get("decode") or {}).get("metadata"))


def _other_phase_inputs(meta: dict[str, Any], prefill: bool) -> list[dict[str, Any]]:
    mine, other = meta["io"], meta["decode"]["metadata"]["io"]
    if not prefill:
        mine, other = other, mine
    names = {t["name"] for t in mine["inputs"]}
    return [t for t in other["inputs"] if t["name"] not in names]


def one_file_phases(meta: dict[str, Any], graph_inputs: set[str], path: Path
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """For a run of the prefill phase and of the decode phase of a one-file engine: the inputs only the other phase
    reads ({name, shape, dtype} as the io lists them). Runtimes want every input bound, so each backend feeds them
    as empty tensors; the branch not taken never reads them. Checks first that the file is one (its graph takes
    the phase flag and those inputs, its metadata carries a decode engine's), so that damage is one line."""
    inner = meta["decode"]["metadata"]
    try:
        if PHASE_INPUT not in graph_inputs or not isinstance(inner, dict) or inner.get("role") != "decode":
            raise ValueError
        check_metadata(inner, path)
        phases = _other_phase_inputs(meta, True), _other_phase_inputs(meta, False)
        if any(t["name"] not in graph_inputs for phase in phases for t in phase):
            raise ValueError
        return phases
    except (KeyError, TypeError, ValueError, AttributeError):
        raise VtrError(f"{path}: a one-file engine whose decode half is damaged (metadata or graph); rebuild it with "
                       "`vtrcompile optimize --one-file`") from None


def check_metadata(meta: dict[str, Any], path: Path) -> None:
    """Refuse, before any run, an engine written in another vtrcompile engine format or missing keys."""
    fmt = meta.get("format", 1)
    if fmt != FORMAT_VERSION:
        raise VtrError(f"{path}: an engine of vtrcompile engine format {fmt}; this vtrcompile reads format "
                       f"{FORMAT_VERSION}; rebuild it with `vtrcompile optimize`")
    role = meta.get("role")
    if role not in BOTH:
        raise VtrError(f"{path}: its vtrcompile metadata has role {role!r}, not prefill or decode; rebuild it "
                       "with `vtrcompile optimize`")
    missing = sorted(keys_for(role) - set(meta))
    if missing:
        raise VtrError(f"{path}: its vtrcompile metadata lacks {', '.join(missing)}; rebuild it with "
                       "`vtrcompile optimize`")
