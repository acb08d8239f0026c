"""Engine file -> its runner, by extension (one table for every command), and metadata checks on load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import VtrError
from .metadata import check_metadata

# Output extension -> backend; the first extension is the one vtrcompile writes.
BACKENDS = {"onnxruntime": (".onnx",), "openvino": (".xml",), "tensorrt": (".plan", ".engine"), "aoti": (".pt2",)}


def backend_of(path: str | Path) -> str:
    ext = Path(path).suffix.lower()
    for name, exts in BACKENDS.items():
        if ext in exts:
            return name
    raise VtrError(f"{path}: unknown engine type '{ext}'; expected .onnx, .xml, .plan/.engine or .pt2")


def open_prefill(path: str | Path, threads: int | None = None):
    """open_engine for commands that run prompts (profile, eval): a decode engine is refused in one line."""
    eng = open_engine(path, threads)
    if eng.metadata.get("role") != "prefill":
        raise VtrError(f"{path} is a decode engine; give the prefill engine that pairs with it (the file "
                       "`vtrcompile optimize --out` wrote)")
    return eng


def open_engine(path: str | Path, threads: int | None = None):
    """An engine file -> its runner (.onnx ONNX Runtime, .plan/.engine TensorRT, .pt2 AOTInductor)."""
    backend = backend_of(path)
    if backend == "onnxruntime":
        from ..lower.onnxruntime import OrtEngine

        eng: Any = OrtEngine(path, threads)
    elif backend == "openvino":
        from ..lower.openvino import OvEngine

        eng = OvEngine(path, threads)
    elif backend == "tensorrt":
        from ..lower.tensorrt_runner import TrtEngine

        eng = TrtEngine(path)
    else:
        from ..lower.aoti import AotiEngine

        eng = AotiEngine(path, threads)
    check_metadata(eng.metadata, Path(path))
    return eng


def read_engine_metadata(path: str | Path) -> dict[str, Any] | None:
    """The vtrcompile metadata of an engine file, without building a session where the format allows;
    None when the file is not a readable vtrcompile engine."""
    p = Path(path)
    try:
        backend = backend_of(p)
        if backend == "onnxruntime":
            from ..lower.onnxruntime import engine_metadata

            return engine_metadata(p)
        if backend == "openvino":
            from ..lower.openvino import read_ir

            return read_ir(p)[1]
        if backend == "tensorrt":
            from ..lower.tensorrt import read_sidecar

            return read_sidecar(p)["vtrcompile_metadata"]
        from ..lower.aoti import AotiEngine

        return AotiEngine(p).metadata
    except VtrError:
        return None
