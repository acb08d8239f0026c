"""Peak-memory estimates, checked before heavy work: a job the machine cannot hold is refused in one line
(naming the numbers and what would fit) instead of being killed by the kernel halfway."""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path

import torch

from .errors import VtrError

log = logging.getLogger(__name__)

GB = 1e9
RUNTIME = 1.5 * GB  # Python, torch, the exporter and the captured graph (measured ~1 GB for the 7B graph)
AOTI_COPIES = 3.2  # weight copies alive while an AOTInductor package compiles (3.1 measured, see optimize_estimate)


def available_bytes() -> int:
    """Memory this process may still use: MemAvailable, or less under a cgroup limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


# Engines open in this process whose runtime allocates (some of) their weights at the first run, not when they are
# opened (OpenVINO's CPU plugin packs them then): id -> bytes. Each check of memory holds those bytes back, so a
# decode engine opened before its prefill has run is not allowed memory the prefill is about to take. Measured:
# a 7B bf16 prefill grew by 13.4 GB of packed weights at its first run, after both engines of the pair had
# passed their checks, and the process was killed (BENCHMARKS.md, "Generating at 7B on 24 GB").
_first_run: dict[int, int] = {}


def anonymous_bytes() -> int:
    """This process's resident anonymous memory (RssAnon; 0 where /proc is not there)."""
    from .engine.resident import status_kib

    try:
        return status_kib("RssAnon") * 1024
    except VtrError:
        return 0


def expect_first_run(engine: object, nbytes: int) -> None:
    """`engine` will take `nbytes` more at its first run (held back until first_run_done or its end)."""
    _first_run[id(engine)] = nbytes
    weakref.finalize(engine, _first_run.pop, id(engine), None)


def first_run_done(engine: object) -> None:
    _first_run.pop(id(engine), None)


def held_back() -> int:
    return sum(_first_run.values())


def weight_bytes(source, dtype: torch.dtype) -> int:
    """The model's weights in `dtype` (read from the checkpoint's headers when it is read lazily)."""
    if source.weights is not None:
        return source.weights.bytes_in(dtype)
    size = dtype.itemsize
    state = source.module.state_dict() if source.module is not None else source.program.state_dict
    seen, total = set(), 0
    for t in state.values():
        key = (t.data_ptr(), t.device.type) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * (size if t.is_floating_point() else t.element_size())
    return total


# bytes per parameter of an engine with compressed linear layers: the int8 or int4 weights, their scales, and what
# stays wider (ONNX Runtime keeps the embedding table float32; NNCF makes it int8). Measured at 7B (7.06 B
# parameters): ONNX Runtime's stores of 8.3 GB (int8) and 4.85 GB (int4) in blocks of 32, BENCHMARKS.md, "int4
# weights". Blocks of 128 since brought int4 to 4.20 GB (0.6 a parameter; OpenVINO's int4 IR: 0.53); 0.7 stays a margin
COMPRESSED_BYTES_PER_PARAMETER = {"int8": 1.2, "int4": 0.7}
INT4_BYTES_PER_PARAMETER = 0.6  # what the int4 stores measured (above), for advice


def compressed_bytes(w: int, dtype: torch.dtype, weights: str) -> float:
    """What an engine of `w` bytes of `dtype` weights holds with its linear layers compressed to `weights`."""
    return w / dtype.itemsize * COMPRESSED_BYTES_PER_PARAMETER[weights]


def optimize_estimate(source, backend: str, dtype: torch.dtype, profile: bool, weights: str = "none",
                      one_file: bool = False) -> tuple[float, str, list[str]]:
    """(bytes, what they are, what would need less) for `optimize` of `source` to `backend` (`weights`: weight
    compression, "none", "int8" or "int4"; `one_file`: one-file engines, which hold each weight once)."""
    w = weight_bytes(source, dtype)
    name = str(dtype).removeprefix("torch.")
    advice = []
    # OpenVINO IRs point at the ONNX weight store (lower/openvino_store.py); TensorRT's ONNX parser reads every
    # weight: the network it builds references host buffers of every weight until the build ends (TensorRT's API
    # contract; not measured here, no GPU)
    streamed = source.weights is not None and backend in ("onnxruntime", "openvino") and weights == "none"
    if streamed:
        need, what = RUNTIME + 3 * 4 * source.weights.largest, f"{w / GB:.1f} GB of {name} weights streamed from the checkpoint"
    elif source.weights is not None and backend in ("onnxruntime", "openvino"):
        # streamed as above into a scratch store, then compressed one weight at a time from there (ONNX Runtime's
        # quantizer maps each weight, lower/onnx_weights.py; NNCF reads each from OpenVINO's memory-mapped reading
        # of the ONNX file, pages the kernel can drop): what is held is the compressed engine, whole while it is
        # written. At 7B ONNX Runtime's int8 engine is 8.3 GB from 28 GB of float32 weights, 9.1 GB peak RSS for the
        # whole optimize (BENCHMARKS.md, "ONNX Runtime with int8 weights")
        need, what = (RUNTIME + 3 * 4 * source.weights.largest + compressed_bytes(w, dtype, weights),
                      f"{w / GB:.1f} GB of {name} weights streamed from the checkpoint and compressed to {weights}")
        if backend == "openvino":
            advice.append(f"drop --weights {weights} (the IR then reads the weights where the checkpoint streamed "
                          "them)")
    elif source.weights is not None and backend == "tensorrt":
        need, what = RUNTIME + 1.0 * w, f"{w / GB:.1f} GB of {name} weights held by TensorRT's parser while it builds"
        advice += ["write an .onnx or .xml engine (their weights stream from a Hugging Face checkpoint)",
                   "build the .plan on a machine with more memory"]
    elif backend == "aoti":
        # Inductor freezes the weights and oneDNN packs a copy of every linear layer's (lower/aoti.py). Measured on
        # llava15-geometry (0.56 GB f32): 3.23 GB peak RSS, RUNTIME + 3.1x the weights (2.77 GB unfrozen)
        need, what = (RUNTIME + AOTI_COPIES * w,
                      f"{w / GB:.1f} GB of {name} weights in memory while AOTInductor compiles them, with packed copies")
        advice.append("write an .onnx or .xml engine (their weights stream from a Hugging Face checkpoint)")
    elif backend == "onnxruntime" and weights != "none":
        # the model's weights and the compressed engine being written. Measured with int8 on a pickled LLaVA with
        # 3.0 GB of float32 weights: 7.4 GB peak RSS while compressing (RUNTIME + 2.0x; BENCHMARKS.md, "ONNX Runtime
        # with int8 weights"); the whole one-file build 6.6 GB since the join writes piecewise (RUNTIME + 1.7x; it
        # was 9.6 GB: BENCHMARKS.md, "The one-file join's memory"); int4 engines are smaller (not measured from memory)
        need = RUNTIME + 2.0 * w
        what = f"{w / GB:.1f} GB of {name} weights in memory, compressed to {weights}"
        advice.append("give a Hugging Face checkpoint (its weights stream; 9.1 GB peak at 7B)")
    else:
        need, what = RUNTIME + 1.5 * w, f"{w / GB:.1f} GB of {name} weights in memory while lowering"
        advice.append("write an .onnx or .xml engine (their weights stream from a Hugging Face checkpoint)")
    if profile:  # the two prefill engines and their decode engines, each holding its own copy of the weights
        held = w if weights == "none" or (backend == "openvino" and dtype != torch.float32) else \
            compressed_bytes(w, dtype, weights)  # OpenVINO decompresses them for bf16 / f16 activations only
        need += (2 if one_file else 4) * held  # a one-file engine's decode phase shares its prefill's weights
        what += ", plus the two one-file engines --profile runs" if one_file else \
            ", plus the prefill and decode engines --profile runs"
        advice.insert(0, "drop --profile (profile the engines on a larger machine)")
    if dtype == torch.float32:
        advice.append("--dtype bfloat16 halves the weights")
    return need, what, advice


def eager_estimate(source, dtype: torch.dtype) -> tuple[float, str, list[str]]:
    """A job that runs the model eagerly (search, --keep auto): the weights in memory, plus activations."""
    w = weight_bytes(source, dtype)
    advice = ["--dtype bfloat16 halves the weights"] if dtype == torch.float32 else []
    return RUNTIME + 1.2 * w, f"{w / GB:.1f} GB of {str(dtype).removeprefix('torch.')} weights in memory", advice


def serving_estimate(weights: int, meta: dict | None = None) -> tuple[float, str, list[str]]:
    """Opening an engine to run it: at least its weights, which each runtime keeps a copy of per engine, packed for
    its kernels (a prefill engine and its decode engine hold the LLM's twice; measured on llava15-geometry, opening
    the decode engine grew the process by 1.1x its weights in ONNX Runtime f32, 1.7x in OpenVINO bf16, BENCHMARKS.md,
    "Measured memory of a serving process"). `meta`: the engine's metadata where it is known before loading (its
    role, dtype and weight compression say what would need less)."""
    meta = meta or {}
    what = f"its {weights / GB:.1f} GB of weights, which the runtime keeps a copy of for this engine"
    advice = []
    if meta.get("role") == "decode":
        what += ": a second copy of the LLM's, beside the prefill engine's"
        advice.append("build a one-file engine (`vtrcompile optimize --one-file`, .onnx or .xml), whose decode phase "
                      "shares the prefill's weights")
    if meta and meta.get("weights", "none") == "none":  # .onnx and .xml engines; both take --weights
        advice.append(f"rebuild it with `vtrcompile optimize --weights int4` and no --dtype (the linear layers at "
                      f"about {INT4_BYTES_PER_PARAMETER} bytes a parameter)")
    if meta.get("dtype") == "float32":
        advice.append("--dtype bfloat16 halves the weights")
    return weights, what, [*advice, "free memory or use a machine with more"]


def check_engine_fits(path: Path, weights: int, meta: dict | None = None) -> None:
    """Refuse to open an engine whose weights do not fit (serving_estimate), before the runtime loads any of it."""
    check_fits(f"opening {path.name}", serving_estimate(weights, meta), level=logging.DEBUG)


def check_fits(job: str, estimate: tuple[float, str, list[str]], level: int = logging.INFO) -> None:
    need, what, advice = estimate
    held = held_back()
    avail = available_bytes() - held
    later = f", after {held / GB:.1f} GB held back for engines that take their weights at their first run" \
        if held else ""
    log.log(level, "%s: needs about %.1f GB (%s); %.1f GB available%s", job, need / GB, what, avail / GB, later)
    if need > avail:
        instead = "; or ".join(advice) if advice else "use a machine with more memory"
        raise VtrError(f"{job} needs about {need / GB:.1f} GB of memory ({what}) and {avail / GB:.1f} GB are "
                       f"available{later}; {instead}")


def release_freed_heap() -> None:
    """Hand the heap memory this process has freed back to the OS (glibc's malloc_trim; elsewhere nothing).

    glibc keeps freed heap pages for reuse, and a runtime building a session frees a lot: ONNX Runtime's graph
    optimizer copies the weights it transforms and drops the copies. Without this, that memory stays resident
    for the life of a serving process (measured in BENCHMARKS.md, "One file, weights once")."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
