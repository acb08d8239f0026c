"""The whole rewrite, as one explicit ordered list of passes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Pass
from .fold_whole_splits import fold_whole_splits
from .insert_cache_outputs import insert_cache_outputs
from .insert_token_reduction import Reduction, insert_token_reduction
from .replace_bool_attention_masks import replace_bool_attention_masks
from .replace_image_index_writes import replace_image_index_writes
from .replace_image_row_additions import replace_image_row_additions
from .replace_masked_scatter import replace_masked_scatter
from .replace_rsqrt_scaling import replace_rsqrt_scaling
from .strip_runtime_asserts import strip_runtime_asserts


def normalizing_passes() -> list[tuple[Pass, Any]]:
    """The passes before any reduction, which leave the model's computation as it is: what `inspect` analyses."""
    return [(strip_runtime_asserts, None), (fold_whole_splits, None), (replace_masked_scatter, None),
            (replace_image_index_writes, None), (replace_image_row_additions, None)]


def build_pipeline(reductions: Sequence[Reduction], attention_modules: Sequence[str],
                   position_input: int | None = None, padding_input: int | None = None
                   ) -> list[tuple[Pass, Any]]:
    """strip asserts -> fold one-chunk splits -> fixed-size image merge and image-row writes -> additions to the image rows as addends -> one reduction per site, shallow to deep -> additive attention masks -> RMSNorm as a division -> KV cache outputs.

    The baseline engine runs the same list with no reductions, so both engines differ only there.
    attention_modules: each decoder layer's attention module path (from the analysis of the unmodified graph).
    position_input: the graph input that holds host-computed (mRoPE) positions [3, B, S], if any.
    padding_input: the graph input that holds a left-padding attention_mask [B, S] (batch engines), if any.
    """
    passes = normalizing_passes()
    for red in sorted(reductions, key=lambda r: r.layer):
        passes.append((insert_token_reduction, red))
    passes.append((replace_bool_attention_masks, None))
    passes.append((replace_rsqrt_scaling, None))
    passes.append((insert_cache_outputs, (list(attention_modules), list(reductions), position_input,
                                           padding_input)))
    return passes
