"""A prefill IR and its decode IR -> one OpenVINO IR that holds the LLM's weights once (`--out x.xml --one-file`).

Two compiled models never share weights: the CPU plugin keeps its packed weights per compiled model. Here, as in
the ONNX one-file engine (onnx_phases.py), the two graphs become the bodies of one `If` on the boolean input
`prefill`. OpenVINO's IR writer stores equal constants' bytes once, its reader maps every constant onto the
bytes of the .bin, and the CPU plugin keys the weights it packs by their address, so a weight both bodies read is
packed once for both. From a streamed checkpoint, the joined IR's .bin is the model's weight store, as the two
IRs' are (a link; nothing is read or written again).

The price: the CPU plugin copies each input of an `If` into the body it runs, so every decode step copies the
cache buffers (measured on `llava15-geometry` bf16: a FastV 64 step 7.27 -> 8.45 ms; 8.3 -> 14.6 ms with 1,900
cached rows in every layer; BENCHMARKS.md, "OpenVINO one-file engines"). Two files stay the default for `.xml`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engine.metadata import PHASE_INPUT
from ..errors import VtrError
from .atomic import write_atomically
from .onnx import METADATA_KEY

log = logging.getLogger(__name__)


def join_phases(prefill: Any, decode: Any, prefill_meta: dict[str, Any], decode_meta: dict[str, Any],
                file_name: str, store: str | None = None) -> Any:
    """One model: If(prefill) -> the prefill model, else the decode model. Its inputs are the flag and the union of
    both models' inputs (every dim free: the phases give `input_ids` different lengths); its outputs are theirs,
    which must have the same names. The metadata is the prefill's with the decode engine's inside
    (`decode.metadata`), `decode.file` naming the one file, `weights_file` the weight store its .bin is (or
    none)."""
    import openvino as ov
    import openvino.opset13 as ops

    p_out = [r.input_value(0).get_any_name() for r in prefill.get_results()]
    d_out = [r.input_value(0).get_any_name() for r in decode.get_results()]
    if p_out != d_out:
        raise VtrError(f"internal: the engines' outputs differ: {p_out[:4]}... against {d_out[:4]}...")
    flag = ops.parameter([], ov.Type.boolean, name=PHASE_INPUT)
    flag.output(0).get_tensor().set_names({PHASE_INPUT})
    outer: dict[str, Any] = {}
    for model in (prefill, decode):
        for p in model.get_parameters():
            name = p.output(0).get_any_name()
            if name not in outer:
                q = ops.parameter(ov.PartialShape.dynamic(p.get_output_partial_shape(0).rank),
                                  p.get_output_element_type(0), name=name)
                q.output(0).get_tensor().set_names({name})
                outer[name] = q
    body_params = [{p.output(0).get_any_name(): p for p in m.get_parameters()} for m in (prefill, decode)]
    node = ops.if_op(flag.output(0))
    node.set_then_body(prefill)
    node.set_else_body(decode)
    for name, q in outer.items():
        node.set_input(q.output(0), body_params[0].get(name), body_params[1].get(name))
    results = []
    for name, then_r, else_r in zip(p_out, prefill.get_results(), decode.get_results(), strict=True):
        out = node.set_output(then_r, else_r)
        out.get_tensor().set_names({name})
        results.append(ops.result(out))
    joined = ov.Model(results, [flag, *outer.values()], "prefill_and_decode")
    joined.validate_nodes_and_infer_types()
    meta = {k: v for k, v in prefill_meta.items() if k != "weights_file"}
    if store is not None:
        meta["weights_file"] = store
    meta["decode"] = {**prefill_meta["decode"], "file": file_name, "metadata": decode_meta}
    joined.set_rt_info(json.dumps(meta, sort_keys=True), [METADATA_KEY])
    return joined


def write_one_file(out: Path, decode_path: Path, write_prefill: Callable[[Path], Any]
                   ) -> tuple[list[Path], dict[str, Any]]:
    """Write the one-file IR `out` (.xml + .bin) of a prefill engine and the decode IR at `decode_path`, in one
    atomic step: write_prefill(path) writes the prefill IR inside the temporary folder, where it is joined with the
    decode IR; only the joined IR is renamed into place. Where both IRs' .bin is the model's weight store (a
    streamed checkpoint), so is the joined IR's: its weights are never read nor written again
    (openvino_store.blank_weights, point_bodies_at_store). Returns the files written and the engine's metadata."""
    import openvino as ov

    from .openvino import read_ir
    from .openvino_store import blank_weights, constant_spans, link_store, point_bodies_at_store

    joined: list[dict[str, Any]] = []

    def save(tmp: Path) -> None:
        staged = tmp.parent / "prefill" / out.name
        staged.parent.mkdir()
        write_prefill(staged)
        prefill, p_meta = read_ir(staged)
        decode, d_meta = read_ir(decode_path)
        store = p_meta.get("weights_file")
        on_store = store is not None and store == d_meta.get("weights_file")
        if on_store:
            spans = constant_spans(staged), constant_spans(decode_path)
            zeros = blank_weights(prefill, decode)
        model = join_phases(prefill, decode, p_meta, d_meta, out.name, store if on_store else None)
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        joined.append(json.loads(str(model.get_rt_info([METADATA_KEY]).astype(str))))
        del model, prefill, decode  # the staged IR's weights are mapped from its .bin until here
        if on_store:
            del zeros
            tmp.write_bytes(point_bodies_at_store(tmp, *spans))
            tmp.with_suffix(".bin").unlink()
            link_store(decode_path.parent / store, tmp.with_suffix(".bin"))
        shutil.rmtree(staged.parent)

    files = write_atomically(out, save)
    log.info("one-file engine %s: the prefill and decode IRs joined, each weight stored and packed once%s", out,
             f" (its .bin is the weight store {joined[0]['weights_file']})" if "weights_file" in joined[0] else "")
    return files, joined[0]
