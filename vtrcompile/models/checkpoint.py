"""Hugging Face safetensors checkpoints, one tensor at a time.

A compiler does not need the memory of the model it compiles: the model's structure is built with empty
parameters (allocated, never written, so they take no resident memory), captured and rewritten like any model,
and every weight goes from its safetensors file to the engine when the engine is written, read with plain file
reads (no memory map, so nothing stays resident) and cast on the way when `--dtype` asks for another precision.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import VtrError

log = logging.getLogger(__name__)

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in a safetensors file."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(file: Path) -> dict[str, Entry]:
    """The tensors of one safetensors file (its JSON header only)."""
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
            length = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, struct.error) as e:
        raise VtrError(f"{file}: not a readable safetensors file ({e}); re-save the checkpoint") from None
    if not isinstance(header, dict):
        raise VtrError(f"{file}: not a readable safetensors file (its header is not a JSON object); re-save the "
                       "checkpoint")
    return {key: _entry(file, key, d, 8 + size, length) for key, d in header.items() if key != "__metadata__"}


def _entry(file: Path, key: str, d: Any, base: int, length: int) -> Entry:
    """One header entry, checked: a known dtype, a shape of non-negative ints, offsets that span exactly the shape's
    bytes and lie inside the file (a damaged header otherwise fails later, far from its cause)."""
    dtype = d.get("dtype") if isinstance(d, dict) else None
    if dtype not in _ST_DTYPES:
        raise VtrError(f"{file}: tensor {key!r} has dtype {dtype!r}, which vtrcompile does not read")
    shape, offsets = d.get("shape"), d.get("data_offsets")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]
            and offsets[1] - offsets[0] == math.prod(shape) * _ST_DTYPES[dtype].itemsize):
        raise VtrError(f"{file}: tensor {key!r} has a damaged header entry (its shape, dtype and data_offsets do "
                       "not agree); re-save the checkpoint")
    if base + offsets[1] > length:
        raise VtrError(f"{file}: truncated (tensor {key!r} ends at byte {base + offsets[1]} of {length}); re-save "
                       "the checkpoint")
    return Entry(file, key, _ST_DTYPES[dtype], tuple(shape), base + offsets[0], base + offsets[1])


def read_index(folder: Path) -> dict[str, Entry]:
    """Every tensor of every *.safetensors file in a checkpoint folder, by checkpoint key."""
    files = sorted(Path(folder).glob("*.safetensors"))
    out: dict[str, Entry] = {}
    for f in files:
        out.update(read_header(f))
    return out


def read_tensor(e: Entry) -> torch.Tensor:
    """One tensor, read with a plain positioned read (no memory map: nothing stays resident afterwards)."""
    buf = bytearray(e.end - e.start)
    fd = os.open(e.file, os.O_RDONLY)
    try:
        view, done = memoryview(buf), 0
        while done < len(buf):
            n = os.preadv(fd, [view[done:]], e.start + done)
            if n <= 0:
                raise VtrError(f"{e.file}: truncated (tensor {e.key}); re-save the checkpoint")
            done += n
        with contextlib.suppress(AttributeError, OSError):
            os.posix_fadvise(fd, e.start, e.end - e.start, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if not buf:
        return torch.empty(e.shape, dtype=e.dtype)
    return torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While a model is constructed, every parameter goes to the meta device as it is registered (so its
    initialisation costs nothing); buffers are built for real (rotary tables, position ids)."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(model_class, config, dtype: torch.dtype) -> nn.Module:
    """The model with real buffers and empty CPU parameters of `dtype` (allocated, never written: no resident
    memory until something reads them, and nothing does; tied parameters stay one tensor)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _parameters_on_meta():
            model = model_class(config)
    finally:
        torch.set_default_dtype(old)
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.device.type == "meta":
                if id(p) not in made:  # in `dtype` even where a sub-config names its own (as from_pretrained does)
                    dt = dtype if p.is_floating_point() else p.dtype
                    made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dt), requires_grad=False)
                module._parameters[name] = made[id(p)]
    return model.eval()


def _renamer(model: nn.Module):
    """Checkpoint key -> the model's parameter name, as transformers renames them when it loads (a checkpoint
    saved in the legacy layout, 'language_model.model.layers...', is read as the model names it)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    if any(not isinstance(t, WeightRenaming) for t in transforms):
        raise VtrError(f"{type(model).__name__}: its checkpoints need weight conversions beyond renaming, which "
                       "vtrcompile cannot stream")
    meta_sd = dict.fromkeys(model.state_dict())

    def rename(key: str) -> str:
        return rename_source_key(key, transforms, [], model.base_model_prefix, meta_sd)[0]
    return rename


class CheckpointWeights:
    """The weights of a model built by `empty_model`, read from its checkpoint folder on demand."""

    def __init__(self, folder: Path, model: nn.Module, dtype: torch.dtype) -> None:
        self.folder, self.dtype = Path(folder), dtype
        index = read_index(folder)
        if not index:
            raise VtrError(f"{folder}: no *.safetensors files; vtrcompile reads safetensors checkpoints (re-save "
                           "with save_pretrained)")
        rename = _renamer(model)
        by_name = {rename(k): e for k, e in index.items()}
        self.entries: dict[str, Entry] = {}
        self.by_ptr: dict[int, str] = {}
        groups: dict[int, list[str]] = {}
        params: dict[int, nn.Parameter] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
            params[id(p)] = p
        missing = []
        for pid, names in groups.items():
            found = next((n for n in names if n in by_name), None)
            if found is None:
                missing.append(names[0])
                continue
            e, p = by_name[found], params[pid]
            if tuple(e.shape) != tuple(p.shape):
                raise VtrError(f"{e.file}: {e.key} has shape {list(e.shape)}, the model's {found} is "
                               f"{list(p.shape)}; the config does not match the weights")
            self.entries[names[0]] = e
            self.by_ptr[p.data_ptr()] = names[0]
        if missing:
            raise VtrError(f"{folder}: {len(missing)} weight(s) of the model are not in the checkpoint (first: "
                           f"{missing[0]}); re-save it with save_pretrained")
        self.nbytes = self.bytes_in(dtype)
        # the widest single tensor, in elements: what a read, a cast and a transpose hold at once
        self.largest = max((math.prod(e.shape) for e in self.entries.values()), default=0)

    def bytes_in(self, dtype: torch.dtype) -> int:
        """The weights' size with floating-point tensors in `dtype` (integer tensors keep theirs)."""
        return sum(math.prod(e.shape) * (dtype if e.dtype.is_floating_point else e.dtype).itemsize
                   for e in self.entries.values())

    def name_of(self, t: torch.Tensor) -> str | None:
        """The parameter an (empty) tensor of the model stands for, or None."""
        if t.device.type != "cpu" or t.numel() == 0:
            return None
        return self.by_ptr.get(t.data_ptr())

    def read(self, name: str) -> torch.Tensor:
        t = read_tensor(self.entries[name])
        return t.to(self.dtype) if t.dtype.is_floating_point and t.dtype != self.dtype else t


def config_dtype(config) -> torch.dtype | None:
    """The dtype a checkpoint's config names (`dtype`, or the older `torch_dtype`), if any."""
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else None
