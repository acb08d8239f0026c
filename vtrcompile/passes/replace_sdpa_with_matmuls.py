"""scaled_dot_product_attention -> `matmul_attention`: the attention of a decode step, written as matmuls.

torch.onnx lowers SDPA as Reshape(k to 3-D), Transpose, Reshape back, and a Mul by sqrt(scale) on both q and the
transposed k, so every decode step scales and transposes every layer's whole key cache through a 3-D reshape
that OpenVINO neither folds into the matmul nor fuses: at 631 cached tokens (llava15-geometry, bf16) those
Transposes and Muls took 2.3 ms of a decode step's 10.4 ms of kernels. As `matmul_attention` the scale applies to
the one new query row and the key's transpose is a swap of its last two dims, which the runtime folds into the
MatMul. The values are the same up to rounding (one scale instead of two square roots).
"""

from __future__ import annotations

import logging

from torch import fx

from ..methods.tensor_ops import matmul_attention
from .base import PassResult, rewrite_result
from .find_decoder_layers import SDPA, attention_mask_arg
from .graph_utils import substitute
from .provenance import val

log = logging.getLogger(__name__)

_DEFAULTS = {"dropout_p": 0.0, "is_causal": False, "enable_gqa": False}


def _declined(op: fx.Node) -> str | None:
    """Why `op` cannot become matmul_attention (None: it can)."""
    given = {**op.kwargs, **dict(zip(("dropout_p", "is_causal"), op.args[4:6], strict=False))}
    for name, default in _DEFAULTS.items():
        if given.get(name, default) != default:
            return f"{name}={given[name]}"
    _, mask = attention_mask_arg(op)
    if isinstance(mask, fx.Node) and not val(mask).dtype.is_floating_point:
        return "boolean mask"
    if val(op.args[0]).shape[1] != val(op.args[1]).shape[1]:
        return "grouped query heads"
    return None


def replace_sdpa_with_matmuls(gm: fx.GraphModule, config=None) -> PassResult:
    """Every SDPA op with an additive (float) mask or none, no dropout, no causal flag and as many key as query
    heads -> `matmul_attention(q, k, v, mask, scale)`, its scale the op's own or 1/sqrt(head size). Needs:
    nothing. Declines any other SDPA (it stays as it is)."""
    rewritten = 0
    for op in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA]:
        why = _declined(op)
        if why:
            log.debug("replace_sdpa_with_matmuls: declined %s (%s)", op.name, why)
            continue
        _, mask = attention_mask_arg(op)
        scale = op.kwargs.get("scale")
        if scale is None:
            scale = float(val(op.args[0]).shape[-1]) ** -0.5
        with gm.graph.inserting_before(op):
            new = gm.graph.call_function(matmul_attention, (*op.args[:3], mask, float(scale)))
        substitute(op, new)
        rewritten += 1
    return rewrite_result(gm, "replace_sdpa_with_matmuls", rewritten, "no attention op it can rewrite",
                          "attention op(s) written as matmuls")
