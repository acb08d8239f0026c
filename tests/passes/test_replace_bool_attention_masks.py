"""replace_bool_attention_masks: each boolean attention mask becomes one additive float mask, shared by the attention
ops that read it; the attention's result is unchanged; masks that are not boolean, and attention without a mask,
are left alone."""

from __future__ import annotations

import torch

from vtrcompile.methods.tensor_ops import additive_mask
from vtrcompile.passes.replace_bool_attention_masks import SDPA, replace_bool_attention_masks
from vtrcompile.passes.strip_runtime_asserts import strip_runtime_asserts


class _TwoLayers(torch.nn.Module):
    """Two attention ops reading one causal mask, as a decoder's layers do."""

    def __init__(self, mask_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.mask_dtype = mask_dtype

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = q.shape[2]
        mask = None
        if self.mask_dtype is not None:
            causal = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
            mask = causal if self.mask_dtype == torch.bool else additive_mask(causal, self.mask_dtype)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return torch.nn.functional.scaled_dot_product_attention(a, k, v, attn_mask=mask)


def _graph(mask_dtype):
    q, k, v = (torch.randn(1, 2, 7, 8) for _ in range(3))
    gm = torch.export.export(_TwoLayers(mask_dtype), (q, k, v), strict=False).module()
    strip_runtime_asserts(gm)
    return gm, (q, k, v)


def _masks(gm):
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == SDPA:
            m = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
            out.append(m)
    return out


def test_a_boolean_mask_is_made_additive_once_for_every_attention_op():
    gm, x = _graph(torch.bool)
    want = gm(*x)
    res = replace_bool_attention_masks(gm)
    assert res.modified and res.facts == {"masks": 1}
    masks = _masks(gm)
    assert len(masks) == 2 and masks[0] is masks[1] and masks[0].target is additive_mask
    assert masks[0].meta["val"].dtype == torch.float32
    assert float((gm(*x) - want).abs().max()) <= 1e-6


def test_additive_mask_equals_the_boolean_mask_in_attention():
    """The eager reference: softmax over the allowed keys only, in float32 and bfloat16."""
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        q, k, v = (torch.randn(1, 3, 9, 16, dtype=dtype) for _ in range(3))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        b = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(causal, dtype))
        assert float((a.float() - b.float()).abs().max()) <= tol
    m = additive_mask(causal, torch.bfloat16)
    assert m.dtype == torch.bfloat16 and float(m.max()) == 0.0 and float(m.min()) == float(torch.finfo(torch.bfloat16).min)


def test_float_masks_and_unmasked_attention_are_left_alone():
    for mask_dtype in (None, torch.float32):
        gm, _ = _graph(mask_dtype)
        before = [str(n) for n in gm.graph.nodes]
        res = replace_bool_attention_masks(gm)
        assert not res.modified and [str(n) for n in gm.graph.nodes] == before


def test_the_engines_attention_reads_additive_masks(tiny_build):
    """In the pipeline: no attention op of a rewritten graph reads a boolean mask; the model's mask and each llm@
    site's gathered copy are converted once each (FastV at layer 2: two masks)."""
    for method, opts, n_masks in (("none", {}, 1), ("fastv", {"layer": 2, "keep": 18}, 2), ("pyramiddrop", {}, 4)):
        gm = tiny_build(method, **opts).graph_module
        masks = [m for m in _masks(gm) if m is not None]
        assert masks and all(m.meta["val"].dtype != torch.bool for m in masks)
        assert sum(1 for n in gm.graph.nodes if n.target is additive_mask) == n_masks
