"""Prompt -> the 3-axis rotary positions (temporal, height, width) of Qwen-VL-style models, on the host.

Text tokens take the same position on all three axes and count up by one. The image block of a grid of
t x h x w merged tokens takes (start + t_i, start + h_i, start + w_i); the text after it continues from
start + max(t, h, w). This is what `get_rope_index` of Qwen2-VL / Qwen2.5-VL computes for one image per
prompt (tests compare the two); engines take the result as their `position_ids` input, so the data-dependent
part never enters a graph.
"""

from __future__ import annotations

import numpy as np


def mrope_positions(input_ids: np.ndarray, image_token_id: int, grid: tuple[int, int, int],
                    attention_mask: np.ndarray | None = None) -> np.ndarray:
    """input_ids [B, S] with one contiguous block of t*h*w image tokens per row; grid (t, h, w) of the merged
    tokens (the vision grid divided by the merge size) -> int64 [3, B, S]. With a left-padding attention_mask
    [B, S], each row's prompt starts after its padding and is numbered from 0 there; padding tokens take position 1,
    as `get_rope_index` gives them (no query attends to them)."""
    ids = np.atleast_2d(np.asarray(input_ids))
    if attention_mask is not None:
        mask = np.atleast_2d(np.asarray(attention_mask))
        out = np.ones((3, *ids.shape), dtype=np.int64)
        for r in range(ids.shape[0]):
            pad = int((mask[r] == 0).sum())
            try:
                out[:, r, pad:] = mrope_positions(ids[r:r + 1, pad:], image_token_id, grid)[:, 0]
            except ValueError as e:
                raise ValueError(str(e).replace("prompt 0", f"prompt {r}")) from None
        return out
    t, h, w = (int(g) for g in grid)
    b, s = ids.shape
    out = np.empty((3, b, s), dtype=np.int64)
    n = t * h * w
    block = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(3, n)
    for r in range(b):
        where = np.flatnonzero(ids[r] == image_token_id)
        if len(where) != n or (n and where[-1] - where[0] != n - 1):
            raise ValueError(f"prompt {r}: needs one contiguous block of {n} image tokens, found {len(where)}")
        start = int(where[0])
        out[:, r, :start] = np.arange(start)
        out[:, r, start:start + n] = start + block
        after = s - start - n
        out[:, r, start + n:] = start + max(t, h, w) + np.arange(after)
    return out
