"""Eager reference of generation with the reduced KV cache (docs/methods.md, "Generation"), batch 1.

The prefill is any method's eager reference, run while an HF DynamicCache records what every decoder
layer processed. Decoding then follows the spec's text, not the engines: token t sits at position S + t
in every layer (policy `keep`; with mRoPE, the prompt's last position + 1 + t) or S_l + t (policy
`renumber`), attends to its layer's cache plus the tokens generated before it, and nothing is re-selected.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache

from .blocks import KV_RECORDER, cache_keyword, language_model, prompt_positions


@torch.no_grad()
def generate_reference(model, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                       prefill: Callable[..., torch.Tensor], positions: str | Callable, steps: int
                       ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """-> (tokens [steps], logits [steps, vocab] float32, cache length per layer after the prefill)."""
    lm = language_model(model)
    cache = DynamicCache()
    token = KV_RECORDER.set(cache)
    try:
        logits = prefill(model, input_ids, pixel_values)
    finally:
        KV_RECORDER.reset(token)
    # The first new token's position under `keep`: the prompt's last position + 1 (S for 1-D positions; with
    # mRoPE the unreduced prompt's numbering continues, as the model's rope_deltas do).
    s = int(prompt_positions(model, input_ids)[..., -1].max()) + 1
    lengths = [int(cache.layers[i].keys.shape[2]) for i in range(len(lm.layers))]
    if callable(positions):  # a stacked reduction: each layer's first position, from (S, cache lengths)
        start = list(positions(s, lengths))
    else:
        start = [s if positions == "keep" else n for n in lengths]
    tokens, out = [], [logits[0].float()]
    for t in range(steps):
        tokens.append(int(out[-1].argmax()))
        if t == steps - 1:
            break
        h = lm.embed_tokens(torch.tensor([[tokens[-1]]]))
        for i, layer in enumerate(lm.layers):
            pos = torch.tensor([[start[i] + t]])
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos),
                      **cache_keyword(layer, cache))
        out.append(model.lm_head(lm.norm(h))[0, -1].float())
    return torch.tensor(tokens), torch.stack(out), lengths
