"""The KV cache of one generation on the host: per layer a key and a value buffer of fixed capacity, filled in place.

A decode engine reads every layer's buffer [B, kv, C_l, d] and its filled rows `past_lengths[l]`, and returns only the
new token's keys and values [B, kv, 1, d] (models/decoder.py); `append` writes them at row past_lengths[l]. The
capacity is the layer's prefill cache plus the rows the generation will append, so every step has the same shapes
and nothing is copied but the new rows.

Buffers are torch tensors (torch holds bfloat16, numpy does not) on the device of the engine's outputs; each runner
binds them where they are, without a copy (OrtEngine, OvEngine, AotiEngine, TrtEngine). Runner outputs arrive as
numpy arrays, ONNX Runtime OrtValues (bfloat16) or torch tensors; OpenVINO hands bfloat16 out as float16 arrays of
the raw bits, which `as_tensor` reads back as bfloat16 by the dtype the engine declares.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch

from .io import past_names, present_names

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def float_input_dtypes(io: dict[str, Any]) -> dict[str, torch.dtype]:
    """Input name -> the torch dtype of each floating-point input an engine declares: a torch tensor in that dtype
    (a cache buffer) is what the runners bind in place."""
    return {t["name"]: TORCH_DTYPES[t["dtype"]] for t in io["inputs"] if t["dtype"] in TORCH_DTYPES}


def as_tensor(x: Any, dtype: str) -> torch.Tensor:
    """A runner's output as a torch tensor of the declared `dtype`, sharing its memory where it can."""
    want = TORCH_DTYPES[dtype]
    if isinstance(x, torch.Tensor):
        return x if x.dtype == want else x.to(want)
    if isinstance(x, np.ndarray):
        if want == torch.bfloat16 and x.dtype == np.float16:  # OpenVINO's raw bf16 bits
            return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t if t.dtype == want else t.to(want)
    # an ONNX Runtime OrtValue numpy cannot hold (bfloat16): copied out through its data pointer
    shape = tuple(x.shape())
    t = torch.empty(shape, dtype=want)
    if t.numel():
        ctypes.memmove(t.data_ptr(), x.data_ptr(), t.numel() * t.element_size())
    return t


class KvCache:
    """Every layer's key/value buffers for one generation, and how many rows of each are filled."""

    def __init__(self, prefill_out: dict[str, Any], n_layers: int, dtype: str, extra_rows: int,
                 round_to: int = 1, limit: int | None = None, reuse: KvCache | None = None) -> None:
        """Buffers of at least each layer's prefill cache length + `extra_rows` rows (rounded up to a multiple of
        `round_to`, at most `limit`), their first rows the prefill's present.*. New buffers are zeroed (a masked
        row must hold finite values: 0 x NaN would poison the weighted sum); with `reuse`, a previous generation's
        buffers of the same shapes are taken instead, their stale rows left as they are (finite, masked)."""
        self.n = n_layers
        self.names = past_names(n_layers)
        self.buffers: list[torch.Tensor] = []
        self.lengths: list[int] = []
        self.reused = 0  # buffers taken from `reuse`
        old: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for b in reuse.buffers if reuse is not None and reuse.dtype == dtype else []:
            old.setdefault(tuple(b.shape), []).append(b)
        for name in present_names(n_layers):
            t = as_tensor(prefill_out[name], dtype)
            b, kv, s, d = t.shape
            cap = -(-(s + extra_rows) // round_to) * round_to
            cap = max(s + extra_rows, min(cap, limit)) if limit is not None else cap
            same = old.get((b, kv, cap, d))
            buf = same.pop(0) if same else None
            if buf is not None and buf.device == t.device:
                self.reused += 1
            else:
                buf = torch.empty((b, kv, cap, d), dtype=t.dtype, device=t.device)
                buf[:, :, s:].zero_()
            buf[:, :, :s].copy_(t)
            self.buffers.append(buf)
            if name.endswith(".key"):
                self.lengths.append(s)
        self.dtype = dtype
        self._present = present_names(n_layers)
        # numpy views of CPU buffers; bfloat16 ones as float16 arrays of the raw bits, as OpenVINO hands bf16 out
        on_cpu = all(b.device.type == "cpu" for b in self.buffers)
        self._views = [(b.view(torch.float16) if b.dtype == torch.bfloat16 else b).numpy() for b in self.buffers] \
            if on_cpu else None

    @property
    def capacity(self) -> list[int]:
        return [int(self.buffers[2 * i].shape[2]) for i in range(self.n)]

    def feeds(self) -> dict[str, Any]:
        """The decode engine's cache inputs: the buffers and past_lengths [L] int64."""
        return {**dict(zip(self.names, self.buffers, strict=True)),
                "past_lengths": np.asarray(self.lengths, dtype=np.int64)}

    def append(self, step_out: dict[str, Any]) -> None:
        """Write a decode step's new keys and values (present.* [B, kv, 1, d]) at each layer's next row. Rows that
        arrive as numpy arrays of the buffers' numpy dtype (bfloat16: float16 bits) are written through numpy views
        of the buffers (0.04 against 0.15 ms a step for the demo model's 24 rows)."""
        if any(length >= cap for length, cap in zip(self.lengths, self.capacity, strict=True)):
            raise ValueError(f"KV cache full: {self.lengths} rows filled of {self.capacity}")
        for j, name in enumerate(self._present):
            row, new = self.lengths[j // 2], step_out[name]
            if self._views is not None and isinstance(new, np.ndarray) and new.dtype == self._views[j].dtype:
                self._views[j][:, :, row] = new[:, :, 0]
            else:
                self.buffers[j][:, :, row:row + 1].copy_(as_tensor(new, self.dtype))
        self.lengths = [x + 1 for x in self.lengths]
