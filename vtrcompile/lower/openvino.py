"""Rewritten program -> OpenVINO IR (.xml + .bin) with OpenVINO's own converter, and the CPU runner.

The program goes through the same ONNX export as the ONNX Runtime backend (I/O named from the metadata),
then OpenVINO's ONNX frontend reads that file (`Core.read_model`: less memory than `openvino.convert_model`,
which holds about two copies of the weights while it converts) and `openvino.save_model` writes the IR without compressing
weights (the engine's dtype is the graph's). The engine metadata is stored in the IR's runtime info under
`vtrcompile`, as a JSON string. The runner compiles for CPU with an explicit thread count and an explicit
inference precision: the graph's own (f32 for a float32 engine, bf16 for a bfloat16 one), so OpenVINO
never lowers a float32 engine's precision behind the user's back.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.host_inputs import prefill_feeds
from ..engine.kv_cache import float_input_dtypes
from ..engine.metadata import PHASE_INPUT, is_one_file, one_file_phases
from ..engine.protocol import check_prompt, feed_arrays
from ..errors import VtrError
from ..memory import anonymous_bytes, check_engine_fits, expect_first_run, first_run_done
from .atomic import scratch_dir, write_atomically
from .onnx import METADATA_KEY, export_onnx

log = logging.getLogger(__name__)


def _reason(e: Exception) -> str:
    """OpenVINO's message without its source-location lines: the last line that says something."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith(("Exception from", "Check "))]
    return (lines[-1] if lines else type(e).__name__)[:200]

# --weights -> NNCF's compression mode and group size (None: per output channel)
NNCF_WEIGHTS = {"int8": ("int8_asym", None), "int4": ("int4_sym", 128)}
# engine dtype -> (OpenVINO inference precision, the CPU capability it needs)
PRECISIONS = {"float32": ("f32", "FP32"), "bfloat16": ("bf16", "BF16"), "float16": ("f16", "FP16")}
# A float32 engine with int8 or int4 weights: the CPU plugin quantizes its activations to int8 in groups of this many
# (DYNAMIC_QUANTIZATION_GROUP_SIZE; the plugin's default is 32) to multiply them by the compressed weights. 128, the
# int4 weights' group, measured faster in both phases and for both widths (BENCHMARKS.md, "OpenVINO's activation
# groups").
DYNAMIC_QUANTIZATION_GROUP = 128


def _ov():
    try:
        import openvino
    except ImportError:
        raise VtrError("the OpenVINO backend (.xml) needs OpenVINO: pip install 'vtrcompile[openvino]'; or "
                       "write .onnx (ONNX Runtime)") from None
    return openvino


def check_precision(dtype: str, caps: list[str] | None = None) -> None:
    """Refuse, before any work, a precision this CPU cannot run natively (`caps`: OpenVINO's CPU
    OPTIMIZATION_CAPABILITIES, read from this machine when not given)."""
    hint, needs = PRECISIONS[dtype]
    if caps is None:
        caps = list(_ov().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if needs not in caps:
        raise VtrError(f"--dtype {dtype}: this CPU has no native {needs} support for OpenVINO (it offers "
                       f"{', '.join(caps)}); use --dtype float32")


def check_nncf() -> None:
    try:
        import nncf  # noqa: F401
    except ImportError:
        raise VtrError("--weights int8 and int4 need NNCF: pip install 'vtrcompile[openvino]' (or pip install nncf)") \
            from None


def export_openvino(program: Any, out: Path, metadata: dict[str, Any], weights: str = "none",
                    streamed: Any = None, store_folder: Path | None = None) -> list[Path]:
    """ONNX export, then OpenVINO's conversion of that file. Weights streamed from a checkpoint (`streamed`) stay
    in the model's weight store beside `out` (or in `store_folder`) and the IR points at them (`ir_on_store`:
    nothing holds or copies a weight); otherwise, and for compressed weights (NNCF reads them), `ir_from_onnx` writes
    the IR with its own .bin. Streamed weights that NNCF compresses pass through a scratch store in the temporary
    folder of the ONNX file (never the model's store, which no compressed IR reads)."""
    _ov()
    if streamed is not None and weights == "none":
        return ir_on_store(program, out, metadata, streamed, store_folder)
    with tempfile.TemporaryDirectory(prefix=".vtr-onnx.", dir=out.parent if out.parent.is_dir() else None) as d:
        onnx_path = Path(d) / (out.stem + ".onnx")
        export_onnx(program, onnx_path, metadata, streamed, store_folder if weights == "none" else None)
        return ir_from_onnx(onnx_path, out, metadata, weights)


def _ir_metadata(metadata: dict[str, Any], weights: str) -> str:
    meta = {**metadata, "backend": "openvino", "weights": weights}
    if meta.get("decode"):  # the paired decode engine is an IR too
        meta["decode"] = {**meta["decode"], "file": str(Path(meta["decode"]["file"]).with_suffix(".xml"))}
    return json.dumps(meta, sort_keys=True)


def ir_from_onnx(onnx_path: Path, out: Path, metadata: dict[str, Any], weights: str = "none") -> list[Path]:
    """An ONNX engine -> OpenVINO IR (.xml + .bin, written atomically) carrying `metadata` (backend set to
    openvino) in its runtime info. weights "int8": NNCF's weight-only int8 compression (asymmetric, per output
    channel) of the MatMul and embedding weights; "int4": NNCF's int4 (symmetric, groups of 128 along the input),
    with the embeddings and the lm_head in int8 as NNCF chooses by default. Activations, and so the selector, stay
    in the engine dtype."""
    ov = _ov()
    t0 = time.perf_counter()
    # read_model, not convert_model: measured on a 280 MB bf16 checkpoint, optimize --out x.xml peaked at 0.92 GB RSS
    # instead of 1.25 GB (0.69 GB for the ONNX engines alone) and took 38 s instead of 55 s; same engines in every test.
    model = ov.Core().read_model(str(onnx_path))
    if weights != "none":
        check_nncf()
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

        mode, group = NNCF_WEIGHTS[weights]
        # a layer whose input width is no multiple of the group (the demo model's 64 and 168) gets the largest
        # group that divides it, of at least 32, instead of an error
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode(mode), group_size=group,
                                      advanced_parameters=AdvancedCompressionParameters(
                                          group_size_fallback_mode=GroupSizeFallbackMode.ADJUST))
    model.set_rt_info(_ir_metadata(metadata, weights), [METADATA_KEY])

    def save(tmp: Path) -> None:
        ov.save_model(model, str(tmp), compress_to_fp16=False)

    files = write_atomically(out, save)
    log.debug("wrote %s in %.1fs", out, time.perf_counter() - t0)
    return files


def ir_on_store(program: Any, out: Path, metadata: dict[str, Any], streamed: Any,
                store_folder: Path | None = None) -> list[Path]:
    """A program whose weights stream from a checkpoint -> an IR whose .bin is the model's weight store.

    The ONNX export streams the weights into the store beside `out`, or in `store_folder` (shared with the model's
    other engines, as for .onnx engines). OpenVINO's reader converts that ONNX file with each stored weight swapped
    for a stand-in input before the IR is saved, so no weight is read; the saved IR's constants that remain (small
    ones, inline in the ONNX) are appended to the store as one block, and `openvino_store.point_at_store` turns each
    stand-in back into a constant at the weight's offset in the store. `<out>.bin` is a hard link to the store
    (`openvino_store.link_store`): every IR of the model reads the same bytes, stored once."""
    ov = _ov()
    from .openvino_store import link_store, point_at_store, stand_in_weights
    from .weight_store import WeightStore

    t0 = time.perf_counter()
    folder = store_folder or out.parent
    onnx_path = folder / f".{out.stem}.vtr-ir.onnx"  # beside the store, the model's shared one, which it streams into
    which = (folder, metadata.get("model_id", "model"), metadata.get("dtype", "float32"))  # as export_onnx's
    before = WeightStore(*which)
    try:
        export_onnx(program, onnx_path, metadata, streamed)
        store = WeightStore(*which)  # its index as the export left it
        model = ov.Core().read_model(str(onnx_path))
        stored = stand_in_weights(model, onnx_path, store.data.name)
        model.set_rt_info(_ir_metadata({**metadata, "weights_file": store.data.name}, "none"), [METADATA_KEY])
        with scratch_dir(out.parent, f".{out.stem[:64]}.ir.") as d:
            ov.save_model(model, str(d / "skeleton.xml"), compress_to_fp16=False)
            del model
            xml = point_at_store(d / "skeleton.xml", d / "skeleton.bin", stored, store)

        def save(tmp: Path) -> None:
            tmp.write_bytes(xml)
            link_store(store.data, tmp.with_suffix(".bin"))

        files = write_atomically(out, save)
    except BaseException:
        before.discard_if_new()  # a store this build began, and no engine points at, is not left behind
        raise
    finally:
        onnx_path.unlink(missing_ok=True)
    log.info("%s: %d weights point into %s (%.1fs)", out.name, len(stored), store.data.name, time.perf_counter() - t0)
    return files


def read_ir(path: Path):
    """The IR's model and its vtrcompile metadata; a missing or short .bin, or a damaged .xml, in one line."""
    _ov()
    if not path.is_file():
        raise VtrError(f"engine not found: {path}")
    if not path.with_suffix(".bin").is_file():
        raise VtrError(f"{path}: its weights file {path.with_suffix('.bin').name} is missing; copy the engine "
                       "together with its .bin file, or rebuild it")
    try:  # the IR frontend alone: Core.read_model would also try other frameworks' parsers on a damaged file
        from openvino.frontend import FrontEndManager

        fe = FrontEndManager().load_by_framework("ir")
        model = fe.convert(fe.load(str(path)))
    except Exception as e:
        raise VtrError(f"{path}: not a readable OpenVINO IR ({_reason(e)}); rebuild it with `vtrcompile optimize`"
                       ) from None
    try:
        meta = json.loads(str(model.get_rt_info([METADATA_KEY]).astype(str)))
    except Exception:
        raise VtrError(f"{path}: no vtrcompile metadata; build engines with `vtrcompile optimize`") from None
    return model, meta


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask; a container's cpuset, `taskset`), not the host's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "amx_bf16" in flags


def check_threads(hint: str, threads: int, usable: int | None = None, amx: bool | None = None) -> None:
    """OpenVINO's CPU plugin (2025.4 to 2026.4 at least) dies with SIGFPE while compiling a bf16 model whose
    LLM MLP it fuses for AMX when the compiled model gets a single thread (INFERENCE_NUM_THREADS 1, or one usable
    core); a crash takes the whole process with it, so such a request is refused before compiling."""
    usable = usable_cores() if usable is None else usable
    amx = cpu_has_amx() if amx is None else amx
    if hint == "bf16" and amx and min(threads, usable) < 2:
        raise VtrError(f"a bfloat16 OpenVINO engine on one thread ({threads} asked, {usable} usable core(s)) crashes "
                       "OpenVINO's CPU plugin on AMX CPUs (a division by zero in its fused MLP kernel); run it on 2 or "
                       "more threads and cores, or build a float32 engine")


def bf16_tensor(name: str, a: np.ndarray) -> Any:
    """A bfloat16 engine input as an OpenVINO tensor over the array's own memory.

    numpy has no bfloat16: OpenVINO's Python API hands a bf16 output to numpy as a float16 array of the raw bits
    (so a bf16 prefill's caches arrive that way), and when such an array is fed back in a dict it copies it into a
    fresh tensor on every run. In a decode step of `llava15-geometry` at 631 cached tokens that copy of the caches
    took 9-10 ms of a 24-26 ms step (2 threads, AMX Xeon; `benchmarks/decode_step.py --numpy-feeds`). A float16
    array is taken as those bits, not copied; float32 (or float64) values are rounded to bfloat16 first."""
    ov = _ov()
    if a.dtype.kind == "f" and a.dtype != np.float16:
        import torch

        a = torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
    elif a.dtype != np.float16:
        raise VtrError(f"{name}: the engine takes bfloat16 values, got {a.dtype}; pass floating-point values")
    return ov.Tensor(np.ascontiguousarray(a).view(np.uint16), list(a.shape), ov.Type.bf16)


def compiled_weight_bytes(model: Any, hint: str) -> int:
    """What the CPU plugin holds of an IR's constants once it runs: their bytes, with compressed (8- and 4-bit)
    weights of a bf16 or f16 engine counted at that precision, and those of an f32 engine as stored. Measured on an
    AMD EPYC (AVX-512 BF16, no AMX): the process of a 7B bf16 engine with int8 weights (7.2 GB of constants) held
    16.5 GB of anonymous memory after compiling it, as much as with bf16 weights after their first run (BENCHMARKS.md,
    "Generating at 7B on 24 GB"); `llava15-geometry`'s FastV 64 prefill IR with int4 (int8) weights took 322 (326)
    MB at compiling in bf16, as its bf16 weights do, and 135 (176) MB at its first run in f32, for 92 (134) MB of
    constants: the f32 plugin runs them compressed, multiplying int8-quantized activations ("int4 weights")."""
    import openvino as ov

    low = {ov.Type.i8, ov.Type.u8, ov.Type.i4, ov.Type.u4}
    size = {"bf16": 2, "f16": 2}.get(hint)
    total = 0
    for op in ir_constants(model):
        low_bits = size is not None and op.get_element_type() in low
        total += math.prod(int(d) for d in op.get_output_shape(0)) * size if low_bits else op.get_byte_size()
    return total


def ir_constants(model: Any) -> list[Any]:
    """Every Constant of `model` and of the bodies of its `If`s (a one-file engine), each block of bytes once: the
    IR reader maps equal constants of the two bodies onto the same bytes, which the CPU plugin packs once."""
    out, seen = [], set()
    stack = [model]
    while stack:
        for op in stack.pop().get_ops():
            if op.get_type_name() == "If":
                stack += [op.get_function(0), op.get_function(1)]
            elif op.get_type_name() == "Constant":
                key = (op.get_data().ctypes.data, op.get_byte_size()) if op.get_byte_size() else id(op)
                if key not in seen:
                    seen.add(key)
                    out.append(op)
    return out


class OvEngine:
    backend = "openvino"

    def __init__(self, path: str | Path, threads: int | None = None,
                 extra_config: dict[str, Any] | None = None) -> None:
        """`extra_config`: further OpenVINO compile properties (e.g. PERF_COUNT for a per-node profile)."""
        ov = _ov()
        self.path = Path(path)
        model, self.metadata = read_ir(self.path)
        hint = PRECISIONS.get(self.metadata.get("dtype", "float32"), ("f32", "FP32"))[0]
        weights = compiled_weight_bytes(model, hint)
        check_engine_fits(self.path, weights, self.metadata)
        self.threads = threads or usable_cores()
        check_threads(hint, self.threads)
        config = {"INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": hint,
                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if hint == "f32" and self.metadata.get("weights", "none") != "none":
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = DYNAMIC_QUANTIZATION_GROUP
        config.update(extra_config or {})
        before = anonymous_bytes()
        try:
            self.compiled = ov.Core().compile_model(model, "CPU", config)
        except Exception as e:
            raise VtrError(f"{self.path}: OpenVINO cannot compile this engine ({_reason(e)}); rebuild it with "
                           "`vtrcompile optimize`") from None
        # the CPU plugin packs bf16 and f32 weights at the first run (a 7B bf16 engine's process held 0.96 GB of
        # anonymous memory here, 14.4 GB after it), compressed ones while it compiles: what compiling did not take
        # is held back until the first run
        expect_first_run(self, max(0, weights - (anonymous_bytes() - before)))
        self._ran = False
        self.request = self.compiled.create_infer_request()
        self._chain: list[Any] = []  # two requests that shared runs take in turn (made on first use)
        self._turn = 0
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self._bf16_inputs = {p.get_any_name() for p in self.compiled.inputs if p.get_element_type() == ov.Type.bf16}
        self._feeds: dict[str, Any] | None = None
        self._held: dict[int, dict[str, Any]] = {}  # per request: the memory of each input set on it (_set)
        self._declared = self._input_dtypes(self.metadata["io"])
        self._wrapped: dict[str, Any] = {}  # torch inputs: name -> (memory key, its OpenVINO tensor), last made
        self._ov = ov
        # a one-file engine (lower/openvino_phases.py): the flag and empty inputs of the other phase, per phase
        self._phase, self._decode_phase = self._one_file_feeds() if is_one_file(self.metadata) else ({}, {})

    def _input_dtypes(self, io: dict[str, Any]) -> dict[str, torch.dtype]:
        """Float inputs' dtypes (bf16 as OpenVINO compiled it), for the torch tensors read in place."""
        return {**float_input_dtypes(io), **dict.fromkeys(self._bf16_inputs, torch.bfloat16)}

    def _one_file_feeds(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The prefill and decode phases' extra inputs of a one-file engine (checked: damage is one line): the flag,
        and an empty tensor of the graph's type for each input only the other phase reads."""
        types = {p.get_any_name(): p.get_element_type() for p in self.compiled.inputs}

        def feeds(prefill: bool, others: list[dict[str, Any]]) -> dict[str, Any]:
            return {PHASE_INPUT: self._ov.Tensor(np.array(prefill)),
                    **{t["name"]: self._ov.Tensor(types[t["name"]], [0] * len(t["shape"])) for t in others}}

        prefill_others, decode_others = one_file_phases(self.metadata, set(types), self.path)
        return feeds(True, prefill_others), feeds(False, decode_others)

    def decode_view(self) -> OvEngine:
        """The decode phase of a one-file engine: the same compiled model, so the same packed weights, with its own
        metadata (the decode engine's) and infer requests."""
        view = copy.copy(self)
        view.metadata = self.metadata["decode"]["metadata"]
        view._declared = self._input_dtypes(view.metadata["io"])
        view._phase = self._decode_phase
        view.request = self.compiled.create_infer_request()
        view._chain, view._turn, view._feeds, view._held, view._wrapped = [], 0, None, {}, {}
        return view

    def bind(self, feeds: dict[str, Any]) -> None:
        """Numpy arrays (checked against the engine's io) and CPU torch tensors in the engine's input dtype (the
        generation loop's cache buffers), both read in place; set on the timing request (`time_ms`)."""
        self._feeds, keys = self._tensors(feeds)
        self._set(self.request, self._feeds, keys)

    def _tensors(self, feeds: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Each input as an OpenVINO tensor over its memory, and a key of that memory (address, shape, dtype) for
        inputs read in place; None where a conversion made a copy."""
        tensors = {k: v for k, v in feeds.items() if isinstance(v, torch.Tensor) and v.dtype == self._declared.get(k)
                   and v.device.type == "cpu" and v.is_contiguous()}
        arrays = feed_arrays(self.metadata["io"], {k: v for k, v in feeds.items() if k not in tensors}, set(tensors))
        out, keys = {}, {}
        for n, t in tensors.items():  # the wrapper of the same memory made last time is reused
            keys[n] = (t.data_ptr(), tuple(t.shape), str(t.dtype))
            made = self._wrapped.get(n)
            if made is None or made[0] != keys[n]:
                a = t.view(torch.float16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
                made = self._wrapped[n] = (keys[n], bf16_tensor(n, a) if n in self._bf16_inputs else
                                           self._ov.Tensor(a, shared_memory=True))
            out[n] = made[1]
        for n, a in arrays.items():
            out[n] = bf16_tensor(n, a) if n in self._bf16_inputs else self._ov.Tensor(a, shared_memory=True)
            shared = a.dtype == np.float16 if n in self._bf16_inputs else True  # bf16_tensor copies other dtypes
            keys[n] = (a.ctypes.data, a.shape, a.dtype.str) if shared else None
        for n, t in self._phase.items():  # a one-file engine's phase inputs: made once, kept by the engine
            out[n], keys[n] = t, ("phase", id(t))
        return out, keys

    def _set(self, request: Any, tensors: dict[str, Any], keys: dict[str, Any]) -> None:
        """Set the inputs on `request`, skipping any whose memory it already holds (the cache buffers, from the
        second step on). Setting a tensor on an input of dynamic shape makes OpenVINO redo work for it: setting the
        demo model's 24 cache buffers on every step cost 0.4 ms of a 1.4 ms step (2 threads, AMX Xeon). The request
        keeps each tensor, and so its memory, alive until replaced, so an equal key is the same memory."""
        held = self._held.setdefault(id(request), {})
        for n, t in tensors.items():
            if keys[n] is None or held.get(n) != keys[n]:
                request.set_tensor(n, t)
                held[n] = keys[n]

    def run(self, feeds: dict[str, Any], shared: bool = False) -> dict[str, np.ndarray]:
        """Named inputs -> every output by name, as numpy. Inputs are read in place.

        By default the outputs are copies that outlive any later run. `shared=True` (the generation loop) hands
        back views of OpenVINO's own output buffers instead, with no copy: shared runs take two infer requests in
        turn, so a shared run's outputs stay valid until the second shared run after it. Copying every cache
        output measured 1.6-3.1 ms of a 12-16 ms bf16 decode step (format 3 engines, which returned whole caches;
        `llava15-geometry`, 631 cached tokens, 2 threads). A request holds the last inputs set on it until the
        next run sets others."""
        request = self.request
        if shared:
            if not self._chain:
                self._chain = [self.compiled.create_infer_request() for _ in range(2)]
            request, self._turn = self._chain[self._turn], self._turn ^ 1
        tensors, keys = self._tensors(feeds)
        self._set(request, tensors, keys)
        self._infer(request)
        outs = [request.get_output_tensor(i).data for i in range(len(self.output_names))]
        return {name: a if shared else np.array(a) for name, a in zip(self.output_names, outs, strict=True)}

    def time_ms(self) -> float:
        """One run of the bound inputs, its outputs left in OpenVINO's buffers (as in the generation loop)."""
        t0 = time.perf_counter()
        self._infer(self.request)
        return (time.perf_counter() - t0) * 1e3

    def _infer(self, request: Any) -> None:
        """One run of the inputs set on `request`, its outputs left in its buffers. Started and waited for rather
        than `request.infer()`, which also builds a dict of every output: 26 of them cost the demo model's decode
        step about 0.06 ms (BENCHMARKS.md, "The generation loop's host work")."""
        request.start_async()
        request.wait()
        if not self._ran:
            self._ran = True
            first_run_done(self)

    def __call__(self, input_ids: np.ndarray, pixel_values: np.ndarray, check: bool = True) -> np.ndarray:
        if check:
            check_prompt(input_ids, self.metadata["image_token_id"], self.metadata["n_image"])
        return np.array(self.run(prefill_feeds(self.metadata, input_ids, pixel_values), shared=True)["logits"])

    def execution_precisions(self) -> dict[str, str]:
        """Layer name -> the precision OpenVINO runs it in (from the compiled model's runtime graph)."""
        out = {}
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "runtimePrecision" in info:
                out[op.get_friendly_name()] = str(info["runtimePrecision"].astype(str))
        return out
