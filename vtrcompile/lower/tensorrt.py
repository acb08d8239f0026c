"""ONNX engine file -> TensorRT `.plan` (+ JSON sidecar) with the Python builder API; TensorRT 10 and 11.

TensorRT is an optional extra (`pip install 'vtrcompile[tensorrt]'`), imported only when a `.plan` is asked
for. Everything before `build_serialized_network` (shapes of the optimization profile, the sidecar, the
checks) is plain Python and is tested on CPU; the build itself needs TensorRT and an NVIDIA GPU.

Precision: TensorRT 11 removed the FP16/BF16 builder flags and always builds strongly typed networks, so
on both versions we build strongly typed and reduced precision comes from the dtype the graph was exported
in (`optimize --dtype float16|bfloat16`), never from a builder flag.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import VtrError

log = logging.getLogger(__name__)

MIN_MAJOR = 10
INSTALL_HINT = ("install it with `pip install 'vtrcompile[tensorrt]'` on a machine with an NVIDIA GPU, "
                "or write --out engine.onnx (ONNX Runtime) or engine.pt2 (AOTInductor) instead")


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, or one line saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise VtrError(f"TensorRT is not installed; {INSTALL_HINT}") from None
    except Exception as e:  # the PyPI stub package raises at import when the real wheel is missing
        raise VtrError(f"TensorRT could not be imported ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                       f"{INSTALL_HINT}") from None
    if not hasattr(trt, "Builder"):  # e.g. only tensorrt-stubs' .pyi files: a namespace package, no library
        raise VtrError(f"TensorRT is not installed (only its type stubs were found); {INSTALL_HINT}")
    version = getattr(trt, "__version__", "0")
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if major < MIN_MAJOR:
        raise VtrError(f"TensorRT {version} is too old; vtrcompile builds with TensorRT 10 or 11 "
                       "(strongly typed networks, named I/O tensors)")
    return trt


def check_cuda() -> str:
    """Name of the CUDA device TensorRT will build for, or one line saying there is none."""
    import torch

    if not torch.cuda.is_available():
        raise VtrError("no CUDA GPU is visible; TensorRT engines are built and run on an NVIDIA GPU. "
                       "Write --out engine.onnx (ONNX Runtime) or engine.pt2 (AOTInductor, --device cpu) instead")
    return torch.cuda.get_device_name()


@dataclass(frozen=True)
class ProfileShapes:
    """One optimization profile: (min, opt, max) shape per input."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return {name: {"min": list(a), "opt": list(b), "max": list(c)} for name, (a, b, c) in self.shapes.items()}


def profile_shapes(meta: dict[str, Any], min_prompt: int | None, max_prompt: int | None,
                   opt_prompt: int | None = None) -> ProfileShapes:
    """The prompt-length range the engine serves; batch is fixed at capture (metadata `batch`).

    The range must sit inside the range the program was exported for (at least N+2 tokens: the image
    block and one text token each side)."""
    lo, hi = meta["prompt_range"]
    n = meta["n_image"]
    pmin = lo if min_prompt is None else min_prompt
    pmax = hi if max_prompt is None else max_prompt
    if pmin < lo:
        raise VtrError(f"--min-prompt {pmin} is below {lo}: a prompt holds the {n} image tokens and at least one "
                       "text token on each side")
    if pmax > hi:
        raise VtrError(f"--max-prompt {pmax} is above {hi}, the longest prompt the graph was captured for; "
                       "raise --max-prompt at optimize time")
    if pmin > pmax:
        raise VtrError(f"--min-prompt {pmin} is larger than --max-prompt {pmax}")
    popt = opt_prompt if opt_prompt is not None else min(pmax, max(pmin, n + 64))
    if not pmin <= popt <= pmax:
        raise VtrError(f"optimal prompt length {popt} is outside [{pmin}, {pmax}]")
    b = meta["batch"]
    px = (b * meta.get("pixel_rows", meta.get("tiles", 1)), *meta["pixel_shape"])
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
        "input_ids": ((b, pmin), (b, popt), (b, pmax)),
        "pixel_values": (px, px, px),
    }
    # Host inputs with a prompt-length dim (mRoPE position_ids [3, B, S]) follow input_ids' range.
    declared = {t["name"]: t["shape"] for t in meta["io"]["inputs"]}
    for name, how in (meta.get("host_inputs") or {}).items():
        dims = declared[name]
        at = int(how["seq_dim"])

        def shape(s: int, dims=dims, at=at) -> tuple[int, ...]:
            return tuple(s if i == at else int(d) for i, d in enumerate(dims))  # the batch is static too
        shapes[name] = (shape(pmin), shape(popt), shape(pmax))
    return ProfileShapes(shapes)


# A decode engine's profile covers caches up to the longest prompt plus this many generated tokens.
DECODE_NEW_TOKENS = 512


def decode_profile_shapes(meta: dict[str, Any], max_prompt: int) -> ProfileShapes:
    """The decode engine's profile: one new token; every layer's cache buffer from 2 rows (a prompt's text, all
    image tokens withdrawn) to max_prompt + DECODE_NEW_TOKENS (capped by the model's context), each layer
    its own dimension; past_lengths static; a batch engine's attention_mask (the prompt's) as long as a prompt."""
    b, kv, d, n = meta["batch"], meta["kv_heads"], meta["head_dim"], meta["llm_layers"]
    hi = min(meta["max_context"] - 1, max_prompt + DECODE_NEW_TOKENS)
    opt = min(hi, max(2, max_prompt // 2))
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
        "input_ids": ((b, 1), (b, 1), (b, 1)), "layer_position_ids": ((b, n), (b, n), (b, n)),
        "past_lengths": ((n,), (n,), (n,))}
    for t in meta["io"]["inputs"][2:]:
        if t["name"] == "attention_mask":
            shapes["attention_mask"] = ((b, 3), (b, max(3, min(opt, max_prompt))), (b, max(3, max_prompt)))
        elif t["name"] != "past_lengths":
            shapes[t["name"]] = ((b, kv, 2, d), (b, kv, opt, d), (b, kv, hi, d))
    return ProfileShapes(shapes)


def engine_profile(meta: dict[str, Any], min_prompt: int | None, max_prompt: int | None) -> ProfileShapes:
    """The optimization profile of a prefill or a decode engine."""
    if meta.get("role") == "decode":
        return decode_profile_shapes(meta, max_prompt or meta["max_context"] - 1 - DECODE_NEW_TOKENS)
    return profile_shapes(meta, min_prompt, max_prompt)


def sidecar(meta: dict[str, Any], shapes: ProfileShapes, versions: dict[str, str], gpu: dict[str, Any]
            ) -> dict[str, Any]:
    """What a deployer needs next to the .plan: I/O, ranges, what was reduced, and what built it."""
    if meta.get("role") == "decode":
        return {"format": "vtrcompile-tensorrt-sidecar/1", "role": "decode",
                "inputs": [{"name": t["name"], "dtype": t["dtype"],
                            "shape": [x if isinstance(x, int) else -1 for x in t["shape"]],
                            "profile": shapes.to_json()[t["name"]]} for t in meta["io"]["inputs"]],
                "outputs": [{"name": t["name"], "dtype": t["dtype"],
                             "shape": [x if isinstance(x, int) else -1 for x in t["shape"]]}
                            for t in meta["io"]["outputs"]],
                "dtype": meta["dtype"], "model": meta["model"], "model_id": meta["model_id"], "versions": versions,
                "gpu": gpu, "vtrcompile_metadata": meta}
    ids = shapes.shapes["input_ids"]
    return {
        "format": "vtrcompile-tensorrt-sidecar/1",
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": [ids[0][0], -1], "profile": shapes.to_json()["input_ids"]},
            {"name": "pixel_values", "dtype": "float32", "shape": list(shapes.shapes["pixel_values"][0]),
             "profile": shapes.to_json()["pixel_values"]},
        ],
        # logits, then each layer's KV cache and the next positions (dynamic dims -1, as Triton writes them)
        "outputs": [{"name": t["name"], "dtype": t["dtype"], "shape": [d if isinstance(d, int) else -1 for d in t["shape"]]}
                    for t in meta["io"]["outputs"]],
        "batch": meta["batch"],
        "prompt_min": ids[0][1], "prompt_opt": ids[1][1], "prompt_max": ids[2][1],
        "n_image": meta["n_image"],
        "image_token_id": meta["image_token_id"],
        "kept_tokens": [r["count"] for r in meta["reductions"]],
        "method": meta["method"], "options": meta["options"], "reductions": meta["reductions"],
        "dtype": meta.get("dtype", "float32"),
        "model": meta["model"], "model_id": meta["model_id"],
        "versions": versions,
        "gpu": gpu,
        "vtrcompile_metadata": meta,
    }


def sidecar_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


def read_sidecar(plan: Path) -> dict[str, Any]:
    p = sidecar_path(plan)
    if not p.is_file():
        raise VtrError(f"{plan}: no sidecar {p.name} next to it; build engines with `vtrcompile optimize`")
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VtrError(f"{p}: the engine's sidecar is not JSON ({getattr(e, 'msg', type(e).__name__)}); rebuild "
                       "the engine with `vtrcompile optimize`") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("vtrcompile_metadata"), dict):
        raise VtrError(f"{p}: the engine's sidecar has no vtrcompile metadata; rebuild the engine with "
                       "`vtrcompile optimize`")
    return rec


def build_plan(onnx_path: Path, shapes: ProfileShapes, workspace_bytes: int) -> bytes:
    """Parse the ONNX file and build a serialized, strongly typed engine with one optimization profile."""
    import_tensorrt()
    import tensorrt as trt  # typed by tensorrt-stubs in CI (mypy)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # STRONGLY_TYPED: opt-in on TensorRT 10, accepted and always on in 11. Types come from the ONNX.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file: external weight data is found next to it
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise VtrError(f"TensorRT's ONNX parser rejected {onnx_path.name}: " + "; ".join(errors[:3]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.shapes.items():
        profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(profile)
    log.info("building TensorRT %s engine (workspace %.1f GiB)", trt.__version__, workspace_bytes / 2**30)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise VtrError("TensorRT failed to build the engine (see the TensorRT log above); try a larger "
                       "--workspace or a smaller --max-prompt")
    return bytes(memoryview(plan))


def gpu_info() -> dict[str, Any]:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def export_plan(ep: Any, out: Path, meta: dict[str, Any], min_prompt: int | None, max_prompt: int | None,
                workspace_bytes: int, weights: Any = None) -> list[Path]:
    """Program -> ONNX (temporary) -> preflight -> TensorRT build -> `.plan` + `.plan.json`, written atomically."""
    import tempfile

    import torch

    from .atomic import write_atomically
    from .onnx import export_onnx
    from .tensorrt_preflight import preflight

    shapes = engine_profile(meta, min_prompt, max_prompt)
    trt = import_tensorrt()
    with tempfile.TemporaryDirectory() as d:
        onnx_path = Path(d) / "model.onnx"
        export_onnx(ep, onnx_path, meta, weights)
        findings = preflight(onnx_path)
        if findings:
            raise VtrError(f"the graph has {len(findings)} node(s) TensorRT cannot take, first: {findings[0]}")
        plan = build_plan(onnx_path, shapes, workspace_bytes)
    info = sidecar(meta, shapes, {"tensorrt": trt.__version__, "torch": torch.__version__,
                                  "vtrcompile": meta["vtrcompile"]}, gpu_info())

    def save(tmp: Path) -> None:
        tmp.write_bytes(plan)
        sidecar_path(tmp).write_text(json.dumps(info, indent=1, sort_keys=True))

    return write_atomically(out, save)
