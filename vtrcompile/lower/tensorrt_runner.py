"""A `.plan` file -> a callable engine on the GPU: named I/O tensors, execute_async_v3, CUDA-event timing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..engine.host_inputs import prefill_feeds
from ..engine.io import present_names
from ..engine.protocol import check_prompt, feed_arrays
from ..errors import VtrError
from .tensorrt import check_cuda, import_tensorrt, read_sidecar


class TrtEngine:
    """Runs a vtrcompile TensorRT engine. Buffers are torch CUDA tensors; their addresses go to the context."""

    backend = "tensorrt"

    def __init__(self, path: str | Path) -> None:
        import torch

        self.path = Path(path)
        if not self.path.is_file():
            raise VtrError(f"engine not found: {self.path}")
        self.sidecar = read_sidecar(self.path)
        self.metadata: dict[str, Any] = self.sidecar["vtrcompile_metadata"]
        try:
            import_tensorrt()
            check_cuda()
        except VtrError as e:  # name the engine the user asked for: it may be one of several in a command
            raise VtrError(f"{self.path}: {e}") from None
        import tensorrt as trt  # typed by tensorrt-stubs in CI (mypy)

        self._torch = torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise VtrError(f"{self.path}: TensorRT could not deserialize it (built by another TensorRT "
                           f"version or GPU? sidecar says {self.sidecar['versions'].get('tensorrt')} on "
                           f"{self.sidecar['gpu'].get('name')}); rebuild it with `vtrcompile optimize`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: _torch_dtype(torch, trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream()
        self._device = "cuda"
        self._bound: dict[str, Any] = {}

    @property
    def max_cache_rows(self) -> int | None:
        """A decode engine's largest cache buffer (its optimization profile's max), None for a prefill engine."""
        profile = {t["name"]: t.get("profile") for t in self.sidecar.get("inputs", [])}.get("past_key_values.0.key")
        return int(profile["max"][2]) if profile else None

    def bind(self, named: dict[str, Any]) -> None:
        """Copy host inputs to the GPU once, set shapes and addresses; `run()` then only launches. An input that
        is already a tensor on the engine's device in its dtype (a shared run's cache output) is bound where it
        is, uncopied."""
        torch = self._torch
        resident = {k for k, v in named.items() if isinstance(v, torch.Tensor) and v.device.type == self._device
                    and v.dtype == self._dtypes.get(k)}
        feeds = feed_arrays(self.metadata["io"], {k: v for k, v in named.items() if k not in resident},
                            passed=resident)
        for name in self.inputs:
            t = named[name].contiguous() if name in resident else \
                torch.from_numpy(feeds[name]).to(self._device, self._dtypes[name])
            self._bound[name] = t
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        for name in self.outputs:
            dims = self.context.get_tensor_shape(name)
            shape = [int(dims[i]) for i in range(len(dims))]
            t = torch.empty(shape, dtype=self._dtypes[name], device=self._device)
            self._bound[name] = t
            self.context.set_tensor_address(name, t.data_ptr())

    def launch(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise VtrError(f"{self.path}: TensorRT execution failed")

    def run(self, feeds: dict[str, Any], shared: bool = False) -> dict[str, Any]:
        """Named inputs -> every output by name, as numpy (float32 for float outputs), copied to the host.
        `shared=True` (the generation loop) leaves the KV-cache outputs on the GPU as torch tensors, which the
        next step binds where they are: no cache crosses the bus between steps. Each run binds new output
        tensors, so a shared run's outputs stay valid as long as they are referenced."""
        self.bind(feeds)
        self.launch()
        self.stream.synchronize()
        kept = set(present_names(self.metadata["llm_layers"])) if shared else set()
        return {n: self._bound[n] if n in kept else _host(self._bound[n]) for n in self.outputs}

    def time_ms(self) -> float:
        """One launch timed with CUDA events on the engine's stream (GPU compute time)."""
        torch = self._torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        self.launch()
        end.record(self.stream)
        end.synchronize()
        return float(start.elapsed_time(end))

    def __call__(self, input_ids: np.ndarray, pixel_values: np.ndarray, check: bool = True) -> np.ndarray:
        if check:
            check_prompt(input_ids, self.metadata["image_token_id"], self.metadata["n_image"])
        self.bind(prefill_feeds(self.metadata, input_ids, pixel_values))
        self.launch()
        self.stream.synchronize()
        return _host(self._bound["logits"])


def _host(t: Any) -> np.ndarray:
    """A device tensor as a host numpy array (floats as float32)."""
    return (t.float() if t.is_floating_point() else t).cpu().numpy()


def _torch_dtype(torch: Any, trt: Any, dt: Any) -> Any:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
    if dt not in table:
        raise VtrError(f"engine I/O dtype {dt} is not supported by the vtrcompile runner")
    return table[dt]
