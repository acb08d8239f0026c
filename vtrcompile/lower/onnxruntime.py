"""ONNX file -> ONNX Runtime (CPU) engine with host-side input checks and per-node profiling."""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..engine.host_inputs import prefill_feeds
from ..engine.kv_cache import float_input_dtypes
from ..engine.metadata import PHASE_INPUT, is_one_file, one_file_phases
from ..engine.protocol import NUMPY_DTYPES, check_prompt, feed_arrays
from ..errors import VtrError
from ..memory import check_engine_fits, release_freed_heap
from .onnx import external_data_problem, initializer_bytes, metadata_of

__all__ = ["OrtEngine", "check_prompt", "reduction_share", "selector_node_names"]

log = logging.getLogger(__name__)


def selector_node_names(model: onnx.ModelProto) -> dict[str, str]:
    """ONNX node name -> 'selector' | 'gather' for nodes inserted by a reduction (from name scopes)."""
    out = {}
    for n in _nodes(model.graph):
        for p in n.metadata_props:
            value = p.value if isinstance(p.value, str) else p.value.decode("utf-8", "replace")
            if p.key == "pkg.torch.onnx.name_scopes" and "vtrcompile." in value:
                try:
                    scopes = [s for s in json.loads(value.replace("'", '"')) if s.startswith("vtrcompile.")]
                except (ValueError, TypeError, AttributeError):  # a damaged annotation: the node is not counted
                    continue
                if scopes:
                    out[n.name] = scopes[-1].rsplit(".", 1)[-1]
    return out


def _nodes(graph: onnx.GraphProto):
    """Every node of a graph and of its subgraphs (a one-file engine's phases are the branches of an If)."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(a.g)


_ONNX_TYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
               torch.bfloat16: onnx.TensorProto.BFLOAT16}


_EMPTY_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
                "bfloat16": onnx.TensorProto.BFLOAT16, "int64": onnx.TensorProto.INT64, "int32": onnx.TensorProto.INT32,
                "bool": onnx.TensorProto.BOOL}


def phase_feeds(prefill: bool, others: list[dict[str, Any]]) -> dict[str, ort.OrtValue]:
    """What a run of one phase of a one-file engine (lower/onnx_phases.py) adds to its feeds: the `prefill` flag,
    and an empty tensor for each input only the other phase reads (`others`, engine/metadata.one_file_phases)."""
    feeds = {PHASE_INPUT: ort.OrtValue.ortvalue_from_numpy(np.array(prefill))}
    for t in others:
        feeds[t["name"]] = ort.OrtValue.ortvalue_from_shape_and_type([0] * len(t["shape"]), _EMPTY_TYPES[t["dtype"]])
    return feeds


def fixed_outputs(io: dict[str, Any], names: list[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]] | None:
    """Output name -> (shape, numpy dtype) when the engine's `io` declares every output of `names` with a fixed
    shape in a dtype numpy holds (a decode engine: one token a step), else None (a prefill's outputs follow the
    prompt's length)."""
    spec = {t["name"]: t for t in io["outputs"]}
    out = {}
    for name in names:
        t = spec.get(name)
        if t is None or t["dtype"] not in NUMPY_DTYPES or not all(isinstance(d, int) for d in t["shape"]):
            return None
        out[name] = (tuple(t["shape"]), np.dtype(NUMPY_DTYPES[t["dtype"]]))
    return out


@dataclass
class _SharedBinding:
    """A binding that shared runs reuse (OrtEngine._binding): what each input is bound to, the torch tensors bound
    by address (kept alive while bound), and, for fixed output shapes, the numpy buffers its outputs are bound to."""
    io: Any
    outputs: dict[str, np.ndarray] | None
    keys: dict[str, Any] = field(default_factory=dict)
    refs: dict[str, Any] = field(default_factory=dict)


def _reason(e: Exception) -> str:
    """ONNX Runtime's message, its first line (for a one-line error)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _bindable_tensor(v: Any, declared: torch.dtype | None) -> bool:
    """A contiguous CPU torch tensor in the dtype the engine declares for its input (bound by its address)."""
    return (isinstance(v, torch.Tensor) and v.dtype == declared and v.dtype in _ONNX_TYPES
            and v.device.type == "cpu" and v.is_contiguous())


def _thread_options(so: ort.SessionOptions, threads: int) -> None:
    """`threads` intra-op threads whose workers stop spinning when a run ends.

    By default an ONNX Runtime session's idle workers spin for a while after each run, so an engine pair
    (prefill then decode, or two engines timed in turn) runs while the other session's workers still hold
    the cores. Measured on 2 cores, demo model: the FastV prefill took 15.3 ms right after the unmodified
    one instead of 7.1 ms, and 32 generated tokens 74.5 ms instead of 32.4 ms. Workers still spin inside a
    run, between its ops (turning spinning off altogether measured 20-30% slower prefills and decode
    steps); a process-wide pool would do as well but forces one thread count on every session."""
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.force_spinning_stop", "1")


class OrtEngine:
    backend = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None, profile_dir: str | None = None) -> None:
        self.path = Path(path)
        self.metadata, weights = read_engine(self.path)
        if not self.metadata.get("has_weights", True):
            raise VtrError(f"{self.path}: built from a meta-device model, it holds no weights and cannot run")
        check_engine_fits(self.path, weights, self.metadata)
        so = ort.SessionOptions()
        _thread_options(so, threads or os.cpu_count() or 1)
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 4  # errors reach the user as one line of ours (_run_failed), not ORT log lines
        if profile_dir is not None:
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(profile_dir) / "ort")
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # a damaged graph that still parses: ORT's own reason, first line
            raise VtrError(f"{self.path}: ONNX Runtime cannot load this engine ({_reason(e)}); rebuild it with "
                           "`vtrcompile optimize`") from None
        release_freed_heap()

        self.output_names = [o.name for o in self.session.get_outputs()]
        self._bf16_outputs = {o.name for o in self.session.get_outputs() if o.type == "tensor(bfloat16)"}
        self._declared = float_input_dtypes(self.metadata["io"])
        self._shared: list[_SharedBinding] = []  # the bindings shared runs take in turn (made on first use)
        self._turn = 0
        self._fixed = fixed_outputs(self.metadata["io"], self.output_names)
        # a one-file engine: the extra feeds of its prefill phase (every run of this runner) and of its decode phase
        self._phase, self._decode_phase = self._one_file_feeds() if is_one_file(self.metadata) else ({}, {})

    def _one_file_feeds(self) -> tuple[dict[str, ort.OrtValue], dict[str, ort.OrtValue]]:
        """The prefill and decode phases' extra feeds of a one-file engine (checked: damage is one line)."""
        prefill, decode = one_file_phases(self.metadata, {i.name for i in self.session.get_inputs()}, self.path)
        return phase_feeds(True, prefill), phase_feeds(False, decode)

    def decode_view(self) -> OrtEngine:
        """The decode phase of a one-file engine: the same session, so the same weights, with its own metadata
        (the decode engine's) and bindings."""
        view = copy.copy(self)
        view.metadata = self.metadata["decode"]["metadata"]
        view._declared = float_input_dtypes(view.metadata["io"])
        view._phase = self._decode_phase
        view._shared, view._turn = [], 0
        view._fixed = fixed_outputs(view.metadata["io"], view.output_names)
        return view

    def _split(self, feeds: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
        """Feeds -> (OrtValues handed back from an earlier run, contiguous CPU torch tensors of the declared dtype,
        bound by address: the generation loop's cache buffers, checked numpy arrays for the rest)."""
        values = {k: v for k, v in feeds.items() if isinstance(v, ort.OrtValue)}
        tensors = {k: v for k, v in feeds.items() if _bindable_tensor(v, self._declared.get(k))}
        arrays = feed_arrays(self.metadata["io"], {k: v for k, v in feeds.items() if k not in values and
                                                   k not in tensors}, passed=set(values) | set(tensors))
        return values, tensors, arrays

    def _binding(self, feeds: dict[str, Any], reuse: bool = False) -> tuple[Any, dict[str, np.ndarray] | None]:
        """An IOBinding of the feeds, and the numpy buffers its outputs are bound to (None: every output is left to
        ONNX Runtime to allocate, anew each run). No copy of a KV cache through numpy, any dtype.

        `reuse` (shared runs, the generation loop) keeps bindings across runs and rebinds a torch tensor only when
        its memory changed, so the cache buffers are bound once per generation: rebuilding the binding and its 24
        cache inputs every step cost 0.12 ms of a 1.05 ms decode step of the demo model (2 threads, AMX Xeon).
        Where every output has a fixed shape (a decode step), each binding also holds its own output buffers,
        bound once, and shared runs take two such bindings in turn, so a shared run's outputs stay valid until
        the second shared run after it (as OpenVINO's shared runs do): binding 26 outputs and wrapping them every
        step cost about 0.1 ms of the demo model's 0.6 ms step in `generate` (BENCHMARKS.md)."""
        values, tensors, arrays = self._split(feeds)
        if reuse:
            if not self._shared:
                self._shared = [self._new_binding(own_outputs=True) for _ in range(2 if self._fixed else 1)]
            shared = self._shared[self._turn]
            self._turn = (self._turn + 1) % len(self._shared)
        else:
            shared = self._new_binding(own_outputs=False)
        io, keys = shared.io, shared.keys
        if shared.outputs is None:  # left to ONNX Runtime: unallocated again each run (a reused one is overwritten)
            for name in self.output_names:
                io.bind_output(name)
        for name, a in arrays.items():
            io.bind_cpu_input(name, a)
            keys.pop(name, None)
        for name, v in values.items():
            io.bind_ortvalue_input(name, v)
            keys.pop(name, None)
        for name, t in tensors.items():
            key = (t.data_ptr(), tuple(t.shape), t.dtype)
            if keys.get(name) != key:
                io.bind_input(name, "cpu", 0, _ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())
                keys[name] = key
        if reuse:
            shared.refs = tensors  # the buffers bound by address stay alive while bound
        return io, shared.outputs

    def _new_binding(self, own_outputs: bool) -> _SharedBinding:
        """A binding with this phase's constant feeds bound (a one-file engine's flag and empty inputs) and, with
        `own_outputs` where the outputs' shapes are fixed, its outputs bound to numpy buffers of its own (`outputs`
        None otherwise: _binding leaves them to ONNX Runtime)."""
        io = self.session.io_binding()
        for name, v in self._phase.items():
            io.bind_ortvalue_input(name, v)
        outputs = None
        if own_outputs and self._fixed is not None:
            outputs = {name: np.empty(shape, dtype) for name, (shape, dtype) in self._fixed.items()}
            for name, a in outputs.items():
                io.bind_output(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        return _SharedBinding(io, outputs)

    def run(self, feeds: dict[str, Any], shared: bool = False) -> dict[str, Any]:
        """Named inputs (as the metadata's `io` lists them) -> every output by name: numpy arrays, except
        tensors numpy cannot hold (bfloat16), which stay OrtValues. By default every run gets new outputs, which
        no later run changes. `shared=True` (the generation loop) reuses bindings across runs (see _binding): a
        shared decode step's outputs are valid until the second shared run after it."""
        io, outputs = self._binding(feeds, reuse=shared)
        if outputs is None:
            self._run_bound(io)
        else:
            try:
                self.session.run_with_iobinding(io)
            except Exception as e:  # the buffers' shapes come from the metadata, which a damaged file may misstate
                raise VtrError(f"{self.path}: ONNX Runtime refused a decode step into the output shapes its metadata "
                               f"declares ({_reason(e)}); rebuild it with `vtrcompile optimize`") from None
            return dict(outputs)
        return {name: v if name in self._bf16_outputs else v.numpy()
                for name, v in zip(self.output_names, io.get_outputs(), strict=True)}

    def __call__(self, input_ids: np.ndarray, pixel_values: np.ndarray, check: bool = True) -> np.ndarray:
        """Prefill only: next-token logits [B, vocab]."""
        if check:
            check_prompt(input_ids, self.metadata["image_token_id"], self.metadata["n_image"])
        feeds = prefill_feeds(self.metadata, input_ids.astype(np.int64), pixel_values.astype(np.float32))
        if self._phase:  # a one-file engine: the flag and the decode inputs go through a binding
            return self.run(feeds)["logits"]
        try:
            return self.session.run(["logits"], feeds)[0]
        except Exception as e:
            raise self._run_failed(e) from None

    def bind(self, feeds: dict[str, Any]) -> None:
        self._io = self._binding(feeds)[0]

    def time_ms(self) -> float:
        """One run of the bound inputs (every output produced, the KV cache included), wall clock."""
        t0 = time.perf_counter()
        self._run_bound(self._io)
        return (time.perf_counter() - t0) * 1e3

    def _run_bound(self, io: Any) -> None:
        try:
            self.session.run_with_iobinding(io)
        except Exception as e:
            raise self._run_failed(e) from None

    def _run_failed(self, e: Exception) -> VtrError:
        """A run ONNX Runtime failed after the inputs passed vtrcompile's checks: a graph that loads but cannot run
        (a damaged attribute, say a convolution's kernel shape that no longer fits its weight; found by fuzzing)."""
        return VtrError(f"{self.path}: ONNX Runtime failed running this engine ({_reason(e)}); if the file was "
                        "changed or damaged, rebuild it with `vtrcompile optimize`")


def engine_metadata(path: Path) -> dict:
    """The vtrcompile metadata of an ONNX engine, checked before any session is made."""
    return read_engine(path)[0]


def read_engine(path: Path) -> tuple[dict, int]:
    """engine_metadata, and the bytes of the engine's weights."""
    if not path.is_file():
        raise VtrError(f"engine not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
        meta = metadata_of(model)
    except Exception as e:
        raise VtrError(f"{path}: not a readable ONNX file ({type(e).__name__}); rebuild it with "
                       "`vtrcompile optimize`") from None
    if not meta:
        raise VtrError(f"{path}: no vtrcompile metadata; build engines with `vtrcompile optimize`")
    problem = external_data_problem(model, path.parent)
    if problem:
        raise VtrError(f"{path}: {problem}; copy the engine together with its .data file, or rebuild it")
    return meta, initializer_bytes(model)


def reduction_share(path: str | Path, input_ids: np.ndarray, pixel_values: np.ndarray,
                    warmup: int, reps: int, threads: int | None = None) -> dict[str, float]:
    """Median fraction of each run spent in the inserted selector / gather nodes (ORT node profiling)."""
    names = selector_node_names(onnx.load(str(path), load_external_data=False))
    if not names:
        return {"selector": 0.0, "gather": 0.0}
    with tempfile.TemporaryDirectory() as d:
        eng = OrtEngine(path, threads, profile_dir=d)
        for _ in range(warmup + reps):
            eng(input_ids, pixel_values, check=False)
        # ORT writes node names as the file holds them; one that is not UTF-8 must not sink the profile
        events = json.loads(Path(eng.session.end_profiling()).read_bytes().decode("utf-8", errors="replace"))
    runs = [e for e in events if e.get("name") == "model_run"][warmup:]
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    shares: dict[str, list[float]] = {"selector": [], "gather": []}
    for r in runs:
        lo, hi = r["ts"], r["ts"] + r["dur"]
        acc = {"selector": 0.0, "gather": 0.0}
        for k in kernels:
            if lo <= k["ts"] <= hi:
                kind = names.get(k["name"][: -len("_kernel_time")])
                if kind in acc:
                    acc[kind] += k["dur"]
        for kind in acc:
            shares[kind].append(acc[kind] / max(r["dur"], 1))
    return {kind: float(np.median(v)) if v else 0.0 for kind, v in shares.items()}
