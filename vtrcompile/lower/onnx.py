"""Rewritten program -> ONNX file via the dynamo exporter, I/O named as the engine metadata's `io` says."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch

from ..errors import VtrError
from .atomic import scratch_dir, write_atomically

log = logging.getLogger(__name__)

METADATA_KEY = "vtrcompile"
# Above this many parameter bytes, weights go to an external `<file>.data` (protobuf's 2 GB cap).
EXTERNAL_DATA_BYTES = 1_500_000_000
# The opset of engines for ONNX Runtime. From opset 23 the exporter writes each attention as one `Attention` node
# (and some rotary embeddings as `RotaryEmbedding`), which ONNX Runtime (>= 1.23) runs as one kernel. Measured
# against the exporter's default opset 20 in one process, taking turns (benchmarks/onnx_opset.py; BENCHMARKS.md,
# "ONNX opset 23"): prefills 4-15% faster on the demo model (the unmodified engine most), 7% on the unmodified
# llava15-geometry and the same for its FastV 64; the same greedy tokens, logits within 4.3e-6. OpenVINO reads
# these files but was no faster, and TensorRT's parser is not known to take these ops, so the ONNX files that
# those backends read keep the exporter's default.
ORT_OPSET = 23


def param_bytes(ep: torch.export.ExportedProgram) -> int:
    return sum(t.numel() * t.element_size() for t in ep.state_dict.values())


def export_onnx(ep: torch.export.ExportedProgram, out: Path, metadata: dict[str, Any], weights=None,
                store_folder: Path | None = None, opset: int | None = None, compress: str = "none") -> list[Path]:
    """Export, stamp vtrcompile metadata into the model, write atomically; returns the files written.
    `opset`: the ONNX opset (ORT_OPSET for ONNX Runtime engines); None takes the exporter's default. The metadata
    records the opset written (`onnx_opset`). `compress` "int8" or "int4": the linear layers' weights as
    MatMulNBits nodes of that width (lower/onnx_weights.py, ONNX Runtime only), recorded as `weights: int8` (or
    int4); streamed from a checkpoint, the float weights then pass through a scratch store and the compressed ones go
    to the model's store for that width (`weights-<id>-<dtype>-int8.data` or `-int4.data`, shared by its engines of
    that width); from a model in memory the engine holds them (inline, or in `<name>.data` when large).

    `weights` (models/checkpoint.CheckpointWeights): the program's parameters are empty stand-ins; each weight
    is streamed from the checkpoint into the model's shared weight store beside `out` (lower/weight_store.py)
    before the graph is optimised, so constant folding never holds a weight in memory. `store_folder`: where that
    store is, when the engine is written somewhere else first (a one-file engine's prefill, joined in a temporary
    folder); the engine must end up beside it."""
    stream = weights is not None and any(weights.name_of(t) for t in ep.state_dict.values())
    if stream and compress != "none":  # the float weights are read once, from a scratch store, to be compressed
        with scratch_dir(Path(out).parent, f".{Path(out).name[:64]}.store.") as folder:
            return _export_onnx(ep, out, metadata, weights, folder, opset, compress, stream,
                                store_folder or Path(out).parent)
    return _export_onnx(ep, out, metadata, weights, store_folder, opset, compress, stream)


def _export_onnx(ep: torch.export.ExportedProgram, out: Path, metadata: dict[str, Any], weights,
                 store_folder: Path | None, opset: int | None, compress: str, stream: bool,
                 compressed_folder: Path | None = None) -> list[Path]:
    """export_onnx; `compressed_folder`: where the compressed weights' shared store is (a checkpoint's --weights
    int8 engine), `store_folder` then being the scratch folder of the float weights."""
    t0 = time.perf_counter()
    io = metadata.get("io")  # absent only for a bare program (input_ids, pixel_values) -> logits
    program = torch.onnx.export(ep, (), input_names=[t["name"] for t in io["inputs"]] if io else
                                ["input_ids", "pixel_values"],
                                output_names=[t["name"] for t in io["outputs"]] if io else ["logits"], dynamo=True,
                                verbose=False, optimize=not stream, opset_version=opset)
    has_weights = not any(t.device.type == "meta" for t in ep.state_dict.values())
    if not has_weights:
        log.warning("%s: the model is on the meta device; writing the graph without weights", out)
    store = None
    if stream:
        from .weight_store import WeightStore, attach_streamed_weights, check_no_empty_weights

        store = WeightStore(store_folder or Path(out).parent, metadata.get("model_id", "model"),
                            metadata.get("dtype", "float32"))
        try:
            n = attach_streamed_weights(program.model, weights, store)
        except BaseException:
            store.discard_if_new()  # a store this export began and could not finish is not left behind
            raise
        check_no_empty_weights(program.model, weights)
        log.info("%s: %d initializers point at %s (%d tensors appended)", Path(out).name, n, store.data, store.written)
        program.optimize()
        if compress == "none":
            metadata = {**metadata, "weights_file": store.data.name}
    if compress != "none":
        from .onnx_weights import BLOCK_RULE

        metadata = {**metadata, "weights": compress, "weights_blocks": list(BLOCK_RULE)}
    packed = None  # the compressed weights' shared store (a checkpoint's int8 engine)
    if compressed_folder is not None:
        from .weight_store import WeightStore

        packed = WeightStore(compressed_folder, metadata.get("model_id", "model"),
                             f"{metadata.get('dtype', 'float32')}-{compress}")
        metadata = {**metadata, "weights_file": packed.data.name}
    if io:
        _name_dims(program.model.graph, io)
    _drop_stack_traces(program.model.graph)
    program.model.metadata_props[METADATA_KEY] = json.dumps(
        {**metadata, "has_weights": has_weights, "onnx_opset": program.model.opset_imports[""]}, sort_keys=True)
    external = param_bytes(ep) > EXTERNAL_DATA_BYTES

    def save(tmp: Path) -> None:
        if compress != "none":  # in the model's store for that width (from a checkpoint), else the engine's own
            from .onnx_weights import compress_linear_weights, save_model

            if store is not None:  # the quantizer maps each float weight from the (scratch) store it streamed to
                compressed = compress_linear_weights(ir.serde.serialize_model(program.model), store.folder,
                                                     compress)
            else:
                compressed = _compress_from_memory(program.model, Path(out), compress)
            if packed is not None:
                from .onnx_weights import move_into_store

                log.info("%s: %d initializers point at %s", Path(out).name, move_into_store(compressed, packed),
                         packed.data)
            save_model(compressed, tmp, EXTERNAL_DATA_BYTES)
        elif store is not None:  # the weights stay where the store has them; only small constants are inline
            inline = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                         if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor))
            if inline > EXTERNAL_DATA_BYTES:
                raise VtrError(f"{out}: {inline / 1e9:.1f} GB of constants outside the weight store; too large "
                               "for one ONNX file")
            ir.save(program.model, str(tmp))
        else:
            program.save(str(tmp), include_initializers=has_weights, external_data=external)

    files = write_atomically(Path(out), save)
    log.debug("wrote %s in %.1fs", out, time.perf_counter() - t0)
    return files


def _compress_from_memory(model: ir.Model, out: Path, weights: str) -> onnx.ModelProto:
    """compress_linear_weights of an exported model whose weights are in memory. They are written to a scratch file
    beside `out` first, so that the quantizer maps them one at a time there, as it does a checkpoint's streamed
    store: handing it the model serialized whole held a second copy of every weight, then the quantizer's own.
    Measured on a pickled 743 M-parameter LLaVA (3.0 GB of float32 weights): `optimize --weights int8` peaked at
    10.2 GB RSS serialized whole (BENCHMARKS.md, "ONNX Runtime with int8 weights")."""
    from .onnx_weights import compress_linear_weights

    with scratch_dir(out.parent, f".{out.name[:64]}.float.") as folder:
        ir.save(model, str(folder / "float.onnx"), external_data="float.data")
        return compress_linear_weights(onnx.load(str(folder / "float.onnx"), load_external_data=False), folder,
                                       weights)


# torch.onnx records, on every node, the Python stack that made it: file paths of the machine that built the engine
# (its checkout, its virtual environment) and 30% of the demo model's one-file engine (1.4 of 4.6 MB). Engines ship
# without it; the name scopes that locate a reduction's nodes (`onnxruntime.selector_node_names`) stay.
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _drop_stack_traces(graph: ir.Graph) -> None:
    for node in graph.all_nodes():
        node.metadata_props.pop(STACK_TRACE_KEY, None)


def _name_dims(graph, io: dict[str, Any]) -> None:
    """Give the dynamic dims of the graph's inputs and outputs the metadata's names (prompt, capacity.3, ...)."""
    for values, described in ((graph.inputs, io["inputs"]), (graph.outputs, io["outputs"])):
        for value, d in zip(values, described, strict=True):
            if value.shape is None:
                continue
            value.shape = type(value.shape)([s if isinstance(s, int) else str(s) for s in d["shape"]])


def read_metadata(path: Path) -> dict[str, Any]:
    return metadata_of(onnx.load(str(path), load_external_data=False))


def metadata_of(model: onnx.ModelProto) -> dict[str, Any]:
    """The vtrcompile metadata, or {} when there is none or it is not a JSON object (a damaged file)."""
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            try:
                meta = json.loads(p.value)
            except ValueError:  # not JSON, or not UTF-8 (protobuf then hands back bytes)
                return {}
            return meta if isinstance(meta, dict) else {}
    return {}


def save_piecewise(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` (its weights inline) to `path` as onnx.save does, without serializing it whole: protobuf's
    serializer needed 3.5x the model's size at its peak (+2.0 GB for a 559 MB one-file engine, on top of the model).
    The file is the model's fields but the graph, then the graph field: its own fields but the initializers, then
    each initializer encoded alone. One graph field, its length counted from the parts; protobuf readers take
    fields in any order, so the file loads as the same model (tests/lower/test_onnx_phases.py)."""
    head, rest = onnx.ModelProto(), onnx.GraphProto()
    _copy_fields(model, head, skip="graph")
    _copy_fields(model.graph, rest, skip="initializer")
    graph_field = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    init_field = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    sizes = [t.ByteSize() for t in model.graph.initializer]
    body, first = rest.SerializeToString(), head.SerializeToString()
    length = len(body) + sum(len(_key(init_field)) + len(_varint(n)) + n for n in sizes)
    graph_head = _key(graph_field) + _varint(length)
    size = len(first) + len(graph_head) + length
    if size > onnx.checker.MAXIMUM_PROTOBUF:  # onnx.save refuses it too: no reader could parse it
        raise VtrError(f"{path.name}: {size / 1e9:.1f} GB, over protobuf's 2 GB limit for one ONNX file; keep the "
                       "weights in external data")
    with open(path, "wb") as f:
        f.write(first)
        f.write(graph_head + body)
        for t, n in zip(model.graph.initializer, sizes, strict=True):
            f.write(_key(init_field) + _varint(n))
            f.write(t.SerializeToString())


def _copy_fields(src, dst, skip: str) -> None:
    """Every field set in message `src` but `skip`, into the empty message `dst` of the same type."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.label == fd.LABEL_REPEATED:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _key(field: int) -> bytes:
    """A length-delimited field's key: its number and wire type 2."""
    return _varint(field << 3 | 2)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def external_span(t: onnx.TensorProto) -> tuple[str, int, int]:
    """(location, offset, length) of an initializer kept in an external file, as its entries say (absent: "", 0, 0);
    ValueError where the offset or length is not an integer."""
    info = {e.key: e.value for e in t.external_data}
    return info.get("location", ""), int(info.get("offset", 0) or 0), int(info.get("length", 0) or 0)


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the graph's initializers, inline or in external data (read from the graph, not the data; a model
    external_data_problem() passed)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += external_span(t)[2]
        else:
            total += math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def external_data_problem(model: onnx.ModelProto, folder: Path) -> str | None:
    """Why the weights a model keeps in external files cannot all be read (a file missing, or shorter than an
    initializer's offset + length), or None when they can."""
    sizes: dict[str, int] = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        try:
            loc, offset, length = external_span(t)
        except ValueError:
            return f"the external data entry of its weight {t.name[:80]!r} is damaged (offset or length not a number)"
        if loc not in sizes:
            f = folder / loc
            if not loc or Path(loc).is_absolute() or ".." in Path(loc).parts or not f.is_file():
                return f"its weights file {loc or '(unnamed)'} is missing"
            sizes[loc] = f.stat().st_size
        end = offset + length
        if end > sizes[loc]:
            return f"its weights file {loc} is truncated ({sizes[loc]} bytes, needs {end})"
    return None
