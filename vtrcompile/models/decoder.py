"""The decode step every family shares: HF's own decoder layers over one cache per layer, each of its own
length (the prefill left each layer the tokens it processed), and what the cache looks like."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .family import family_of


class _PerLayerCache:
    """Duck-typed HF cache: layer i's attention calls update(k, v, i) and attends over what it returns.
    Each layer has its own past length; nothing is shared or padded."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        pk, pv = self.past[layer_idx]
        torch._check(pk.shape[2] == pv.shape[2])
        k, v = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        self.present.append((k, v))
        return k, v


def padding_mask(pads: torch.Tensor | None, length: int, like: torch.Tensor) -> torch.Tensor:
    """The additive mask [B, 1, 1, length] of one new token over a cache of length - 1 plus itself: 0, or the
    dtype's lowest value over the first pads[b] entries of row b (its left padding) when pads is given."""
    b = like.shape[0]
    if pads is None:
        return torch.zeros(b, 1, 1, length, dtype=like.dtype, device=like.device)
    blocked = torch.arange(length, device=like.device)[None, :] < pads[:, None]
    low = torch.tensor(torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
    return torch.where(blocked, low, torch.zeros((), dtype=like.dtype, device=like.device))[:, None, None, :]


class DecodeStep(nn.Module):
    """forward(input_ids [B,1], layer_position_ids [B,L], past k/v per layer [B,kv,P_l,d] ...[, attention_mask
    [B, M]]) -> (logits [B,vocab] float32, present k/v per layer [B,kv,P_l+1,d] ..., layer_position_ids + 1).

    The new token sits at position layer_position_ids[:, l] in layer l and attends to the whole cache of
    that layer plus itself (one query row: no causal mask needed; an all-zero additive mask keeps HF on the
    same expanded-GQA attention path as the prefill, and exports without the NaN guard a boolean one brings).
    With `padded` (engines of batch > 1) it takes the batch's attention_mask last, in Hugging Face's convention
    (the prompt's left-padding mask with a 1 appended per token generated so far, this one included): only
    its zeros are read, as the count of padding entries at the front of every layer's cache.
    """

    def __init__(self, model: nn.Module, padded: bool = False) -> None:
        super().__init__()
        self.model = model
        self.padded = padded

    def forward(self, input_ids: torch.Tensor, layer_position_ids: torch.Tensor, *rest: torch.Tensor):
        lm = family_of(self.model).language_model(self.model)
        past, pads = (rest[:-1], (rest[-1] == 0).sum(dim=1)) if self.padded else (rest, None)
        cache = _PerLayerCache([(past[2 * i], past[2 * i + 1]) for i in range(len(lm.layers))])
        h = lm.embed_tokens(input_ids)
        for i, layer in enumerate(lm.layers):
            pos = layer_position_ids[:, i:i + 1]
            mask = padding_mask(pads, past[2 * i].shape[2] + 1, h)
            h = layer(h, attention_mask=mask, position_ids=pos, past_key_values=cache,
                      position_embeddings=lm.rotary_emb(h, pos))
        logits = self.model.lm_head(lm.norm(h))[:, -1, :].float()
        return (logits, *(t for kv in cache.present for t in kv), layer_position_ids + 1)


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
