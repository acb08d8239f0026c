"""input_ids -> the engine inputs a runner computes on the host (metadata `host_inputs`), in engine order.

An engine takes `input_ids`, `pixel_values` and then, for some families, inputs that are a function of the
prompt and the engine's fixed image geometry: Qwen-VL's mRoPE `position_ids` [3, B, S]. The engine records how
to derive each one (`{"position_ids": {"kind": "mrope", "image_token_id": ..., "grid": [t, h, w], "seq_dim": 2}}`),
so every runner, the Python API and the eager builds compute them the same way, without the model directory.

Engines for several prompts per run (batch > 1) also take `attention_mask` [B, S] (kind `padding`): rows of
different lengths are left-padded to one length, 0 over the padding and 1 over the prompt, as a Hugging Face
tokenizer with `padding_side="left"` returns it. Without one, every row is taken whole (all ones). Right-padded
rows (`padding_side="right"`) are rolled to left padding on the host first (right_padding_shifts).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import VtrError

PADDING = {"attention_mask": {"kind": "padding", "seq_dim": 1}}


def takes_padding(batch: int) -> bool:
    """Whether the engines of `batch` prompts per run (prefill and decode) take a left-padding attention_mask."""
    return batch > 1


def with_padding(spec: dict[str, Any], batch: int) -> dict[str, Any]:
    """A family's host inputs for an engine of `batch` prompts per run: batch > 1 adds `attention_mask` (last)."""
    return {**spec, **PADDING} if takes_padding(batch) else dict(spec)


def padded(spec: dict[str, Any] | None) -> bool:
    """Whether an engine with these host inputs takes left-padded prompts (an `attention_mask` input)."""
    return any(how["kind"] == "padding" for how in (spec or {}).values())


def right_padding_shifts(mask: Any) -> np.ndarray | None:
    """For a 0/1 mask [B, S] in which some row is right-padded (ones, then zeros): how far to roll each row so that
    it is left-padded (zeros, then ones); None when no row is right-padded. A row padded any other way gets 0 and
    is left for check_left_padding to refuse. Rolling changes no token's position: a model numbers each row's
    tokens from its first 1."""
    m = np.asarray(mask)
    if m.ndim != 2 or m.dtype.kind == "f" or not np.isin(m, (0, 1)).all():
        return None
    ones = m.sum(axis=1)
    cols = np.arange(m.shape[1])[None]
    right = (m == (cols < ones[:, None])).all(axis=1) & (ones > 0) & (ones < m.shape[1])
    return np.where(right, m.shape[1] - ones, 0) if right.any() else None


def roll_rows(a: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Each row of a [B, S] rolled right by its shift."""
    return np.stack([np.roll(row, int(k)) for row, k in zip(np.asarray(a), shifts, strict=True)])


def check_left_padding(mask: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
    """attention_mask [B, S] of 0/1 with zeros only before each row's prompt (left padding) -> int64 [B, S],
    or a one-line error that says what is wrong with it."""
    m = np.asarray(mask)
    if m.shape != input_ids.shape:
        raise VtrError(f"attention_mask is {list(m.shape)}, input_ids {list(input_ids.shape)}; give one mask "
                       "value per token")
    if m.dtype.kind == "f" or not np.isin(m, (0, 1)).all():
        raise VtrError("attention_mask holds values other than 0 and 1; pass the tokenizer's mask (1 = token, "
                       "0 = padding)")
    m = m.astype(np.int64)
    if (np.diff(m, axis=1) < 0).any() or (m[:, -1] == 0).any():
        raise VtrError("attention_mask has padding inside a prompt or on both sides of it: pad each prompt on one "
                       "side only (tokenizer padding_side \"left\" or \"right\"), with no zeros between its tokens")
    return m


def derive(spec: dict[str, Any], input_ids: np.ndarray, attention_mask: np.ndarray | None = None
           ) -> dict[str, np.ndarray]:
    """The host inputs of `spec` (an engine's `host_inputs`) for a prompt batch input_ids [B, S] and its
    attention_mask (None: no padding)."""
    mask = None if attention_mask is None else check_left_padding(attention_mask, np.asarray(input_ids))
    out = {}
    for name, how in (spec or {}).items():
        if how["kind"] == "padding":
            out[name] = np.ones(np.shape(input_ids), dtype=np.int64) if mask is None else mask
            continue
        if how["kind"] != "mrope":
            raise VtrError(f"this engine derives {name} by '{how['kind']}', which this vtrcompile does not know; "
                           "upgrade vtrcompile or rebuild the engine")
        from ..models.mrope import mrope_positions

        try:
            out[name] = mrope_positions(input_ids, how["image_token_id"], tuple(how["grid"]), mask)
        except ValueError as e:
            raise VtrError(str(e)) from None
    return out


def prefill_feeds(meta: dict[str, Any], input_ids: np.ndarray, pixel_values: np.ndarray,
                  attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every input of a prefill engine, by name, from the prompt, its pixels and its padding mask (if any)."""
    return {"input_ids": input_ids, "pixel_values": pixel_values,
            **derive(meta.get("host_inputs", {}), input_ids, attention_mask)}


def graph_inputs(spec: dict[str, Any], input_ids: torch.Tensor, pixel_values: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The same, as positional tensors for a captured graph (input_ids' device)."""
    extra = derive(spec, input_ids.cpu().numpy(), None if attention_mask is None else attention_mask.cpu().numpy())
    return (input_ids, pixel_values, *(torch.from_numpy(v).to(input_ids.device) for v in extra.values()))


def seq_dims(spec: dict[str, Any]) -> dict[str, int]:
    """Input name -> the dim that has the prompt length (input_ids' dim 1 and each host input's)."""
    return {"input_ids": 1, **{name: int(how["seq_dim"]) for name, how in (spec or {}).items()}}


def check_processor_extras(meta: dict[str, Any], feeds: dict[str, Any]) -> None:
    """What a Hugging Face processor returns beside input_ids / pixel_values and the engine derives itself:
    `image_grid_thw` must be the engine's fixed grid, `mm_token_type_ids` must mark exactly the image tokens.
    Both are removed from `feeds`."""
    grid = feeds.pop("image_grid_thw", None)
    types = feeds.pop("mm_token_type_ids", None)
    check_image_sizes(meta, feeds)
    spec = next((h for h in (meta.get("host_inputs") or {}).values() if h["kind"] == "mrope"), None)
    if grid is not None:
        if spec is None:
            raise VtrError("the engine takes no image_grid_thw (its image geometry is fixed); drop it")
        want = [1, *(spec["grid"][1:])]  # the merged grid's t is the patch grid's
        got = np.asarray(grid).reshape(-1, 3)
        merge = meta["processor"]["merge_size"] if meta.get("processor") else 2
        patch = [[int(r[0]), int(r[1]) // merge, int(r[2]) // merge] for r in got]
        if any(p != want for p in patch):
            h, w = spec["grid"][1] * merge, spec["grid"][2] * merge
            raise VtrError(f"image_grid_thw {got.tolist()}: this engine takes one image of 1 x {h} x {w} patches "
                           f"per prompt; resize the image to the engine's size (processor size "
                           "{'height': H, 'width': W}) or build an engine for this size (--image-size)")
    if types is not None:
        ids = np.asarray(feeds["input_ids"])
        t = np.asarray(types).reshape(ids.shape) if np.asarray(types).size == ids.size else None
        if t is None or not np.array_equal(t != 0, ids == meta["image_token_id"]):
            raise VtrError("mm_token_type_ids does not mark exactly the image tokens of input_ids; the engines take "
                           "one image per prompt and no video")


def check_image_sizes(meta: dict[str, Any], feeds: dict[str, Any]) -> None:
    """LLaVA-NeXT's processor returns `image_sizes` [B, 2] and pixel_values [B, tiles, 3, s, s]: the sizes must
    be the engine's fixed one (removed from `feeds`), the pixels are flattened to [B * tiles, 3, s, s]."""
    proc = meta.get("processor") or {}
    if "tile_size" not in proc:  # not a tiling family: image_sizes stays an unknown input, refused by name
        return
    sizes = feeds.pop("image_sizes", None)
    if sizes is not None:
        want = proc.get("image_size")
        got = np.asarray(sizes).reshape(-1, 2).tolist() if np.asarray(sizes).size % 2 == 0 else None
        if got is None or any(g != want for g in got):
            raise VtrError(f"image_sizes {np.asarray(sizes).tolist()}: this engine takes images of {want[0]}x{want[1]} "
                           f"px; resize each image to that size before the processor (the engine's layout is fixed), "
                           "or build an engine for the size (--image-size)")
    px = feeds.get("pixel_values")
    shape = meta.get("pixel_shape")
    if px is not None and shape and np.ndim(px) == len(shape) + 2 and list(np.shape(px)[2:]) == list(shape):
        feeds["pixel_values"] = np.asarray(px).reshape(-1, *shape)
