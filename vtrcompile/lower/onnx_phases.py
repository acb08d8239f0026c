"""A prefill engine and its decode engine -> one ONNX file that holds every weight once (ONNX Runtime).

A process that generates opens both engines, and each ONNX Runtime session keeps its own copy of the LLM's
weights (BENCHMARKS.md, "Measured memory of a serving process"). Here the two graphs become the branches of one
`If` on a boolean input `prefill`, and every initializer the branches share (same dtype, shape and bytes) is
stored once in the outer graph, where both branches read it: one session, one copy. ONNX Runtime runs only the
branch the flag picks; the other branch's inputs are fed as empty tensors (`engine/metadata.one_file_phases`,
`lower/onnxruntime.phase_feeds`).

The outer graph's inputs are the union of both engines' inputs, every dim left free (the two phases give
`input_ids` different lengths); the engine metadata's `io` stays the prefill's, and the decode engine's metadata
travels inside it (`decode.metadata`), so each phase is checked against its own description.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from ..engine.metadata import PHASE_INPUT
from .atomic import write_atomically
from .onnx import METADATA_KEY, external_span, metadata_of, save_piecewise

log = logging.getLogger(__name__)


def _content_key(t: onnx.TensorProto, folders: Sequence[Path], spans: dict[tuple, str] | None = None) -> tuple:
    """What makes two initializers the same weight: dtype, shape and a hash of the bytes (read from the external
    file where the tensor lives in one, found in the first of `folders` that has it). `spans`: digests of the
    external spans already read; two engines that point at the same bytes of a weight store (every weight of a
    model streamed from a checkpoint) are read once."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        span = external_span(t)
        spans = {} if spans is None else spans
        if span not in spans:
            spans[span] = _span_digest(folders, *span)
        return t.data_type, tuple(t.dims), spans[span]
    if t.HasField("raw_data"):  # the usual form: hashed where it lies, not copied
        return t.data_type, tuple(t.dims), hashlib.sha256(t.raw_data).hexdigest()
    held = onnx.TensorProto()
    held.CopyFrom(t)
    held.name = ""
    return t.data_type, tuple(t.dims), hashlib.sha256(held.SerializeToString(deterministic=True)).hexdigest()


def _span_digest(folders: Sequence[Path], loc: str, offset: int, length: int) -> str:
    h = hashlib.sha256()
    path = next((f / loc for f in folders if (f / loc).is_file()), folders[-1] / loc)
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _branch(graph: onnx.GraphProto, prefix: str, shared: dict[tuple, str], outer, folders: Sequence[Path],
            spans: dict[tuple, str]) -> onnx.GraphProto:
    """`graph` as an If branch: its initializers copied into `outer` (the joined graph's own initializer field,
    one per distinct content, named w.N), its inputs read from the outer scope by name, every other value renamed
    under `prefix`."""
    names: dict[str, str] = {i.name: i.name for i in graph.input}
    names[""] = ""
    for t in graph.initializer:
        key = _content_key(t, folders, spans)
        if key not in shared:
            shared[key] = f"w.{len(shared)}"
            moved = outer.add()
            moved.CopyFrom(t)
            moved.name = shared[key]
        names[t.name] = shared[key]

    def rename(name: str) -> str:
        return names.get(name, prefix + name)

    def renamed(values) -> list[onnx.ValueInfoProto]:
        out = []
        for v in values:
            w = onnx.ValueInfoProto()
            w.CopyFrom(v)
            w.name = rename(v.name)
            out.append(w)
        return out

    nodes = []
    for n in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise ValueError(f"node {n.name} has a subgraph; one-file engines take flat graphs only")
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.ClearField("input")
        m.input.extend(rename(x) for x in n.input)
        m.ClearField("output")
        m.output.extend(rename(x) for x in n.output)
        m.name = prefix + n.name if n.name else ""
        nodes.append(m)
    return helper.make_graph(nodes, prefix.rstrip("/"), [], renamed(graph.output),
                             value_info=renamed(graph.value_info))


def _free_dims(v: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    w = onnx.ValueInfoProto()
    w.CopyFrom(v)
    for k, d in enumerate(w.type.tensor_type.shape.dim):
        d.Clear()
        d.dim_param = f"{v.name}.{k}"
    return w


def merge_phases(prefill: onnx.ModelProto, decode: onnx.ModelProto, folders: Sequence[Path], file_name: str
                 ) -> onnx.ModelProto:
    """One model: If(prefill) -> the prefill graph, else the decode graph; shared weights stored once. `folders`
    hold the models' external data (if any; a file is read from the first that has it); `file_name` is what the
    one-file engine will be called."""
    p_out, d_out = [o.name for o in prefill.graph.output], [o.name for o in decode.graph.output]
    if p_out != d_out:
        raise ValueError(f"the engines' outputs differ: {p_out[:4]}... against {d_out[:4]}...")
    if [(o.domain, o.version) for o in prefill.opset_import] != [(o.domain, o.version) for o in decode.opset_import]:
        raise ValueError("the engines were exported with different opsets")
    # built in place: each weight is copied once, into the joined model (helper.make_graph and make_model would
    # copy every one twice more: 4.5 GB peak for a 559 MB one file, BENCHMARKS.md, "The one-file join's memory")
    model = helper.make_model(helper.make_graph([], "prefill_and_decode", [], []),
                              opset_imports=list(prefill.opset_import), ir_version=prefill.ir_version)
    shared: dict[tuple, str] = {}
    spans: dict[tuple, str] = {}
    outer = model.graph.initializer
    then_g = _branch(prefill.graph, "prefill/", shared, outer, folders, spans)
    else_g = _branch(decode.graph, "decode/", shared, outer, folders, spans)
    inputs: dict[str, onnx.ValueInfoProto] = {}
    for v in [*prefill.graph.input, *decode.graph.input]:
        inputs.setdefault(v.name, _free_dims(v))
    flag = helper.make_tensor_value_info(PHASE_INPUT, onnx.TensorProto.BOOL, [])
    model.graph.node.append(helper.make_node("If", [PHASE_INPUT], p_out, name="phase", then_branch=then_g,
                                             else_branch=else_g))
    model.graph.input.extend([flag, *inputs.values()])
    model.graph.output.extend(_free_dims(o) for o in prefill.graph.output)
    p_meta, d_meta = metadata_of(prefill), metadata_of(decode)
    meta = {**p_meta, "decode": {**p_meta["decode"], "file": file_name, "metadata": d_meta}}
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta, sort_keys=True))
    n_in = len(prefill.graph.initializer) + len(decode.graph.initializer)
    log.info("one-file engine: %d initializers of the two engines stored as %d", n_in, len(outer))
    return model


def write_one_file(out: Path, decode_path: Path, write_prefill: Callable[[Path], Any]
                   ) -> tuple[list[Path], dict[str, Any]]:
    """Write the one-file engine `out` of a prefill engine and the decode engine at `decode_path`, in one atomic
    step: write_prefill(path) writes the prefill engine inside the temporary folder, where it is joined with the
    decode engine; only the joined file (and the prefill's own external data, if it has any) is renamed into
    place, so an interrupted build leaves no engine at `out` rather than a prefill engine alone. External data the
    engines point at beside `out` (the model's weight store, the decode engine's) stays where it is. Returns the
    files written and the engine's metadata."""
    meta: list[dict[str, Any]] = []

    def save(tmp: Path) -> None:
        staged = tmp.parent / "prefill" / out.name
        staged.parent.mkdir()
        write_prefill(staged)
        for side in staged.parent.iterdir():  # the prefill's external data goes wherever the joined file goes
            if side != staged:
                os.replace(side, tmp.parent / side.name)
        prefill = onnx.load(str(staged), load_external_data=False)
        shutil.rmtree(staged.parent)
        decode = onnx.load(str(decode_path), load_external_data=False)
        joined = merge_phases(prefill, decode, [tmp.parent, out.parent], out.name)
        del prefill, decode  # their weights are in `joined` now: not held while it is serialized
        meta.append(metadata_of(joined))
        save_piecewise(joined, tmp)

    files = write_atomically(out, save)
    return files, meta[0]
