"""The decode step every family shares: HF's own decoder layers over one cache per layer, each of its own
length (the prefill left each layer the tokens it processed), and what the cache looks like.

The caches are buffers of fixed capacity that the host fills: the step reads each layer's buffer, attends over its
first `past_lengths[l]` rows plus the new token, and returns only the new token's keys and values, which the host
writes into the buffers (engine/kv_cache.py). No step copies a cache, and the shapes stay the same for a whole
generation, so a runtime plans the step once. Appending in the graph instead (a concatenation per layer, today's
Hugging Face and Optimum convention) copies every layer's whole cache on every step: 4.6 ms of a 17.1 ms OpenVINO
bf16 step of `llava15-geometry` at 631 cached tokens (BENCHMARKS.md, "Generation").
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..methods.tensor_ops import additive_mask
from .family import family_of

ATTENTION = "vtrcompile_cache_buffer"


class _BufferCache:
    """Duck-typed HF cache: layer i's attention calls update(k, v, i) with the new token's rotated key and value;
    they are kept as the step's output and the layer attends over its buffer and them (buffer_attention)."""

    def __init__(self, buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.buffers = buffers
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        self.new[layer_idx] = (key, value)
        return self.buffers[layer_idx]


_active = threading.local()  # the _BufferCache of the DecodeStep being run in this thread


def buffer_attention_reference(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, k_new: torch.Tensor,
                               v_new: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Eager reference: the new token's attention over the buffer rows and itself, as one concatenated cache.
    q [B, H, 1, d]; k_buf / v_buf [B, kv, C, d]; k_new / v_new [B, kv, 1, d]; mask additive over the buffer rows,
    broadcastable to [B, 1, 1, C] (the new token always attends to itself) -> [B, H, 1, d]. Heads share key/value
    heads in groups of H / kv, as Hugging Face's repeat_kv does."""
    g = q.shape[1] // k_buf.shape[1]
    k = torch.cat([k_buf, k_new], dim=2).repeat_interleave(g, dim=1)
    v = torch.cat([v_buf, v_new], dim=2).repeat_interleave(g, dim=1)
    full = torch.cat([mask.float().expand(q.shape[0], 1, 1, k_buf.shape[2]), torch.zeros(q.shape[0], 1, 1, 1)], -1)
    w = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale + full
    return torch.matmul(torch.softmax(w, dim=-1), v.float()).to(q.dtype)


def buffer_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, k_new: torch.Tensor,
                     v_new: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """buffer_attention_reference without concatenating a cache: the scores over the buffer (masked) and over the
    new row are computed apart and joined ([B, kv, g, C + 1], small), one softmax (float32) over both, and the
    weighted sums added. The query heads are grouped by key/value head, so no cache is repeated either."""
    b, h, _, d = q.shape
    kv, c = k_buf.shape[1], k_buf.shape[2]
    qg = (q * scale).reshape(b, kv, h // kv, d)
    w = torch.cat([torch.matmul(qg, k_buf.transpose(-2, -1)) + mask, torch.matmul(qg, k_new.transpose(-2, -1))],
                  dim=-1)
    p = torch.softmax(w.float(), dim=-1).to(q.dtype)
    out = torch.matmul(p[..., :c], v_buf) + torch.matmul(p[..., c:], v_new)
    return out.reshape(b, h, 1, d)


def _attention_interface(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any):
    """Hugging Face's attention-function signature (registered as ATTENTION): key/value are the layer's buffers
    (what _BufferCache.update returned); the new rows come from the active cache."""
    k_new, v_new = _active.cache.new[module.layer_idx]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = buffer_attention(query, key, value, k_new, v_new, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register(ATTENTION, _attention_interface)


def buffer_mask(filled: torch.Tensor, pads: torch.Tensor | None, capacity: int, like: torch.Tensor) -> torch.Tensor:
    """The additive mask over a buffer of `capacity` rows, [1, 1, 1, capacity] ([B, 1, 1, capacity] with pads): 0
    on its first `filled` rows (a 0-d int tensor), the dtype's lowest value on the unfilled rows and, when pads is
    given, on the first pads[b] rows of batch row b (its left padding). The new token's own score is not masked."""
    rows = torch.arange(capacity, device=like.device)
    allowed = rows < filled
    if pads is not None:
        allowed = allowed[None, :] & (rows[None, :] >= pads[:, None])
    mask = additive_mask(allowed, like.dtype)
    return mask[:, None, None, :] if pads is not None else mask[None, None, None, :]


def _length_dependent(rope_type: Any) -> bool:
    """Rotary types whose tables depend on the longest position asked for, as HF's dynamic_rope_update tells them
    apart (any type naming "dynamic", and "longrope"); anything but a plain type name counts as one too."""
    return not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope"


def _plain_tables(rotary_emb: nn.Module, like: torch.Tensor, position_ids: torch.Tensor):
    """Hugging Face's plain rotary tables (LLaMA's form): f = position x inv_freq, cos / sin of [f, f], times the
    module's attention_scaling, in like's dtype. For positions [B, L]: [B, L, d]."""
    freqs = position_ids[..., None].float() * rotary_emb.inv_freq.to(device=like.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    scaling = float(getattr(rotary_emb, "attention_scaling", 1.0))
    if scaling != 1.0:  # x * 1.0 is x: left out, so that the graph keeps the form an exporter fuses
        cos, sin = cos * scaling, sin * scaling
    return cos.to(like.dtype), sin.to(like.dtype)


# Positions the plain-form check compares the module's tables at: each layer's new token can sit anywhere.
_CHECK_POSITIONS = (0, 1, 2, 3, 17, 255, 1000, 4095, 32767)


def plain_rotary(rotary_emb: nn.Module, dtype: torch.dtype) -> bool:
    """Whether the rotary module's tables are the plain form (_plain_tables), checked bit for bit against the module
    at _CHECK_POSITIONS in `dtype` (eager, before any trace). True for LLaMA's default and the scalings that only
    change inv_freq, and for mRoPE modules given one text position on every axis where they agree; False for the
    tables that depend on the longest position (dynamic NTK, LongRoPE) and any other form."""
    if _length_dependent(getattr(rotary_emb, "rope_type", "default")) or not isinstance(
            getattr(rotary_emb, "inv_freq", None), torch.Tensor):
        return False
    like = torch.zeros(1, dtype=dtype, device=rotary_emb.inv_freq.device)
    pos = torch.tensor([_CHECK_POSITIONS], device=like.device)
    try:
        with torch.no_grad():
            want = rotary_emb(like, pos)
    except Exception:  # a module that takes positions of another shape: not the plain form
        return False
    got = _plain_tables(rotary_emb, like, pos)
    return all(isinstance(w, torch.Tensor) and w.shape == g.shape and torch.equal(w, g)
               for w, g in zip(want, got, strict=True))


def layer_rotary(rotary_emb: nn.Module, like: torch.Tensor, layer_position_ids: torch.Tensor, plain: bool = False):
    """i -> the (cos, sin) of the new token at layer i's position, [B, 1, d] (HF's rotary output for one position).

    `plain` (the module passed plain_rotary): each layer's table is computed from its own position in the plain
    form, the cos and sin of [f, f] as HF's LLaMA module writes them. In that form the ONNX exporter's optimizer
    fuses each layer's query and key rotations into one `RotaryEmbedding` node each (opset 23): the demo model's
    decode step went from 685 to 525 nodes after ONNX Runtime's fusions, and 0.431 -> 0.358 ms (BENCHMARKS.md,
    "Fused rotary embeddings in the decode step"). Otherwise all L positions go through the model's
    rotary module in one call, read as a sequence of L positions ([B, L] -> [B, L, d]; mRoPE modules put a text
    position on all three axes, as the decode step wants), and each layer slices its row: two cos/sin kernels per
    step instead of 2 L."""
    if _length_dependent(getattr(rotary_emb, "rope_type", "default")):  # each layer's own call, its own table
        return lambda i: rotary_emb(like, layer_position_ids[:, i:i + 1])
    if plain:
        return lambda i: _plain_tables(rotary_emb, like, layer_position_ids[:, i:i + 1])
    cos, sin = rotary_emb(like, layer_position_ids)
    return lambda i: (cos[..., i:i + 1, :], sin[..., i:i + 1, :])


class _AttentionSwapped:
    """Within the block, every decoder layer's attention dispatches to ATTENTION (restored after)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.configs = list({id(layer.self_attn.config): layer.self_attn.config for layer in layers}.values())
        self.before: list[Any] = []

    def __enter__(self) -> None:
        self.before = [cfg._attn_implementation_internal for cfg in self.configs]
        for cfg in self.configs:
            cfg._attn_implementation_internal = ATTENTION

    def __exit__(self, *exc: Any) -> None:
        for cfg, impl in zip(self.configs, self.before, strict=True):
            cfg._attn_implementation_internal = impl


class DecodeStep(nn.Module):
    """forward(input_ids [B,1], layer_position_ids [B,L], k/v buffers per layer [B,kv,C_l,d] ..., past_lengths
    [L][, attention_mask [B, M]]) -> (logits [B,vocab] float32, the new token's k/v per layer [B,kv,1,d] ...,
    layer_position_ids + 1).

    The new token sits at position layer_position_ids[:, l] in layer l and attends to the first past_lengths[l]
    rows of that layer's buffer plus itself (one query row: no causal mask). The rows after them are
    unfilled capacity and masked. With `padded` (engines of batch > 1) it takes the batch's attention_mask last,
    the prompt's left-padding mask (Hugging Face's convention, later 1s allowed): only its zeros are read, as the
    count of padding rows at the front of every layer's cache. `plain_tables`: each layer's rotary table in the
    plain form where the model's rotary module passes plain_rotary (layer_rotary), for a backend that fuses it.
    """

    def __init__(self, model: nn.Module, padded: bool = False, plain_tables: bool = False) -> None:
        super().__init__()
        self.model = model
        self.padded = padded
        lm = family_of(model).language_model(model)
        self.plain_rotary = plain_tables and plain_rotary(lm.rotary_emb, lm.embed_tokens.weight.dtype)

    def forward(self, input_ids: torch.Tensor, layer_position_ids: torch.Tensor, *rest: torch.Tensor):
        lm = family_of(self.model).language_model(self.model)
        n = len(lm.layers)
        buffers, past_lengths = rest[:2 * n], rest[2 * n]
        pads = (rest[2 * n + 1] == 0).sum(dim=1) if self.padded else None
        cache = _BufferCache([(buffers[2 * i], buffers[2 * i + 1]) for i in range(n)])
        h = lm.embed_tokens(input_ids)
        rotary = layer_rotary(lm.rotary_emb, h, layer_position_ids, self.plain_rotary)
        _active.cache = cache
        try:
            with _AttentionSwapped(lm.layers):
                for i, layer in enumerate(lm.layers):
                    mask = buffer_mask(past_lengths[i], pads, buffers[2 * i].shape[2], h)
                    h = layer(h, attention_mask=mask, position_ids=layer_position_ids[:, i:i + 1], cache=cache,
                              position_embeddings=rotary(i))
        finally:
            _active.cache = None
        logits = self.model.lm_head(lm.norm(h))[:, -1, :].float()
        return (logits, *(t for i in range(n) for t in cache.new[i]), layer_position_ids + 1)


def cache_geometry(model: nn.Module) -> dict[str, int]:
    """Layers, key/value heads and head size of the LLM's cache, and the longest context it positions."""
    tc = family_of(model).text_config(model.config)
    heads = tc.num_attention_heads
    return {"llm_layers": tc.num_hidden_layers, "kv_heads": getattr(tc, "num_key_value_heads", None) or heads,
            "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            "max_context": int(tc.max_position_embeddings)}


def eos_token_ids(model: nn.Module) -> list[int]:
    """EOS ids from the generation config, else the text config; [] when the model names none."""
    for cfg in (getattr(model, "generation_config", None), family_of(model).text_config(model.config), model.config):
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    return []
