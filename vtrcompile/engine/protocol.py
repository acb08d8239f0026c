"""What every runner shares: host-side checks of a prompt and of named feeds against the engine's `io`."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import VtrError

NUMPY_DTYPES = {"int64": np.int64, "float32": np.float32, "float16": np.float16, "bool": np.bool_}


def check_prompt(input_ids: np.ndarray, image_token_id: int, n_image: int) -> None:
    """The engines assume one contiguous run of exactly N image placeholders per prompt."""
    for b, row in enumerate(input_ids):
        where = np.flatnonzero(row == image_token_id)
        if len(where) != n_image or (len(where) and where[-1] - where[0] != n_image - 1):
            raise VtrError(f"prompt {b}: needs one contiguous run of {n_image} image tokens "
                           f"(id {image_token_id}), found {len(where)}")
        if where[-1] == len(row) - 1:
            raise VtrError(f"prompt {b}: the image block must be followed by at least one text token")
        if len(row) < n_image + 2:
            raise VtrError(f"prompt {b}: {len(row)} tokens; the engine takes at least {n_image + 2} "
                           f"(N={n_image} image tokens and 2 text tokens)")


def check_prompt_range(meta: dict[str, Any], prompt_len: int, new_tokens: int = 0) -> None:
    """A prompt (plus the tokens to generate) must fit the range the engines were built for."""
    lo, hi = meta["prompt_range"]
    if not lo <= prompt_len <= hi:
        raise VtrError(f"the prompt has {prompt_len} tokens; this engine takes {lo}..{hi} (rebuild it with "
                       "`vtrcompile optimize --max-prompt N` for longer prompts)")
    ctx = meta.get("max_context")
    if new_tokens and ctx is not None and prompt_len + new_tokens > ctx:
        raise VtrError(f"{prompt_len} prompt tokens + {new_tokens} new tokens exceed the model's context of {ctx} "
                       "positions; lower --max-new-tokens or shorten the prompt")


def feed_arrays(io: dict[str, Any], feeds: dict[str, Any], passed: set[str] = frozenset()) -> dict[str, np.ndarray]:
    """Feeds by name -> contiguous numpy arrays in the dtypes the engine declares; unknown or missing names
    are errors (a user passing a processor's output sees which key the engine does not take). `passed`:
    names the caller binds itself (runtime-native values)."""
    want = {t["name"]: t for t in io["inputs"] if t["name"] not in passed}
    missing = [n for n in want if n not in feeds]
    extra = [n for n in feeds if n not in want]
    if missing:
        raise VtrError(f"missing engine input(s) {', '.join(missing)}; the engine takes {', '.join(want)}")
    if extra:
        raise VtrError(f"the engine takes no input {', '.join(extra)}; it takes {', '.join(want)}")
    out = {}
    for name, spec in want.items():
        a = as_numeric_array(name, feeds[name])
        dt = NUMPY_DTYPES.get(spec["dtype"])
        if dt is not None and np.issubdtype(dt, np.integer) and a.dtype.kind == "f":
            raise VtrError(f"{name}: integer token ids expected, got {a.dtype}")
        check_shape(name, a.shape, spec["shape"])
        out[name] = np.ascontiguousarray(a if dt is None or a.dtype == dt else a.astype(dt))
    return out


def as_numeric_array(name: str, x: Any) -> np.ndarray:
    """An input (torch tensor, numpy array, nested lists) as a numeric numpy array, or a one-line error.
    bfloat16 tensors, which numpy cannot hold, are widened to float32."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()
    try:
        a = np.asarray(x)
    except ValueError as e:  # ragged nested lists
        raise VtrError(f"{name}: not an array ({e})") from None
    if a.dtype.kind not in "biuf":
        raise VtrError(f"{name}: numbers expected, got {type(x).__name__} of {a.dtype}")
    return a


def check_shape(name: str, shape: tuple[int, ...], declared: list[int | str]) -> None:
    """Rank and every static dim as the engine's io declares (dynamic dims are strings there)."""
    if len(shape) != len(declared) or any(isinstance(d, int) and d != s for s, d in zip(shape, declared,
                                                                                         strict=False)):
        want = "[" + ", ".join(str(d) for d in declared) + "]"
        raise VtrError(f"{name}: shape {list(shape)}; this engine takes {want}")
