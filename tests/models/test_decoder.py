"""The decode step (models/decoder.py): attention over a fixed-capacity buffer plus the new row, equal to attention
over the concatenated cache; unfilled and padded rows have no effect; the exported step copies no cache."""

from __future__ import annotations

import pytest
import torch

from vtrcompile.models.decoder import (
    DecodeStep,
    buffer_attention,
    buffer_attention_reference,
    buffer_mask,
    cache_geometry,
)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (6, 1)])
def test_buffer_attention_equals_attention_over_the_concatenated_cache(dtype, atol, heads, kv):
    g = torch.Generator().manual_seed(0)
    b, c, d = 2, 9, 8
    q = torch.randn(b, heads, 1, d, generator=g).to(dtype)
    kb, vb = (torch.randn(b, kv, c, d, generator=g).to(dtype) for _ in range(2))
    kn, vn = (torch.randn(b, kv, 1, d, generator=g).to(dtype) for _ in range(2))
    mask = buffer_mask(torch.tensor(6), torch.tensor([0, 2]), c, q[:, 0])
    got = buffer_attention(q, kb, vb, kn, vn, mask, d ** -0.5)
    want = buffer_attention_reference(q, kb, vb, kn, vn, mask, d ** -0.5)
    assert got.shape == (b, heads, 1, d) and got.dtype == dtype
    assert float((got.float() - want.float()).abs().max()) <= atol
    # the reference itself against torch's SDPA over the filled rows alone, per batch row (row 1: 2 rows of padding)
    for row, lo in ((0, 0), (1, 2)):
        k = torch.cat([kb[row:row + 1, :, lo:6], kn[row:row + 1]], dim=2).repeat_interleave(heads // kv, dim=1)
        v = torch.cat([vb[row:row + 1, :, lo:6], vn[row:row + 1]], dim=2).repeat_interleave(heads // kv, dim=1)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q[row:row + 1].float(), k.float(), v.float())
        assert float((want[row:row + 1].float() - sdpa).abs().max()) <= atol


def test_unfilled_rows_do_not_change_the_result():
    """Whatever finite values the rows past `filled` hold, the attention is the same."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 1, 4, generator=g)
    kb, vb = torch.randn(1, 2, 7, 4, generator=g), torch.randn(1, 2, 7, 4, generator=g)
    kn, vn = torch.randn(1, 2, 1, 4, generator=g), torch.randn(1, 2, 1, 4, generator=g)
    mask = buffer_mask(torch.tensor(3), None, 7, q[:, 0])
    a = buffer_attention(q, kb, vb, kn, vn, mask, 0.5)
    kb2, vb2 = kb.clone(), vb.clone()
    kb2[:, :, 3:], vb2[:, :, 3:] = 1e4, -1e4
    assert torch.equal(a, buffer_attention(q, kb2, vb2, kn, vn, mask, 0.5))


def _step_inputs(model, capacity_extra: int, seed: int = 0):
    geo = cache_geometry(model)
    n, kv, d = geo["llm_layers"], geo["kv_heads"], geo["head_dim"]
    g = torch.Generator().manual_seed(seed)
    lengths = [7 + i for i in range(n)]
    past = []
    for s in lengths:
        k, v = torch.randn(1, kv, s, d, generator=g), torch.randn(1, kv, s, d, generator=g)
        pad = torch.full((1, kv, capacity_extra, d), 3.0)  # finite junk in the unfilled rows
        past += [torch.cat([k, pad], 2), torch.cat([v, pad], 2)]
    ids = torch.tensor([[5]])
    pos = torch.tensor([[9 + i for i in range(n)]])
    return ids, pos, past, torch.tensor(lengths)


def test_decode_step_ignores_spare_capacity_and_returns_the_new_rows(tiny):
    """The eager step on exact-size buffers and on buffers with 5 spare rows: the same logits and new rows; the
    new rows are [B, kv, 1, d]; positions advance by one."""
    model = tiny.hf_model
    step = DecodeStep(model).eval()
    with torch.no_grad():
        ids, pos, past, lengths = _step_inputs(model, 0)
        exact = step(ids, pos, *past, lengths)
        ids, pos, past, lengths = _step_inputs(model, 5)
        spare = step(ids, pos, *past, lengths)
    n = cache_geometry(model)["llm_layers"]
    assert len(spare) == 2 + 2 * n
    assert float((exact[0] - spare[0]).abs().max()) <= 1e-5
    for a, b in zip(exact[1:-1], spare[1:-1], strict=True):
        assert b.shape[2] == 1 and float((a - b).abs().max()) <= 1e-5
    assert torch.equal(spare[-1], pos + 1)


def test_the_exported_decode_step_copies_no_cache(tiny):
    """No concatenation, scatter or index write takes a cache buffer, and no SDPA is left: the buffers are only
    read, by the two matmuls of each layer's attention."""
    from vtrcompile.decode import capture_decode

    ep, dims = capture_decode(tiny.hf_model, 1)
    n = cache_geometry(tiny.hf_model)["llm_layers"]
    sig = ep.graph_signature
    buffers = set(sig.user_inputs[2:2 + 2 * n])
    copying = {torch.ops.aten.cat.default, torch.ops.aten.index_put.default, torch.ops.aten.scatter.src,
               torch.ops.aten.slice_scatter.default, torch.ops.aten.copy.default}
    readers = []
    for node in ep.graph.nodes:
        for arg in node.all_input_nodes:
            if arg.name in buffers:
                assert node.target not in copying, node
                readers.append(node.target)
    assert torch.ops.aten.scaled_dot_product_attention.default not in {nd.target for nd in ep.graph.nodes}
    assert len(readers) >= 2 * n
    assert sorted(set(dims.values())) == sorted({f"capacity.{i}" for i in range(n)})
