"""`--weights int8` / `int4` for ONNX Runtime engines: weight-only int8 or int4 of the linear layers, as ONNX Runtime's
`MatMulNBits`.

Every MatMul whose second input is a constant weight (the LLM's and the vision tower's linear layers, the projector,
the lm_head) becomes a `MatMulNBits` node (com.microsoft) that holds the weight as int8 or int4 (BITS) in blocks of
rows along K, one float scale per block and output column, symmetric (no zero points). Blocks are LARGE_BLOCK (128)
rows where a layer's K is a multiple of it, else BLOCK (32; K padded to whole blocks). The tensors between the
nodes stay float32; the reduction's own nodes (selector, gathers: `onnxruntime.selector_node_names`) are never
compressed. ONNX Runtime's quantizer (`onnxruntime.quantization.matmul_nbits_quantizer`) writes the nodes.

ACCURACY_LEVEL 4 lets ONNX Runtime's CPU kernel quantize each block of a node's input to int8 too and multiply in
int8, which is what makes these engines faster than float32 rather than only smaller (level 1, float32 compute on
the int8 weights, took 105 ms a `llava15-geometry` decode step against 6 ms). Measured on `llava15-geometry` (AMD
EPYC with AVX-512, 2 threads; BENCHMARKS.md, "ONNX Runtime with int8 weights"): the unmodified decode step 14.7 ->
6.8 ms, FastV 64's 32-token generation 512 -> 282 ms. int4 halves the weights' bytes again: its decode step is
faster still and its prefill slower than int8's (BENCHMARKS.md, "int4 weights"). Blocks of 128 rather than 32 made
`llava15-geometry`'s int4 prefill 1.2-1.3x faster and its decode step 1.1x (int8: 1.1x both), in one process; they
moved 3-4 of the demo model's 700 test answers, whose 64- and 168-row layers keep blocks of 32 (on every layer they
cost its int4 engine 1.2 points; BENCHMARKS.md, "ONNX Runtime's blocks of 128"). `reference/quantized.py` is the
eager reference of one node.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import onnx

log = logging.getLogger(__name__)

BITS = {"int8": 8, "int4": 4}  # --weights -> MatMulNBits bits
BLOCK = 32  # rows of K per scale where K is no multiple of LARGE_BLOCK (the demo's 64 and 168: 168 padded to 192)
LARGE_BLOCK = 128  # rows of K per scale where K is a multiple of it (every layer of llava15-geometry and of 7B LLaVA)
BLOCK_RULE = [LARGE_BLOCK, BLOCK]  # an engine's `weights_blocks`: a decode engine compressed otherwise is not reused
ACCURACY_LEVEL = 4  # int8 activations inside the kernel (ONNX Runtime's accuracy_level 4)


def compress_linear_weights(model: onnx.ModelProto, folder: Path | None = None,
                            weights: str = "int8") -> onnx.ModelProto:
    """`model` (a flat ONNX Runtime engine graph) with every constant-weight MatMul as a MatMulNBits node of
    BITS[weights] bits.
    `folder`: where the model's external data lives (a checkpoint's streamed store, or the scratch file of a model
    in memory: onnx._compress_from_memory). The quantizer maps each stored weight from
    there as it compresses it, one at a time, so the float weights are never all in memory; what stays float
    (embeddings, norms) is then read into the returned model, which holds every weight itself."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from .onnxruntime import selector_node_names

    t0 = time.perf_counter()
    if folder is not None:
        _locate_external(model, Path(folder))
    selector = set(selector_node_names(model))
    blocks, names = block_sizes(model), {n.name for n in model.graph.node}
    out = model
    for block in (LARGE_BLOCK, BLOCK):  # the quantizer takes one block size: a pass for each
        exclude = selector | (names - {name for name, b in blocks.items() if b == block})
        quantizer = MatMulNBitsQuantizer(out, bits=BITS[weights], block_size=block, is_symmetric=True,
                                         accuracy_level=ACCURACY_LEVEL, nodes_to_exclude=sorted(exclude))
        quantizer.process()
        out = quantizer.model.model
    _read_external(out)
    n = sum(node.op_type == "MatMulNBits" for node in out.graph.node)
    log.info("%s weights: %d linear layers as MatMulNBits (%.1fs)", weights, n, time.perf_counter() - t0)
    return out


def block_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Every MatMul of a stored 2-D weight [K, N], by node name: the block it is compressed with (LARGE_BLOCK where K
    is a multiple of it, else BLOCK). The rule depends on the layer alone, so the prefill and the decode engine
    compress a weight they share alike (the one file and the compressed store keep it once)."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    return {n.name: LARGE_BLOCK if d[0] % LARGE_BLOCK == 0 else BLOCK for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) == 2 and len(d := dims.get(n.input[1], [])) == 2}


def _locate_external(model: onnx.ModelProto, folder: Path) -> None:
    """Point every external initializer at its file by absolute path (the quantizer reads them relative to nothing)."""
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = str((folder / entry.value).resolve())


def _read_external(model: onnx.ModelProto) -> None:
    """Read every initializer still stored outside the model (by the absolute paths `_locate_external` wrote) into
    it: the engine must not point at a store that is about to be removed."""
    from .onnx import external_span

    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location, offset, length = external_span(t)
        with open(location, "rb") as f:
            f.seek(offset)
            t.raw_data = f.read(length) if length else f.read()
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT


def move_into_store(model: onnx.ModelProto, store) -> int:
    """Point every large initializer of `model` (held in memory) at the compressed weights' shared store instead
    (lower/weight_store.WeightStore), written there the first time its bytes are seen: the engines of a model built
    with --weights int8 or int4 from a checkpoint (reduced, baseline, the decode engine) then store each compressed
    weight once, as the float ones are. Keyed by dtype, shape and a hash of the bytes (the exporter names one weight
    differently in the prefill and the decode graph). Returns how many initializers now point at the store."""
    import hashlib
    import math

    import torch

    from .weight_store import INLINE_ELEMENTS

    moved = 0
    for t in model.graph.initializer:
        data = t.raw_data
        if t.data_location == onnx.TensorProto.EXTERNAL or not data or math.prod(t.dims) <= INLINE_ELEMENTS:
            continue  # small ones stay inline, as in the float store
        key = f"{t.data_type}:{list(t.dims)}:{hashlib.sha256(data).hexdigest()}"
        offset, length = store.tensor(key, lambda data=data: torch.frombuffer(bytearray(data), dtype=torch.uint8))
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        for k, v in (("location", store.data.name), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        moved += 1
    return moved


def save_model(model: onnx.ModelProto, path: Path, external_bytes: int) -> None:
    """Save a compressed engine on its own: its initializers inline, or in `<name>.data` beside it when they weigh
    more than `external_bytes` (protobuf's 2 GB limit)."""
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > external_bytes:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    else:
        from .onnx import save_piecewise

        save_piecewise(model, path)
