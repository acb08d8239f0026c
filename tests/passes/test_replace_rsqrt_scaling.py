"""replace_rsqrt_scaling: `x * rsqrt(v)` (an RMSNorm's scaling) becomes `x / sqrt(v)`, which ONNX Runtime fuses into
one SimplifiedLayerNormalization per norm; the values differ by rounding only; an rsqrt read by anything else is
left alone."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tests.passes.graphs import call_targets, exported
from vtrcompile.passes.replace_rsqrt_scaling import replace_rsqrt_scaling


def test_an_rmsnorm_scales_by_a_division_with_the_same_values():
    """The eager reference: transformers' LlamaRMSNorm (x * rsqrt(mean(x^2) + eps) * w)."""
    norm = LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 9, 64) * 3
    gm = exported(norm, x)
    assert torch.ops.aten.rsqrt.default in call_targets(gm)
    res = replace_rsqrt_scaling(gm)
    assert res.modified and res.facts == {"rewritten": 1}
    t = call_targets(gm)
    assert torch.ops.aten.rsqrt.default not in t and torch.ops.aten.div.Tensor in t and torch.ops.aten.sqrt.default in t
    with torch.no_grad():
        assert float((gm(x) - norm(x)).abs().max()) <= 1e-5


class _RsqrtElsewhere(torch.nn.Module):
    def forward(self, x):
        r = torch.rsqrt(x.abs() + 1)
        return x * r + r  # the rsqrt is also read by an add: it must stay


class _NoRsqrt(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],))


def test_an_rsqrt_read_by_other_ops_and_a_graph_without_one_are_left_alone():
    x = torch.randn(3, 8)
    for module in (_RsqrtElsewhere(), _NoRsqrt()):
        gm = exported(module, x)
        before = [str(n) for n in gm.graph.nodes]
        assert not replace_rsqrt_scaling(gm).modified and [str(n) for n in gm.graph.nodes] == before


def test_every_norm_of_the_engines_graph_is_a_division(tiny_build):
    """In the pipeline: no rsqrt is left in a rewritten graph (the unmodified and the reduced one alike)."""
    for method, opts in (("none", {}), ("fastv", {"layer": 2, "keep": 18})):
        t = call_targets(tiny_build(method, **opts).graph_module)
        assert torch.ops.aten.rsqrt.default not in t and t.count(torch.ops.aten.div.Tensor) >= 9
