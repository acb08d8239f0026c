"""A prefill engine + the decode engine it pairs with -> a generating engine, the public Python API.

    engine = load_engine("build/fastv.onnx")
    engine(input_ids=..., pixel_values=...)                   # prefill alone: next-token logits [B, vocab]
    out = engine.generate(input_ids=..., pixel_values=..., max_new_tokens=32)   # greedy
    out = engine.generate(..., temperature=0.7, top_p=0.9, seed=0)             # sampled
    out.tokens, out.logits                                    # [B, T] int64, [B, T, vocab] float32
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import VtrError
from .host_inputs import check_processor_extras, derive, padded, right_padding_shifts, roll_rows
from .kv_cache import KvCache
from .metadata import is_one_file
from .protocol import as_numeric_array, check_prompt, check_prompt_range
from .runners import open_engine
from .sampling import Sampling, choose

log = logging.getLogger(__name__)

# Cache buffers are sized in multiples of this many rows, so generations of similar prompt lengths and token counts
# reuse the last one's buffers: no allocation (8-27 ms of fresh pages for 23 MB of bf16 caches, `llava15-geometry`)
# and no new inputs for the runtime to plan for (OpenVINO took 16-28 ms more on a step whose buffers were new).
CACHE_ROWS_ROUND = 32


@dataclass
class GenerateOutput:
    tokens: np.ndarray  # int64 [B, T], EOS included when it was produced
    logits: np.ndarray  # float32 [B, T, vocab]: the engine's logits each token was chosen from (before sampling)
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)  # one per decode step (writing its input rows included)
    cache_lengths: list[int] = field(default_factory=list)  # per layer, after the prefill
    eos_reached: bool = False  # every sequence ended with an EOS token
    # per row: tokens up to and including its first EOS (T when it has none); a row that ends before the others
    # keeps being decoded (the batch runs together), and its tokens after `lengths[i]` mean nothing
    lengths: list[int] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)  # per row: it produced an EOS token
    stopped: bool = False  # on_token asked to stop
    choose_ms: float = 0.0  # choosing the tokens on the host (argmax or sampling), every step together


def cache_length(kv: Any) -> int:
    """Cache length of a [B, heads, S, d] output (a numpy array, torch tensor or ONNX Runtime OrtValue)."""
    shape = kv.shape() if callable(getattr(kv, "shape", None)) else kv.shape
    return int(shape[2])


def decode_feeds(out: dict[str, Any], token: np.ndarray, cache: KvCache, attention_mask: np.ndarray | None = None
                 ) -> dict[str, Any]:
    """The decode engine's inputs for `token` [B] after a prefill or decode step's outputs `out`: its next
    positions, the cache's buffers and filled lengths, and for a padded (batch) engine the prompt's
    attention_mask, the same every step."""
    feeds = {"input_ids": token[:, None].astype(np.int64), "layer_position_ids": out["next_layer_position_ids"],
             **cache.feeds()}
    if attention_mask is not None:
        feeds["attention_mask"] = attention_mask
    return feeds


def decode_dtype(decode_meta: dict[str, Any]) -> str:
    """The dtype of the decode engine's cache inputs."""
    return next(t["dtype"] for t in decode_meta["io"]["inputs"] if t["name"].startswith("past_key_values."))


class Engine:
    """A vtrcompile prefill engine and (lazily) its decode engine."""

    def __init__(self, path: str | Path, threads: int | None = None, prefill: Any = None) -> None:
        """`prefill`: the runner of `path` where the caller has opened it already (each runner holds its own copy
        of the weights, so a second one would double them)."""
        self.path = Path(path)
        self.prefill = prefill if prefill is not None else open_engine(self.path, threads)
        self.metadata: dict[str, Any] = self.prefill.metadata
        if self.metadata.get("role") != "prefill":
            raise VtrError(f"{self.path} is a decode engine; load the prefill engine that pairs with it "
                           "(the file `vtrcompile optimize --out` wrote)")
        self._threads = threads
        self._decode: Any = None
        self._kv: KvCache | None = None  # the last generation's buffers, reused by the next one of the same shapes
        self.padded = padded(self.metadata.get("host_inputs"))  # takes left-padded prompts (a batch engine)

    @property
    def decode_path(self) -> Path:
        d = self.metadata.get("decode")
        if not d:
            raise VtrError(f"{self.path}: built from an exported program, it has no decode engine; build it from "
                           "a Hugging Face directory, a preset or a pickled module to generate")
        return self.path.parent / d["file"]

    @property
    def decode(self):
        """The decode engine beside the prefill, checked to pair with it before any run."""
        if self._decode is None and is_one_file(self.metadata):
            self._decode = self.prefill.decode_view()  # a one-file engine: the decode phase of the same session
        if self._decode is None:
            p = self.decode_path
            if not p.is_file():
                raise VtrError(f"{self.path}: its decode engine {p.name} is missing from {p.parent}; rebuild with "
                               "`vtrcompile optimize` (it writes both) or copy the file next to the prefill engine")
            decode = open_engine(p, self._threads)  # an unreadable file or another format: one line
            meta = decode.metadata
            want = {"role": "decode", "model_id": self.metadata["model_id"], "dtype": self.metadata.get("dtype"),
                    "weights": self.metadata.get("weights"), "batch": self.metadata.get("batch"),
                    "backend": self.metadata.get("backend"), "llm_layers": self.metadata.get("llm_layers")}
            bad = [f"{k} {meta.get(k)!r} (prefill: {v!r})" for k, v in want.items() if meta.get(k) != v]
            takes_mask = "attention_mask" in [t["name"] for t in meta["io"]["inputs"]]
            if takes_mask != self.padded:
                bad.append(f"attention_mask {'taken' if takes_mask else 'not taken'} (prefill: "
                           f"{'left-padded' if not takes_mask else 'unpadded'} prompts)")
            if bad:
                raise VtrError(f"{p} does not pair with {self.path.name}: {', '.join(bad)}; rebuild both with "
                               "`vtrcompile optimize`")
            self._decode = decode
        return self._decode

    def _inputs(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        feeds = {k: as_numeric_array(k, v) for k, v in inputs.items()}
        mask = feeds.pop("attention_mask", None)
        if mask is not None and not self.padded:
            if not np.all(mask == 1):
                raise VtrError("attention_mask has zeros: a batch-1 engine takes one prompt without padding; pass it "
                               "unpadded (engines built with --batch B > 1 take left-padded prompts)")
            mask = None  # all ones: the engine takes no mask
        ids = feeds.get("input_ids")
        if ids is None:
            raise VtrError("input_ids is required")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.dtype.kind == "f":
            raise VtrError(f"input_ids: integer token ids [batch, length] expected, got {ids.dtype} {list(ids.shape)}")
        feeds["input_ids"] = ids.astype(np.int64)
        if mask is not None and mask.size == ids.size:
            mask = mask.reshape(ids.shape)  # a 1-D mask beside 1-D ids
        shifts = None if mask is None else right_padding_shifts(mask)
        if shifts is not None:  # right-padded rows -> left-padded ones, with every per-token input beside them
            feeds = {k: roll_rows(v, shifts) if np.shape(v) == ids.shape else v for k, v in feeds.items()}
            mask = roll_rows(mask, shifts)
        check_prompt(feeds["input_ids"], self.metadata["image_token_id"], self.metadata["n_image"])
        check_processor_extras(self.metadata, feeds)
        # derive checks the mask (left padding, 0/1, shape) and passes it on as the engine's attention_mask
        for name, value in derive(self.metadata.get("host_inputs", {}), feeds["input_ids"], mask).items():
            feeds.setdefault(name, value)
        if mask is not None and \
                ((feeds["input_ids"] == self.metadata["image_token_id"]) & (feeds["attention_mask"] == 0)).any():
            raise VtrError("attention_mask marks image tokens as padding; pad before the prompt, and mark every "
                           "prompt token (the image block included) with 1")
        return feeds

    def __call__(self, **inputs: Any) -> np.ndarray:
        """The prefill alone: next-token logits [B, vocab] float32."""
        feeds = self._inputs(inputs)
        check_prompt_range(self.metadata, feeds["input_ids"].shape[1])
        # shared: the caches this call does not return are not copied; astype copies the logits out
        return self.prefill.run(feeds, shared=True)["logits"].astype(np.float32)

    def generate(self, max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 on_token: Callable[[np.ndarray], Any] | None = None, **inputs: Any) -> GenerateOutput:
        """Prefill, then one decode step per new token, until EOS, max_new_tokens or on_token's stop.
        eos_token_id defaults to the model's (recorded in the engine); [] never stops early.
        temperature 0 (the default) is greedy; above 0 each token is drawn from the logits divided by it, cut to
        top_k and top_p (engine/sampling.py), with numpy's generator seeded by `seed` (None: fresh entropy).
        on_token(tokens) is called with each step's tokens, int64 [B], before the next step; a true return
        ends the generation there."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise VtrError(f"max_new_tokens {max_new_tokens}: give at least 1")
        sampling = Sampling(temperature, top_k, top_p, seed)
        if on_token is not None and not callable(on_token):
            raise VtrError(f"on_token {on_token!r}: give a function of each step's tokens, or None")
        rng = None if sampling.greedy else sampling.rng()
        feeds = self._inputs(inputs)
        s = feeds["input_ids"].shape[1]
        check_prompt_range(self.metadata, s, max_new_tokens)
        eos = set(self.metadata.get("eos_token_ids", []) if eos_token_id is None else
                  ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id))
        decode = self.decode if max_new_tokens > 1 else None
        rows = getattr(decode, "max_cache_rows", None)  # a TensorRT decode engine's profile bounds its buffers
        if rows is not None and s + max_new_tokens - 1 > rows:
            raise VtrError(f"{s} prompt tokens + {max_new_tokens} new tokens need cache buffers of "
                           f"{s + max_new_tokens - 1} rows; the decode engine {self.decode_path.name} was built for "
                           f"at most {rows}: lower --max-new-tokens or rebuild with a larger --max-prompt")
        n = self.metadata["llm_layers"]
        mask = feeds.get("attention_mask") if self.padded else None
        t0 = time.perf_counter()
        out = self.prefill.run(feeds, shared=True)  # read into the cache buffers before any other run
        prefill_ms = (time.perf_counter() - t0) * 1e3
        b = feeds["input_ids"].shape[0]
        cache = [cache_length(out[f"present.{i}.key"]) for i in range(n)]
        tokens, logits, steps = [], [], []
        done = np.zeros(b, dtype=bool)
        lengths = np.zeros(b, dtype=np.int64)
        kv: KvCache | None = None
        stopped, choose_ms = False, 0.0
        while True:
            lg = out["logits"].astype(np.float32)
            tc = time.perf_counter()
            tok = choose(lg, sampling, rng)
            choose_ms += (time.perf_counter() - tc) * 1e3
            tokens.append(tok)
            logits.append(lg)
            lengths[~done] += 1
            done |= np.isin(tok, list(eos))
            stopped = on_token is not None and bool(on_token(tok.copy()))
            if stopped or done.all() or len(tokens) == max_new_tokens:
                break
            t1 = time.perf_counter()  # a step's time includes writing the last step's rows into the cache
            if kv is None:  # buffers for every row this call appends, filled in place from here on
                ctx = self.metadata.get("max_context")
                limit = rows if rows is not None else (ctx - 1 if ctx else None)  # the decode engine's range
                kv = KvCache(out, n, decode_dtype(decode.metadata), max_new_tokens - 1, CACHE_ROWS_ROUND, limit,
                             self._kv)
                self._kv = kv
            else:
                kv.append(out)
            out = decode.run(decode_feeds(out, tok, kv, mask), shared=True)
            steps.append((time.perf_counter() - t1) * 1e3)
        return GenerateOutput(np.stack(tokens, axis=1), np.stack(logits, axis=1), prefill_ms, steps, cache,
                              bool(done.all()), lengths.tolist(), done.tolist(), stopped, choose_ms)


def load_engine(path: str | Path, threads: int | None = None) -> Engine:
    """Open a vtrcompile engine for inference and generation (any backend that runs on this machine)."""
    return Engine(path, threads)
