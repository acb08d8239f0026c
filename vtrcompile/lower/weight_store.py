"""Weights streamed from a checkpoint into one shared external-data file per model and dtype.

`weights-<model id>-<dtype>.data` beside the engines holds every weight once, appended one tensor at a time
(read from the checkpoint, cast, transposed where the graph wants it transposed, written, dropped); its index
`weights-<model id>-<dtype>.json` says where each one lies. Every engine of the model (reduced, baseline, the
decode engine) points its initializers at it, so a 13B model's weights are on disk once next to its engines,
never in memory. The file only grows; the index is replaced atomically after each tensor, so an interrupted
build leaves a valid store that the next build continues.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir
import torch

from ..errors import VtrError
from .atomic import write_atomically

log = logging.getLogger(__name__)

FORMAT = "vtrcompile-weights/1"
# Weights up to this many elements stay inline in the engine (the ONNX optimizer's constant-folding input limit).
INLINE_ELEMENTS = 8192


def store_name(model_id: str, dtype: str) -> str:
    return f"weights-{model_id}-{dtype}"


class WeightStore:
    def __init__(self, folder: Path, model_id: str, dtype: str) -> None:
        self.folder = Path(folder)
        self.data = self.folder / (store_name(model_id, dtype) + ".data")
        self.index_path = self.folder / (store_name(model_id, dtype) + ".json")
        existed = self.data.is_file()
        size = self.data.stat().st_size if existed else 0
        index = self._read_index(model_id, size) if existed else None
        # Data with a missing or damaged index (None) may hold the weights of engines already written (their
        # offsets point into it; an IR's .bin is a hard link to it): it is neither cut nor removed, and new tensors
        # go after it. Only an intact index says which bytes an interrupted append left behind.
        self.index: dict[str, list[int]] = index or {}
        if index is not None and size > (end := max((o + n for o, n in index.values()), default=0)):
            os.truncate(self.data, end)
        self.model_id, self.dtype = model_id, dtype
        self.new = not existed
        self.written = 0

    def _read_index(self, model_id: str, size: int) -> dict[str, list[int]] | None:
        """The index, or None where it is missing or damaged: not JSON, another format or model, or an entry that
        is not [offset, length] inside the data file."""
        try:
            rec = json.loads(self.index_path.read_text())
            if rec.get("format") != FORMAT or rec.get("model_id") != model_id:
                return None
            index = {k: list(v) for k, v in rec["tensors"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # ValueError: JSON and UTF-8 errors
            return None
        ok = all(len(v) == 2 and all(type(n) is int and n >= 0 for n in v) and v[0] + v[1] <= size
                 for v in index.values())
        return index if ok else None

    def tensor(self, key: str, make: Callable[[], torch.Tensor]) -> tuple[int, int]:
        """(offset, length) of the stored tensor `key`, made and appended the first time it is asked for."""
        if key not in self.index:
            t = make().contiguous()
            offset = self.data.stat().st_size if self.data.is_file() else 0
            with open(self.data, "ab") as f:
                if t.numel():
                    f.write(memoryview(t.view(torch.uint8).numpy()).cast("B"))
                f.flush()
                os.fsync(f.fileno())
            self.index[key] = [offset, t.numel() * t.element_size()]
            self._save_index()
            self.written += 1
            del t
        offset, length = self.index[key]
        return offset, length

    def discard_if_new(self) -> None:
        if self.new:
            self.data.unlink(missing_ok=True)
            self.index_path.unlink(missing_ok=True)

    def _save_index(self) -> None:
        rec = {"format": FORMAT, "model_id": self.model_id, "dtype": self.dtype, "tensors": self.index}
        write_atomically(self.index_path, lambda p: p.write_text(json.dumps(rec)))


def _torch_of(value: ir.Value) -> torch.Tensor | None:
    raw = getattr(value.const_value, "raw", None)
    return raw if isinstance(raw, torch.Tensor) else None


def attach_streamed_weights(model: ir.Model, weights, store: WeightStore) -> int:
    """Point every initializer that stands for a large checkpoint weight at the store (written there on first use).
    A Transpose of such a weight becomes a stored transposed copy (the optimizer would otherwise fold it in
    memory). Returns how many initializers now live in the store."""
    graph = model.graph
    stand_for = {}
    for name, value in graph.initializers.items():
        t = _torch_of(value)
        pname = weights.name_of(t) if t is not None else None
        if pname is not None:
            stand_for[name] = (pname, t)
    if not stand_for:
        return 0
    # Small weights are read now and stay inline: the optimizer folds what it folds for an in-memory model
    # (the same graph); it never folds large ones, except Transposes, handled below.
    from torch.onnx._internal.exporter._core import TorchTensor

    for name, (pname, t) in list(stand_for.items()):
        if t.numel() <= INLINE_ELEMENTS:
            graph.initializers[name].const_value = TorchTensor(weights.read(pname), name=name)
            del stand_for[name]
    count = 0

    def external(value_name: str, key: str, make, dtype: ir.DataType, shape) -> ir.ExternalTensor:
        offset, length = store.tensor(key, make)
        return ir.ExternalTensor(store.data.name, offset, length, dtype, shape=ir.Shape(shape), name=value_name,
                                 base_dir=str(store.folder))

    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        src = node.inputs[0]
        if src is None or src.name not in stand_for:
            continue
        perm_attr = node.attributes.get("perm")
        perm = list(perm_attr.value) if perm_attr is not None else None
        pname, t = stand_for[src.name]
        perm = perm if perm is not None else list(reversed(range(t.dim())))
        out = node.outputs[0]
        shape = [t.shape[i] for i in perm]

        def make(pname=pname, perm=perm):
            return weights.read(pname).permute(*perm).contiguous()

        new = ir.Value(name=out.name, shape=ir.Shape(shape), type=ir.TensorType(src.dtype),
                       const_value=external(out.name, f"{pname}|transpose{perm}", make, src.dtype, shape))
        out.replace_all_uses_with(new)
        graph.remove(node, safe=True)
        graph.register_initializer(new)
        count += 1
    for name, (pname, t) in stand_for.items():
        value = graph.initializers.get(name)
        if value is None:
            continue
        if not value.uses() and value not in graph.outputs:
            graph.initializers.pop(name)
            continue
        value.const_value = external(name, pname, lambda pname=pname: weights.read(pname), value.dtype, list(t.shape))
        count += 1
    return count


def check_no_empty_weights(model: ir.Model, weights) -> None:
    """After streaming, no initializer may still hold an empty (never written) parameter."""
    left = [n for n, v in model.graph.initializers.items() if (t := _torch_of(v)) is not None and weights.name_of(t)]
    if left:
        raise VtrError(f"internal: {len(left)} initializer(s) still hold unread weights (first: {left[0]})")
