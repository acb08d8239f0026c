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
    layer_rotary,
    plain_rotary,
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


def _rotary_modules():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
    mrope = {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}
    return {"llama": lambda: LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4)),
            "qwen2-vl mrope": lambda: Qwen2VLRotaryEmbedding(
                Qwen2VLTextConfig(hidden_size=64, num_attention_heads=2, rope_parameters=mrope)),
            "qwen3-vl interleaved mrope": lambda: Qwen3VLTextRotaryEmbedding(
                Qwen3VLTextConfig(hidden_size=64, num_attention_heads=2, head_dim=32)),
            "llama dynamic ntk": lambda: LlamaRotaryEmbedding(LlamaConfig(
                hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
            "llama longrope": lambda: LlamaRotaryEmbedding(LlamaConfig(
                hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
                                 "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}))}


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("family", list(_rotary_modules()))
def test_one_rotary_call_for_all_layers_gives_each_layer_its_own_table(family, plain):
    """layer_rotary(i) is bit for bit what the family's rotary module gives layer i's position alone, with a
    different position in every layer (renumbered layers) and per batch row; in the plain form too, for every
    module plain_rotary accepts."""
    rotary = _rotary_modules()[family]()
    pos = torch.tensor([[5, 9, 9, 3], [0, 1, 2, 100]])
    like = torch.zeros(1, dtype=torch.bfloat16)
    if plain and not plain_rotary(rotary, like.dtype):
        pytest.skip(f"{family}: not the plain form")
    per_layer = layer_rotary(rotary, like, pos, plain)
    for i in range(pos.shape[1]):
        want = rotary(like, pos[:, i:i + 1])
        got = per_layer(i)
        assert got[0].shape == want[0].shape == (2, 1, want[0].shape[-1])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


class _InterleavedRotary(torch.nn.Module):
    """Tables of another form (GPT-J's: each frequency repeated in place, not the halves [f, f])."""

    def __init__(self) -> None:
        super().__init__()
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))

    def forward(self, x, position_ids):
        f = (position_ids[..., None].float() * self.inv_freq).repeat_interleave(2, dim=-1)
        return f.cos().to(x.dtype), f.sin().to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_plain_rotary_form_is_recognised_by_the_tables_alone(dtype):
    """plain_rotary compares the module's tables with the plain form bit for bit: LLaMA's and the mRoPE modules
    (given one text position on every axis, as the decode step gives them) are; the tables that depend on the
    longest position, another form of table, and a module with no inv_freq are not."""
    modules = _rotary_modules()
    assert all(plain_rotary(modules[f](), dtype) for f in ("llama", "qwen2-vl mrope", "qwen3-vl interleaved mrope"))
    assert not any(plain_rotary(modules[f](), dtype) for f in ("llama dynamic ntk", "llama longrope"))
    assert not plain_rotary(_InterleavedRotary(), dtype)
    no_freq = _InterleavedRotary()
    del no_freq.inv_freq
    assert not plain_rotary(no_freq, dtype)


@pytest.mark.parametrize("family", ["llama dynamic ntk", "llama longrope"])
def test_a_rotary_table_that_depends_on_the_longest_position_keeps_one_call_per_layer(family):
    """Dynamic NTK and LongRoPE pick their frequencies from the longest position asked for: one call over every
    layer's positions (100, past the original 64) would give layer 0 (position 5) another table than its own."""
    rotary = _rotary_modules()[family]()
    pos, like = torch.tensor([[5, 100]]), torch.zeros(1)
    together = rotary(like, pos)[0][:, :1]
    alone = rotary(like, pos[:, :1])[0]
    assert not torch.allclose(together, alone)
    assert torch.equal(layer_rotary(rotary, like, pos)(0)[0], alone)


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


def test_the_exported_decode_step_computes_its_rotary_tables_once(tiny):
    """By default one cos and one sin for all layers' positions (layer_rotary), not one per layer; each layer still
    gets its own position's row, which the generation tests check against Hugging Face and the references."""
    from vtrcompile.decode import capture_decode

    ep, _ = capture_decode(tiny.hf_model, 1)
    targets = [nd.target for nd in ep.graph.nodes if nd.op == "call_function"]
    assert cache_geometry(tiny.hf_model)["llm_layers"] > 1
    assert targets.count(torch.ops.aten.cos.default) == 1
    assert targets.count(torch.ops.aten.sin.default) == 1


def test_the_exported_decode_step_writes_each_layer_s_rotary_table_in_the_plain_form(tiny):
    """With plain_tables (ONNX Runtime's decode step) the tiny preset's LLaMA rotary, which is the plain form, gives
    each layer the cos and sin of its own position's frequencies, [f, f], one row each: what the ONNX exporter
    fuses (test_onnx.py)."""
    from vtrcompile.decode import capture_decode

    ep, _ = capture_decode(tiny.hf_model, 1, plain_tables=True)
    n = cache_geometry(tiny.hf_model)["llm_layers"]
    cos = [nd for nd in ep.graph.nodes if nd.target == torch.ops.aten.cos.default]
    assert n > 1 and len(cos) == n
    assert all(nd.args[0].target == torch.ops.aten.cat.default and nd.meta["val"].shape[1] == 1 for nd in cos)
    assert sum(nd.target == torch.ops.aten.sin.default for nd in ep.graph.nodes) == n
