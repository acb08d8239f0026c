"""The LLaVA family (LlavaForConditionalGeneration: CLIP/SigLIP tower, MLP projector, Llama/Qwen2/Mistral LLM):
what generation needs to know about it: the decode step over per-layer caches, cache geometry, EOS, the
prompt layout and image preprocessing that an engine records so it can run without the model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..calibration import CLIP_MEAN, CLIP_STD

# LLaVA-1.5's conversation layout, used when the tokenizer has no chat template.
DEFAULT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


def image_token_count(config) -> int:
    """Placeholders per image (CLS removed unless the feature strategy is 'full')."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + 1 if config.vision_feature_select_strategy == "full" else n


def prompt_facts(config) -> dict[str, Any]:
    """What a valid prompt is, in the engine metadata's words: N, the placeholder id, vocab, pixel shape."""
    size = config.vision_config.image_size
    return {"n_image": image_token_count(config), "image_token_id": int(config.image_token_id),
            "vocab": int(config.text_config.vocab_size), "pixel_shape": [3, size, size]}


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


def language_model(model: nn.Module) -> nn.Module:
    return model.model.language_model


class DecodeStep(nn.Module):
    """forward(input_ids [B,1], layer_position_ids [B,L], past k/v per layer [B,kv,P_l,d] ...) ->
    (logits [B,vocab] float32, present k/v per layer [B,kv,P_l+1,d] ..., layer_position_ids + 1).

    The new token sits at position layer_position_ids[:, l] in layer l and attends to the whole cache of
    that layer plus itself (one query row: no causal mask needed; an all-true mask keeps HF on the same
    expanded-GQA attention path as the prefill).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, layer_position_ids: torch.Tensor, *past: torch.Tensor):
        lm = language_model(self.model)
        cache = _PerLayerCache([(past[2 * i], past[2 * i + 1]) for i in range(len(lm.layers))])
        h = lm.embed_tokens(input_ids)
        for i, layer in enumerate(lm.layers):
            pos = layer_position_ids[:, i:i + 1]
            mask = torch.ones(h.shape[0], 1, 1, past[2 * i].shape[2] + 1, dtype=torch.bool, device=h.device)
            h = layer(h, attention_mask=mask, position_ids=pos, past_key_values=cache,
                      position_embeddings=lm.rotary_emb(h, pos))
        logits = self.model.lm_head(lm.norm(h))[:, -1, :].float()
        return (logits, *(t for kv in cache.present for t in kv), layer_position_ids + 1)


def cache_geometry(model: nn.Module) -> dict[str, int]:
    """Layers, key/value heads and head size of the LLM's cache, and the longest context it positions."""
    tc = model.config.text_config
    heads = tc.num_attention_heads
    return {"llm_layers": tc.num_hidden_layers, "kv_heads": getattr(tc, "num_key_value_heads", None) or heads,
            "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            "max_context": int(tc.max_position_embeddings)}


def eos_token_ids(model: nn.Module) -> list[int]:
    """EOS ids from the generation config, else the text config; [] when the model names none."""
    for cfg in (getattr(model, "generation_config", None), model.config.text_config, model.config):
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    return []


def processor_facts(model: nn.Module, model_dir: Path | None) -> dict[str, Any]:
    """How `generate` turns an image and a text into engine inputs, recorded in the engine."""
    vc = model.config.vision_config
    mean, std = list(CLIP_MEAN), list(CLIP_STD)
    if model_dir is not None and (model_dir / "preprocessor_config.json").is_file():
        try:
            pc = json.loads((model_dir / "preprocessor_config.json").read_text())
            mean, std = pc.get("image_mean", mean), pc.get("image_std", std)
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return {"image_size": int(vc.image_size), "image_mean": mean, "image_std": std,
            "template": DEFAULT_TEMPLATE}
