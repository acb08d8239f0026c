"""Decode engines of one model timed against each other in one process: the same cache (one prefill of the
profile prompt, in buffers with room for 32 new tokens), each engine's isolated step (`time_ms`), alternating engines over rounds so that drift in this
machine's memory bandwidth hits all of them alike. For A/B comparisons of two builds of the decode graph (e.g.
one written by an older vtrcompile); a step's time is only comparable within one run of this script.

A DECODE that is a one-file engine (ONNX Runtime) is timed as its decode phase. `--no-mem-pattern` also times each
ONNX Runtime engine in a second session with ONNX Runtime's memory pattern turned off (`enable_mem_pattern`: the
plan of one arena block for every intermediate tensor, reused by each run of the same shapes; without it each
intermediate is allocated on its own): what a one-file engine's decode phase, an `If` branch, costs against the
pair.

`--numpy-feeds` also times each OpenVINO engine fed the way OpenVINO's Python API is fed by default (a dict of
numpy arrays, which it copies into fresh tensors where the engine takes bfloat16), against the zero-copy tensors
`OvEngine.bind` makes: what that binding saves per step.

Usage: python benchmarks/decode_step.py PREFILL DECODE_A [DECODE_B ...] [--rounds 12 --reps 12 --numpy-feeds
       --no-mem-pattern --out F.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vtrcompile.engine.generate import decode_dtype, decode_feeds
from vtrcompile.engine.host_inputs import prefill_feeds
from vtrcompile.engine.kv_cache import KvCache
from vtrcompile.engine.runners import open_engine
from vtrcompile.profile import environment, profile_prompt


def numpy_feeds_timer(engine, feeds: dict) -> Callable[[], float]:
    """One step of `engine` (an OvEngine) fed a dict of numpy arrays, as OpenVINO's Python API is fed by default,
    on a request of its own; outputs left in OpenVINO's buffers as `time_ms` leaves them."""
    request = engine.compiled.create_infer_request()
    arrays = {k: (v.view(torch.float16) if v.dtype == torch.bfloat16 else v).numpy() if isinstance(v, torch.Tensor)
              else np.asarray(v) for k, v in feeds.items()}

    def step() -> float:
        t0 = time.perf_counter()
        request.start_async(arrays, share_inputs=True)  # run as OvEngine runs it (no dict of the outputs)
        request.wait()
        return (time.perf_counter() - t0) * 1e3
    return step


def open_decode(path: str, threads: int, mem_pattern: bool = True):
    """A decode engine, or a one-file engine's decode phase; `mem_pattern=False` (ONNX Runtime only): its session
    made with ONNX Runtime's memory pattern off."""
    import vtrcompile.lower.onnxruntime as ort_runner
    from vtrcompile.engine.metadata import is_one_file

    plain = ort_runner._thread_options

    def without_pattern(so, n: int) -> None:
        plain(so, n)
        so.enable_mem_pattern = False

    if not mem_pattern:
        ort_runner._thread_options = without_pattern
    try:
        engine = open_engine(path, threads)
    finally:
        ort_runner._thread_options = plain
    return engine.decode_view() if is_one_file(engine.metadata) else engine


def profile_step_feeds(prefill, decode) -> tuple[dict, np.ndarray]:
    """The feeds of the first decode step after one prefill of the profile prompt, in cache buffers with room for
    32 new tokens (as `generate --max-new-tokens 33` makes them), and the prompt's ids."""
    ids, pixels = profile_prompt(prefill.metadata)[:2]
    out = prefill.run(prefill_feeds(prefill.metadata, ids, pixels))
    cache = KvCache(out, prefill.metadata["llm_layers"], decode_dtype(decode.metadata), 32)
    return decode_feeds(out, out["logits"].argmax(-1), cache), ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("prefill")
    ap.add_argument("decode", nargs="+")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--reps", type=int, default=12, help="timed steps per engine and round (3 more as warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--numpy-feeds", action="store_true")
    ap.add_argument("--no-mem-pattern", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    prefill = open_engine(args.prefill, args.threads)
    decodes = [(p, open_decode(p, args.threads)) for p in args.decode]
    if args.no_mem_pattern:
        decodes += [(f"{p} (no memory pattern)", open_decode(p, args.threads, mem_pattern=False))
                    for p, d in list(decodes) if d.backend == "onnxruntime"]
    feeds, ids = profile_step_feeds(prefill, decodes[0][1])
    timers, labels = [], []
    for p, d in decodes:
        d.bind(feeds)
        timers.append(d.time_ms)
        labels.append(p)
        if args.numpy_feeds and d.backend == "openvino":
            timers.append(numpy_feeds_timer(d, feeds))
            labels.append(f"{p} (numpy feeds)")
    rounds: list[list[float]] = [[] for _ in timers]
    for _ in range(args.rounds):
        for t, r in zip(timers, rounds, strict=True):
            r.append(float(np.median([t() for _ in range(args.reps + 3)][3:])))
    res = {"prefill": args.prefill, "prompt_tokens": int(ids.shape[1]),
           "environment": environment(args.threads, decodes[0][1]),
           "engines": [{"decode": p, "round_p50_ms": r, "median_ms": float(np.median(r))}
                       for p, r in zip(labels, rounds, strict=True)]}
    for e in res["engines"]:
        print(f"{e['decode']}: {e['median_ms']:.3f} ms (rounds {' '.join(f'{x:.3f}' for x in e['round_p50_ms'])})")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
