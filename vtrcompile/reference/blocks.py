"""Eager building blocks of every family's references: image features, prompt embedding, a decoder loop with
explicit positions. The family's module (models/) says where the parts are."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from ..models.family import family_of


def cache_keyword(layer, cache) -> dict:
    """The keyword a decoder layer takes its KV cache by: `cache` where its signature has it (transformers 5.25
    does, and takes the old `past_key_values` with a warning until 5.40), `past_key_values` otherwise."""
    taken = inspect.signature(type(layer).forward).parameters
    return {"cache" if "cache" in taken else "past_key_values": cache}


def language_model(model):
    return family_of(model).language_model(model)


def image_features(model, pixel_values: torch.Tensor, batch: int = 1) -> torch.Tensor:
    """-> [batch, N, D]: the projected image tokens, as the model computes them."""
    return family_of(model).image_features(model, pixel_values, batch)


def layer_additions(model, pixel_values: torch.Tensor, batch: int = 1) -> dict[int, torch.Tensor]:
    """{layer l: [batch, N, D]} added to the image rows after decoder layer l (Qwen3-VL's DeepStack)."""
    return family_of(model).layer_additions(model, pixel_values, batch)


def add_to_image_rows(hidden: torch.Tensor, start: int, n: int, rows: torch.Tensor,
                      present: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [B, S', D] + rows [B, N, D] on its image block of n rows: the rows of the original block rows
    `present` (ascending, n of them; default all N). A block whose rows are not original rows (merged, or new
    tokens: present None after a reduction) takes no addition (the engines refuse such a site)."""
    if present is None:
        assert rows.shape[1] == n, "an addition to image rows that are no longer the original ones"
        present = torch.arange(n)
    assert len(present) == n
    out = hidden.clone()
    out[:, start:start + n] = out[:, start:start + n] + rows[:, present].to(hidden.dtype)
    return out


def embed_prompt(model, input_ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Text embeddings with the image placeholders overwritten, in order, by feats [B, N, D]."""
    embeds = model.model.get_input_embeddings()(input_ids).clone()
    for b in range(input_ids.shape[0]):
        rows = (input_ids[b] == model.config.image_token_id).nonzero().flatten()
        assert len(rows) == feats.shape[1], "prompt must hold exactly N image placeholders"
        embeds[b, rows] = feats[b]
    return embeds


def prompt_positions(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The rotary positions of a prompt's tokens (batch 1): [S] (0..S-1), or [3, S] for mRoPE families."""
    return family_of(model).prompt_positions(model.config, input_ids[0])


def renumbered(pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Positions of the kept `rows` under policy `renumber`: 0..len-1; where positions have several axes
    (mRoPE) the rows keep theirs (docs/methods.md, "Model families")."""
    return pos[..., rows] if pos.dim() > 1 else torch.arange(len(rows))


def batched(positions: torch.Tensor, batch: int) -> torch.Tensor:
    """[S'] -> [B, S'] (HF's position_ids), [3, S'] -> [3, B, S']."""
    return positions.unsqueeze(-2).expand(*positions.shape[:-1], batch, positions.shape[-1])


def image_start(model, input_ids: torch.Tensor) -> int:
    rows = (input_ids[0] == model.config.image_token_id).nonzero().flatten()
    return int(rows[0])


# While a generation reference records (reference/generation.py), every decoder layer run here also
# stores the keys/values of the rows it processed in this HF cache.
KV_RECORDER: ContextVar = ContextVar("kv_recorder", default=None)


def run_layers(model, hidden: torch.Tensor, positions: torch.Tensor, layers: range) -> torch.Tensor:
    """Run decoder layers on hidden [B, S', D] whose rows sit at `positions` [S'] (ascending), or [3, S'].

    The mask is causal over the rows as given (HF's own mask builder would read gaps in the
    positions as packed sequences, so it is not used here).
    """
    cache = KV_RECORDER.get()
    lm = language_model(model)
    n = hidden.shape[1]
    pos = batched(positions, hidden.shape[0])
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    rope = lm.rotary_emb(hidden, pos)
    for i in layers:
        hidden = lm.layers[i](hidden, attention_mask=mask, position_ids=pos, position_embeddings=rope,
                              **cache_keyword(lm.layers[i], cache))
    return hidden


def next_token_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    lm = language_model(model)
    return model.lm_head(lm.norm(hidden[:, -1:, :]))[:, -1, :].float()


def roped_qk(model, layer: int, hidden: torch.Tensor, positions: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder layer `layer`'s queries and keys of `hidden` after RoPE, GQA keys repeated to the query heads:
    ([B, H, S, d], [B, H, S, d]), recomputed from its own projections."""
    lm = language_model(model)
    block = lm.layers[layer]
    att = block.self_attn
    b, s, _ = hidden.shape
    x = block.input_layernorm(hidden)
    q = att.q_proj(x).view(b, s, -1, att.head_dim).transpose(1, 2)
    k = att.k_proj(x).view(b, s, -1, att.head_dim).transpose(1, 2)
    if getattr(att, "q_norm", None) is not None:  # per-head RMSNorm of q and k before RoPE (Qwen3)
        q, k = att.q_norm(q), att.k_norm(k)
    cos, sin = lm.rotary_emb(hidden, batched(positions, b))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, repeat_kv(k, att.num_key_value_groups)


def _attention_logits(model, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Scaled q k^T of decoder layer `layer` [B, H, S, S] in float32."""
    q, k = roped_qk(model, layer, hidden, positions)
    return (q.float() @ k.float().transpose(-1, -2)) * language_model(model).layers[layer].self_attn.scaling


def last_row_attention(model, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Head-mean softmax attention of the last row in decoder layer `layer`: [B, S]."""
    logits = _attention_logits(model, layer, hidden, positions)[:, :, -1, :]
    return torch.softmax(logits, dim=-1).mean(dim=1)


def top_rows_ascending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores of a 1-D tensor, ties to the lower index, sorted ascending."""
    order = torch.sort(-scores, stable=True).indices
    return torch.sort(order[:k]).values


# While a reference runs on a model whose image block holds rows that are not patches (LLaVA-NeXT's row
# ends): a bool [n] over the current block, True where a row is one of those (kept by every method).
PROTECTED: ContextVar = ContextVar("protected_rows", default=None)


@contextmanager
def protecting(mask: torch.Tensor | None) -> Iterator[None]:
    """The body runs with PROTECTED = `mask` (restored on leaving); PROTECTED.get() inside reads the mask of the
    block the body's selections left."""
    token = PROTECTED.set(mask)
    try:
        yield
    finally:
        PROTECTED.reset(token)


def protected_mask(model, n: int) -> torch.Tensor | None:
    """The unreduced block's protected rows (the family's image layout) as a bool [n], or None."""
    layout = family_of(model).image_layout(model.config)
    if not layout or not layout["protected"]:
        return None
    mask = torch.zeros(n, dtype=torch.bool)
    mask[layout["protected"]] = True
    return mask


def patches_present(n: int) -> int:
    """Image tokens of the current n-row block that a method may select among."""
    mask = PROTECTED.get()
    return n if mask is None else n - int(mask.sum())


def patch_rows_present(n: int) -> torch.Tensor:
    """Block rows of the current n-row block that are patches (every row when nothing is protected)."""
    mask = PROTECTED.get()
    return torch.arange(n) if mask is None else (~mask).nonzero().flatten()


def with_protected(picked: torch.Tensor) -> torch.Tensor:
    """Block rows a method keeps: `picked` (block rows of patches) plus every protected row, ascending; the
    next block's protected rows are recorded."""
    mask = PROTECTED.get()
    if mask is None:
        return torch.sort(picked).values
    kept = torch.sort(torch.cat([picked, mask.nonzero().flatten()])).values
    PROTECTED.set(mask[kept])
    return kept


def pick_rows(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The top `keep` patches of the block by score (scores over all n rows), plus every protected row,
    ascending."""
    patches = patch_rows_present(len(scores))
    return with_protected(patches[top_rows_ascending(scores[patches], keep)])


def image_segments(model) -> list[int] | None:
    """Patch counts of the image block's parts (LLaVA-NeXT: base grid, hi-res grid), or None."""
    layout = family_of(model).image_layout(model.config)
    return list(layout["segments"]) if layout else None


def full_logits(model, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """The unmodified model's next-token logits [B, vocab] via the same loop (a sanity anchor)."""
    feats = image_features(model, pixel_values, input_ids.shape[0])
    h = embed_prompt(model, input_ids, feats)
    pos = prompt_positions(model, input_ids)
    adds, start, n = layer_additions(model, pixel_values, input_ids.shape[0]), image_start(model, input_ids), feats.shape[1]
    for layer in range(len(language_model(model).layers)):
        h = run_layers(model, h, pos, range(layer, layer + 1))
        if layer in adds:
            h = add_to_image_rows(h, start, n, adds[layer])
    return next_token_logits(model, h)


def attention_probs(model, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of every row in decoder layer `layer`, head-mean: [B, S, S]."""
    logits = _attention_logits(model, layer, hidden, positions)
    s = logits.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).mean(dim=1)


def pre_rope_keys(model, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """Layer `layer`'s key projection of its input, averaged over key heads: [B, S, head_dim]."""
    block = language_model(model).layers[layer]
    att = block.self_attn
    b, s, _ = hidden.shape
    k = att.k_proj(block.input_layernorm(hidden)).view(b, s, -1, att.head_dim)
    return k.float().mean(dim=2)
