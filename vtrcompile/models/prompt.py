"""Prompt layout, shared by every family: [prefix][N image placeholders][suffix] (a family's start/end
markers around the block are text tokens in the prefix and suffix)."""

from __future__ import annotations

from typing import Any

import numpy as np


def layout_prompt(prefix, suffix, n_image: int, image_token_id: int) -> np.ndarray:
    """The family's prompt layout, built here and nowhere else: [prefix][n_image placeholders][suffix].
    `prefix`/`suffix`: token ids, [B, k] arrays or flat lists (one row) -> int64 [B, S]."""
    pre, suf = np.atleast_2d(np.asarray(prefix, dtype=np.int64)), np.atleast_2d(np.asarray(suffix, dtype=np.int64))
    if pre.size == 0:
        pre = pre.reshape(suf.shape[0], 0)
    if suf.size == 0:
        suf = suf.reshape(pre.shape[0], 0)
    return np.concatenate([pre, np.full((pre.shape[0], n_image), image_token_id, dtype=np.int64), suf], axis=1)


def random_text_ids(rng: np.random.Generator, image_token_id: int, vocab: int, shape) -> np.ndarray:
    """Seeded text token ids that are never the image placeholder."""
    return (image_token_id + 1 + rng.integers(0, vocab - 1, shape)) % vocab


def random_prompt(rng: np.random.Generator, facts: dict[str, Any], prefix: int, suffix: int, batch: int = 1
                  ) -> np.ndarray:
    """[prefix random text ids][N placeholders][suffix random text ids], int64 [batch, S]; `facts` as
    `prompt_facts` (or an engine's metadata)."""
    img, vocab = facts["image_token_id"], facts["vocab"]
    pre = random_text_ids(rng, img, vocab, (batch, prefix))
    return layout_prompt(pre, random_text_ids(rng, img, vocab, (batch, suffix)), facts["n_image"], img)


def padding_kwargs(attention_mask: Any) -> dict[str, Any]:
    """The model's keyword inputs for a left-padded batch: the mask, and positions that start at 0 on each row's
    first token, as Hugging Face generate gives them (padding tokens take 0 here and 1 there; no query attends
    to them)."""
    if attention_mask is None:
        return {}
    return {"attention_mask": attention_mask, "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)}
