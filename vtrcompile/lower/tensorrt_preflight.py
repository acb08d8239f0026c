"""ONNX model -> list of nodes TensorRT's ONNX parser cannot take (or takes only with data-dependent shapes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

TOPK_MAX_K = 3840

# Not supported by the ONNX-TensorRT parser (its operator matrix, TensorRT 10).
UNSUPPORTED = {
    "Bernoulli", "BitShift", "Compress", "ConcatFromSequence", "ConvInteger", "Det",
    "DynamicQuantizeLinear", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "Multinomial",
    "NegativeLogLikelihoodLoss", "QLinearConv", "QLinearMatMul", "RandomNormal", "RandomNormalLike",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
    "SequenceLength", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringNormalizer",
    "TfIdfVectorizer", "Unique", "Optional", "OptionalGetElement", "OptionalHasElement",
    "RegexFullMatch", "StringConcat", "StringSplit",
}
# Parsed, but their output shape depends on the data: TensorRT needs an output allocator and
# cannot plan memory or fuse across them. vtrcompile's engines must not contain them.
DATA_DEPENDENT = {"NonZero": "output shape depends on the data"}


@dataclass(frozen=True)
class Finding:
    node: str
    op_type: str
    problem: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): {self.problem}"


def _constants(model: onnx.ModelProto) -> dict[str, object]:
    # Weights in external data are never scalar constants such as TopK's K: skip them unread.
    consts: dict[str, object] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
                                 if i.data_location != onnx.TensorProto.EXTERNAL}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    return consts


def preflight(model: onnx.ModelProto | str | Path) -> list[Finding]:
    """Every node TensorRT cannot build from, by node name, with the reason. Empty = passes."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    consts = _constants(model)
    out: list[Finding] = []
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            out.append(Finding(n.name, n.op_type, f"custom domain '{n.domain}' has no TensorRT importer"))
        elif n.op_type in UNSUPPORTED:
            out.append(Finding(n.name, n.op_type, "not supported by TensorRT's ONNX parser"))
        elif n.op_type in DATA_DEPENDENT:
            out.append(Finding(n.name, n.op_type, DATA_DEPENDENT[n.op_type]))
        elif n.op_type == "TopK":
            k = consts.get(n.input[1])
            if k is None:
                out.append(Finding(n.name, n.op_type, "K is computed at run time; TensorRT needs a constant K"))
            elif int(k.reshape(-1)[0]) > TOPK_MAX_K:
                out.append(Finding(n.name, n.op_type, f"K={int(k.reshape(-1)[0])} exceeds TensorRT's {TOPK_MAX_K}"))
        elif n.op_type == "Cast":
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            if to == onnx.TensorProto.DOUBLE:
                out.append(Finding(n.name, n.op_type, "casts to float64, which TensorRT does not compute in"))
    return out
