"""Eager references of the vision-site methods (PruMerge, PruMerge+, VisionZip), batch 1, from the spec.

Each method's block (`*_block`: pixels -> the projected rows that replace the image block) is also a first
stage (`vision_stage`) for stacked references and for `search --first`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .blocks import image_start, language_model, next_token_logits, run_layers


def _stable_top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, highest first, ties to the lower index."""
    return torch.sort(-scores, stable=True).indices[:k].tolist()


def _feature_states(model, pixel_values):
    """(hidden state entering the feature layer, feature layer output incl. CLS, feature layer index)."""
    tower = model.model.vision_tower
    hs = tower(pixel_values, output_hidden_states=True).hidden_states
    f = model.config.vision_feature_layer
    # hidden_states[0] is the embeddings; hidden_states[i + 1] is encoder layer i's output.
    layer = (len(hs) + f if f < 0 else f) - 1
    return hs[layer], hs[layer + 1], layer


def _llm_logits(model, input_ids, rows: torch.Tensor) -> torch.Tensor:
    """Prompt with its image block replaced by `rows` [n, D]; positions renumbered 0..S'-1."""
    start = image_start(model, input_ids)
    n = int((input_ids[0] == model.config.image_token_id).sum())
    emb = model.model.get_input_embeddings()(input_ids)
    h = torch.cat([emb[:, :start], rows[None].to(emb.dtype), emb[:, start + n:]], dim=1)
    n_layers = len(language_model(model).layers)
    return next_token_logits(model, run_layers(model, h, torch.arange(h.shape[1]), range(n_layers)))


def _prumerge_tokens(model, pixel_values, kept_of) -> torch.Tensor:
    _, hf, layer = _feature_states(model, pixel_values)
    nxt = model.model.vision_tower.encoder.layers[layer + 1]
    x = nxt.layer_norm1(hf)[0]
    q, k = nxt.self_attn.q_proj(x), nxt.self_attn.k_proj(x)  # [N+1, C]
    a = torch.softmax((q[0] @ k.T) / q.shape[-1] ** 0.5, dim=0)[1:]
    patches = hf[0, 1:]
    n_tok = patches.shape[0]
    kept = kept_of(a, n_tok)
    kn = k[1:] / k[1:].norm(dim=-1, keepdim=True)
    out = []
    for i in kept:
        sims = kn[i] @ kn.T
        sims[i] = float("-inf")
        nb = _stable_top(sims, min(32, n_tok - 1))
        out.append(patches[i] + (a[nb, None] * patches[nb]).sum(dim=0))
    rest = [j for j in range(n_tok) if j not in set(kept)]
    out.append((a[rest, None] * patches[rest]).sum(dim=0))
    return torch.stack(out)


def prumerge_block(model, pixel_values, keep: int) -> torch.Tensor:
    """PruMerge's keep + 1 projected tokens [keep + 1, D]."""
    tokens = _prumerge_tokens(model, pixel_values, lambda a, n: _stable_top(a, keep))
    return model.model.multi_modal_projector(tokens[None])[0]


def prumerge_plus_block(model, pixel_values, ratio: float = 0.125) -> torch.Tensor:
    def kept(a, n):
        step = int(1 / ratio)
        return _stable_top(a, int(n * ratio)) + list(range(step // 2, n - 1, step))

    tokens = _prumerge_tokens(model, pixel_values, kept)
    return model.model.multi_modal_projector(tokens[None])[0]


def visionzip_block(model, pixel_values, dominant: int, contextual: int) -> torch.Tensor:
    h_in, hf, layer = _feature_states(model, pixel_values)
    blk = model.model.vision_tower.encoder.layers[layer]
    att = blk.self_attn
    x = blk.layer_norm1(h_in)[0]
    n1 = x.shape[0]
    q = att.q_proj(x).view(n1, -1, att.head_dim).transpose(0, 1)  # [H, N+1, d]
    k_flat = att.k_proj(x)
    k = k_flat.view(n1, -1, att.head_dim).transpose(0, 1)
    attn = torch.softmax(q @ k.transpose(1, 2) * att.scale, dim=-1)  # [H, N+1, N+1]
    s = attn[:, 0, 1:].sum(dim=0)
    dom = sorted([0] + [i + 1 for i in _stable_top(s, dominant - 1)])
    rest = [i for i in range(n1) if i not in set(dom)]
    step = max(1, len(rest) // contextual)
    targets = rest[::step][:contextual]
    others = [i for i in rest if i not in set(targets)]
    keys = k_flat.view(n1, -1, att.head_dim).mean(dim=1)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    h = hf[0]
    joined: dict[int, list[int]] = {t: [] for t in targets}
    for o in others:
        sims = torch.stack([keys[o] @ keys[t] for t in targets])
        joined[targets[int(torch.argmax(sims))]].append(o)
    ctx = [h[t] + (torch.stack([h[j] for j in joined[t]]).mean(dim=0) if joined[t] else 0) for t in targets]
    tokens = torch.cat([h[dom], torch.stack(ctx)])
    return model.model.multi_modal_projector(tokens[None])[0]


@torch.no_grad()
def prumerge_reference(model, input_ids, pixel_values, keep: int) -> torch.Tensor:
    return _llm_logits(model, input_ids, prumerge_block(model, pixel_values, keep))


@torch.no_grad()
def prumerge_plus_reference(model, input_ids, pixel_values, ratio: float = 0.125) -> torch.Tensor:
    return _llm_logits(model, input_ids, prumerge_plus_block(model, pixel_values, ratio))


@torch.no_grad()
def visionzip_reference(model, input_ids, pixel_values, dominant: int, contextual: int) -> torch.Tensor:
    return _llm_logits(model, input_ids, visionzip_block(model, pixel_values, dominant, contextual))


@dataclass(frozen=True)
class VisionStage:
    """A vision-site method as the first stage of a stacked reference or a search: (model, pixel_values [1, 3,
    H, W]) -> the projected rows [n, D] that replace the image block; every position renumbered after it."""

    block: Callable[..., torch.Tensor]

    def __call__(self, model, pixel_values) -> torch.Tensor:
        return self.block(model, pixel_values)


def vision_stage(reduction) -> VisionStage | None:
    """The eager stage of a planned vision-site Reduction (PruMerge, PruMerge+, VisionZip), or None."""
    o = reduction.options
    if reduction.method == "prumerge":
        return VisionStage(lambda m, px: prumerge_block(m, px, o["keep"]))
    if reduction.method == "prumerge-plus":
        return VisionStage(lambda m, px: prumerge_plus_block(m, px, o["keep_ratio"]))
    if reduction.method == "visionzip":
        return VisionStage(lambda m, px: visionzip_block(m, px, o["dominant"], o["contextual"]))
    return None
