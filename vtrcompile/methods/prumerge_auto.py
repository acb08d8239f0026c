"""PruMerge `--keep auto`: the IQR outlier count over calibration images, median, fixed at compile time."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import VtrError
from .prumerge import cls_attention, iqr_outlier_count

log = logging.getLogger(__name__)


@torch.no_grad()
def outlier_counts(model, pixel_values: torch.Tensor) -> list[int]:
    """Per image: the IQR outlier count of the CLS attention a that PruMerge computes (LLaVA model)."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    f = model.config.vision_feature_layer
    if not isinstance(f, int):
        raise VtrError("prumerge --keep auto: a list of vision feature layers is not supported")
    hs_index = f if f >= 0 else len(layers) + 1 + f  # hidden_states[i + 1] is layer i's output
    if hs_index >= len(layers):
        raise VtrError("prumerge --keep auto needs a vision layer after the selected feature layer")
    nxt = layers[hs_index]
    counts = []
    for i in range(pixel_values.shape[0]):
        hs = tower(pixel_values[i:i + 1], output_hidden_states=True).hidden_states
        x = nxt.layer_norm1(hs[hs_index])
        a = cls_attention(nxt.self_attn.q_proj(x), nxt.self_attn.k_proj(x))[0]
        counts.append(iqr_outlier_count(a))
    return counts


def auto_keep(model, pixel_values: torch.Tensor) -> tuple[int, list[int]]:
    """(median count rounded half to even, at least 1; the per-image counts)."""
    if model is None:
        raise VtrError("prumerge --keep auto needs an eager model (a preset, HF directory or pickle), "
                       "not an exported program")
    counts = outlier_counts(model, pixel_values)
    keep = max(1, round(float(np.median(counts))))
    log.info("prumerge --keep auto: outlier counts %s -> median %d", counts, keep)
    return keep, counts
