"""replace_sdpa_with_matmuls: scaled_dot_product_attention with an additive mask (or none) becomes
`matmul_attention`, whose eager reference is torch's own SDPA: the same values up to rounding, the scale on the
query rows and the key transposed by a swap of its last two dims; an SDPA with a boolean mask, dropout, a causal
flag or grouped query heads is left alone. The decode step's export runs it (decode.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.passes.graphs import call_targets, exported
from vtrcompile.methods.tensor_ops import matmul_attention
from vtrcompile.passes.find_decoder_layers import SDPA
from vtrcompile.passes.replace_sdpa_with_matmuls import replace_sdpa_with_matmuls


class _Attention(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw)



def _qkv(q_rows=1, k_rows=23, heads=4, kv_heads=4, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, q_rows, d, generator=g).to(dtype),
            torch.randn(2, kv_heads, k_rows, d, generator=g).to(dtype) * 2,
            torch.randn(2, kv_heads, k_rows, d, generator=g).to(dtype))


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("q_rows", [1, 23])
def test_matmul_attention_equals_torch_sdpa(scale, q_rows):
    q, k, v = _qkv(q_rows)
    mask = torch.randn(2, 1, q_rows, 23) * 4
    mask[..., :3] = torch.finfo(torch.float32).min  # masked keys
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    s = scale if scale is not None else 16 ** -0.5
    assert float((matmul_attention(q, k, v, mask, s) - want).abs().max()) <= 1e-5
    assert float((matmul_attention(q, k, v, None, s) - F.scaled_dot_product_attention(q, k, v, scale=scale))
                 .abs().max()) <= 1e-5


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sdpa_with_an_additive_mask_becomes_matmuls_with_the_same_values(dtype, atol):
    q, k, v = _qkv(dtype=dtype)
    mask = torch.zeros(2, 1, 1, 23, dtype=dtype)
    mask[1, ..., :5] = torch.finfo(dtype).min  # a padded row, as a batch decode step masks it
    module = _Attention(scale=0.25)
    gm = exported(module, q, k, v, mask)
    assert SDPA in call_targets(gm)
    res = replace_sdpa_with_matmuls(gm)
    assert res.modified and res.facts == {"rewritten": 1}
    t = call_targets(gm)
    assert SDPA not in t and t.count(matmul_attention) == 1
    node = next(n for n in gm.graph.nodes if n.target is matmul_attention)
    assert node.args[4] == 0.25 and node.meta["val"].shape == (2, 4, 1, 16)
    for seed in (1, 2):  # other values through the same graph, and another cache length
        q, k, v = _qkv(k_rows=31 if seed == 2 else 23, dtype=dtype, seed=seed)
        m = torch.zeros(2, 1, 1, k.shape[2], dtype=dtype)
        with torch.no_grad():
            assert float((gm(q, k, v, m).float() - module(q, k, v, m).float()).abs().max()) <= atol


def test_the_scale_defaults_to_one_over_the_root_of_the_head_size():
    q, k, v = _qkv()
    gm = exported(_Attention(), q, k, v)
    assert replace_sdpa_with_matmuls(gm).modified
    node = next(n for n in gm.graph.nodes if n.target is matmul_attention)
    assert node.args[3] is None and node.args[4] == pytest.approx(0.25)
    with torch.no_grad():
        assert float((gm(q, k, v) - F.scaled_dot_product_attention(q, k, v)).abs().max()) <= 1e-5


@pytest.mark.parametrize("case", ["boolean mask", "causal", "dropout", "grouped heads", "no attention"])
def test_attention_it_cannot_write_as_matmuls_is_left_alone(case):
    q, k, v = _qkv(q_rows=23, kv_heads=2 if case == "grouped heads" else 4)
    args, kw = (q, k, v), {}
    if case == "boolean mask":
        args = (q, k, v, torch.ones(2, 1, 23, 23, dtype=torch.bool).tril())
    elif case == "causal":
        kw = {"is_causal": True}
    elif case == "dropout":
        kw = {"dropout_p": 0.5}
    elif case == "grouped heads":
        kw = {"enable_gqa": True}
    module = _Attention(**kw) if case != "no attention" else torch.nn.Linear(16, 16)
    gm = exported(module, *(args if case != "no attention" else (q,)))
    before = [str(n) for n in gm.graph.nodes]
    assert not replace_sdpa_with_matmuls(gm).modified and [str(n) for n in gm.graph.nodes] == before


def test_the_decode_step_attends_with_matmuls(tiny):
    """In decode.py: the exported decode step has no SDPA left, one matmul attention per layer."""
    from vtrcompile.decode import capture_decode

    ep, _ = capture_decode(tiny.hf_model, 1)
    t = call_targets(ep.graph_module)
    assert SDPA not in t
    layers = tiny.hf_model.config.text_config.num_hidden_layers
    assert t.count(torch.ops.aten.softmax.int) + t.count(torch.ops.aten._softmax.default) == layers
