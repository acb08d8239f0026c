"""An OpenVINO IR whose weights are the model's weight store (lower/weight_store.py), without reading them.

OpenVINO writes a constant's bytes into the IR's .bin, and to do so reads every one of them: at 7B, 13 GB of
file-backed pages resident while the IR is saved. Instead, each constant that stands for a stored weight (an
ONNX initializer in the store) is swapped for a stand-in input before saving, and the saved IR is edited: every
stand-in becomes a constant at the weight's offset in the store, every other constant moves to where its bytes
were appended to the store. The store then serves as the IR's .bin.

A one-file IR (openvino_phases.py) joins two such IRs: their weights are swapped for zero-backed constants of the
same type and shape before the joined model is saved (so nothing reads them), and each constant of the saved bodies
is then pointed back at its span of the store, by name.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import onnx
import torch

from ..errors import VtrError

log = logging.getLogger(__name__)

STAND_IN = "vtr.stored_weight."


def stored_initializers(onnx_path: Path, store_name: str) -> dict[str, tuple[int, int]]:
    """Initializer name -> (offset, length) in the store, for every initializer of the ONNX file kept there."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        if info.get("location") != store_name:
            raise VtrError(f"internal: {onnx_path.name}: initializer {t.name} lies in {info.get('location')}, "
                           f"not in the weight store {store_name}")
        out[t.name] = (int(info.get("offset", 0) or 0), int(info["length"]))
    return out


def stand_in_weights(model: Any, onnx_path: Path, store_name: str) -> dict[str, tuple[int, int]]:
    """Swap each constant of `model` (read from `onnx_path`) that is a stored initializer for a stand-in
    Parameter of its type and shape; the constant's data is never touched. Returns stand-in name ->
    (offset, length) in the store."""
    import openvino as ov

    where = stored_initializers(onnx_path, store_name)
    stand_ins, spans = [], {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant":
            continue
        names = sorted(op.output(0).get_names() & where.keys())
        if not names:
            continue
        offset, length = where[names[0]]
        expected = op.get_element_type().size * math.prod(op.get_output_shape(0))
        if expected != length:
            raise VtrError(f"internal: stored weight {names[0]} holds {length} bytes, its constant needs {expected}")
        param = ov.opset13.parameter(op.get_output_partial_shape(0), op.get_element_type(),
                                     name=f"{STAND_IN}{len(stand_ins)}")
        op.output(0).replace(param.output(0))
        stand_ins.append(param)
        spans[param.get_friendly_name()] = (offset, length)
    if len(spans) < len(where):  # a weight OpenVINO's reader folded into another constant: saved with the IR
        log.warning("%s: %d of %d stored weights are not constants of OpenVINO's model; their bytes are written "
                    "again", onnx_path.name, len(where) - len(spans), len(where))
    model.add_parameters(stand_ins)
    return spans


def point_at_store(xml_path: Path, bin_path: Path, spans: dict[str, tuple[int, int]], store) -> bytes:
    """The saved IR's XML with each stand-in turned into a constant at its span of the store and every other
    constant moved to where the saved .bin's bytes now lie in the store (appended once per distinct .bin)."""
    blob = bin_path.read_bytes() if bin_path.is_file() else b""
    key = "openvino-constants:" + hashlib.sha256(blob).hexdigest()
    base, _ = store.tensor(key, lambda: torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else
                           torch.empty(0, dtype=torch.uint8))
    tree = ET.parse(xml_path)
    layers = tree.getroot().find("layers")
    if layers is None:
        raise VtrError(f"internal: {xml_path.name} has no layers")
    turned = 0
    for layer in layers:
        data = layer.find("data")
        if data is None:
            continue
        if layer.get("type") == "Const":
            data.set("offset", str(base + int(data.get("offset", "0"))))
        elif layer.get("type") == "Parameter" and layer.get("name") in spans:
            offset, length = spans[layer.get("name", "")]
            element_type, shape = data.get("element_type", ""), data.get("shape", "")
            data.attrib.clear()
            data.attrib.update({"element_type": element_type, "shape": ", ".join(shape.split(",")) if shape else "",
                                "offset": str(offset), "size": str(length)})
            layer.set("type", "Const")
            turned += 1
    if turned != len(spans):
        raise VtrError(f"internal: {turned} of {len(spans)} stand-ins found in the saved IR")
    return ET.tostring(tree.getroot(), encoding="utf-8", xml_declaration=True)


def link_store(store: Path, bin_path: Path) -> None:
    """`bin_path` becomes the store: a hard link (a copy where the file system has none)."""
    try:
        os.link(store, bin_path)
    except OSError as e:
        log.warning("%s: no hard link to %s (%s); copying it", bin_path.name, store.name, e.strerror)
        shutil.copyfile(store, bin_path)


def constant_spans(xml_path: Path) -> dict[str, tuple[int, int]]:
    """Const layer name -> (offset, size) in the .bin, for a saved IR's top-level graph."""
    layers = ET.parse(xml_path).getroot().find("layers")
    out: dict[str, tuple[int, int]] = {}
    for layer in layers if layers is not None else []:
        data = layer.find("data")
        if layer.get("type") == "Const" and data is not None:
            name = layer.get("name", "")
            if name in out:
                raise VtrError(f"internal: {xml_path.name} has two constants named {name!r}")
            out[name] = (int(data.get("offset", "0")), int(data.get("size", "0")))
    return out


WEIGHT_BYTES = 1 << 16  # floating constants this large are weights (never read to infer a shape)


def blank_weights(*models: Any) -> Any:
    """Swap each weight of the models (a floating constant of WEIGHT_BYTES or more) for a constant of the same
    name, type and shape over zero pages that nothing has written, so saving the models neither reads the weights
    nor holds their bytes. Returns the zero buffer, to be kept alive while the models are."""
    import numpy as np
    import openvino as ov

    weights = [op for m in models for op in m.get_ops() if op.get_type_name() == "Constant"
               and op.get_element_type().is_real() and op.get_byte_size() >= WEIGHT_BYTES]
    zeros = np.zeros(max((op.get_byte_size() for op in weights), default=0), np.uint8)
    for op in weights:
        blank = ov.op.Constant(ov.Tensor(zeros[:op.get_byte_size()], list(op.get_output_shape(0)),
                                         op.get_element_type()), shared_memory=True)
        blank.set_friendly_name(op.get_friendly_name())
        blank.output(0).get_tensor().set_names(op.output(0).get_names())
        op.output(0).replace(blank.output(0))
    return zeros


def point_bodies_at_store(xml_path: Path, then_spans: dict[str, tuple[int, int]],
                          else_spans: dict[str, tuple[int, int]]) -> bytes:
    """A saved one-file IR's XML with every constant of its `If`'s two bodies at its span of the store (the spans
    of the prefill and decode IRs it was joined from, both on the store, by constant name)."""
    tree = ET.parse(xml_path)
    pointed = 0
    top = tree.getroot().find("layers")
    for node in list(top) if top is not None else []:
        if node.get("type") == "Const":  # its bytes would be read from the store at an offset of the saved .bin
            raise VtrError(f"internal: {xml_path.name}: a constant outside the If ({node.get('name')!r})")
        if node.get("type") != "If":
            continue
        for body, spans in (("then_body", then_spans), ("else_body", else_spans)):
            layers = node.find(f"{body}/layers")
            for layer in list(layers) if layers is not None else []:
                if layer.get("type") != "Const":
                    continue
                span = spans.get(layer.get("name", ""))
                data = layer.find("data")
                if span is None or data is None or int(data.get("size", "-1")) != span[1]:
                    raise VtrError(f"internal: {xml_path.name}: constant {layer.get('name')!r} of the {body} is not "
                                   "one of the joined IRs' constants on the weight store")
                data.set("offset", str(span[0]))
                pointed += 1
    if pointed != len(then_spans) + len(else_spans):
        raise VtrError(f"internal: {xml_path.name}: {pointed} of {len(then_spans) + len(else_spans)} constants of the "
                       "joined IRs found in its bodies")
    return ET.tostring(tree.getroot(), encoding="utf-8", xml_declaration=True)
