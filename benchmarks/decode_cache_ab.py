"""Decode engines that append in place (format 4) against those that concatenated (format 3), in one process.

A format-3 decode engine concatenated each layer's cache with the new token's keys and values and returned the whole
cache, which the next step took back as its input: every step copied every layer's cache and had new shapes. A
format-4 one reads fixed-capacity buffers that the host fills (models/decoder.py, engine/kv_cache.py). This script
generates the same tokens both ways from the same prefill engine and times the decode steps, alternating the two
loops over rounds:
- format 4: `Engine.generate`, a step timed from writing the last step's rows into the buffers to the step's end
  (the first step also fills the buffers from the prefill's caches);
- format 3: the loop `generate` ran before (each step's `present.*` fed back as `past_key_values.*`, uncopied),
  on a decode engine kept from an older build (the runners read it; `load_engine` would refuse its format).
It prints per-step medians and the largest difference between the two loops' logits.

Usage: python benchmarks/decode_cache_ab.py PREFILL OLD_DECODE [--new-tokens 32 --rounds 8 --threads 2 --out F.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vtrcompile import load_engine
from vtrcompile.engine.host_inputs import prefill_feeds
from vtrcompile.engine.io import past_names, present_names
from vtrcompile.lower.onnxruntime import OrtEngine
from vtrcompile.lower.openvino import OvEngine
from vtrcompile.profile import environment, profile_prompt


def old_loop(decode, out: dict, n: int, steps: int, mask: np.ndarray | None = None
             ) -> tuple[list[float], np.ndarray]:
    """The format-3 loop: per-step ms and the logits of the steps [steps, B, vocab]. A batch engine's format-3
    decode step took the mask of everything before the new token with a 1 appended for it (`mask`: the prompt's)."""
    times, logits, cur = [], [], out
    for _ in range(steps):
        feeds = {"input_ids": cur["logits"].argmax(-1)[:, None].astype(np.int64),
                 "layer_position_ids": cur["next_layer_position_ids"],
                 **{p: cur[q] for p, q in zip(past_names(n), present_names(n), strict=True)}}
        if mask is not None:
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
            feeds["attention_mask"] = mask
        t0 = time.perf_counter()
        # shared runs as format 3's loop made them: OpenVINO's output views; ONNX Runtime then bound every input
        # anew each run (what its unshared run still does)
        cur = decode.run(feeds, shared=decode.backend == "openvino")
        times.append((time.perf_counter() - t0) * 1e3)
        logits.append(np.array(cur["logits"], dtype=np.float32))
    return times, np.stack(logits)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("prefill")
    ap.add_argument("old_decode")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    engine = load_engine(args.prefill, args.threads)
    runner = OvEngine if args.old_decode.endswith(".xml") else OrtEngine
    old = runner(args.old_decode, args.threads)
    if old.metadata.get("format") != 3 or old.metadata.get("model_id") != engine.metadata["model_id"]:
        raise SystemExit(f"{args.old_decode}: not a format-3 decode engine of {engine.metadata['model']}")
    n = engine.metadata["llm_layers"]
    ids, pixels = profile_prompt(engine.metadata)[:2]
    feeds = prefill_feeds(engine.metadata, ids, pixels)
    mask = feeds.get("attention_mask")  # batch engines: the prompts' padding mask
    steps = args.new_tokens - 1
    engine.generate(max_new_tokens=args.new_tokens, eos_token_id=[], **feeds)  # warm-up, both
    old_loop(old, engine.prefill.run(feeds), n, steps, mask)
    rounds: dict[str, list[float]] = {"format3_concat": [], "format4_in_place": []}
    diff = 0.0
    for _ in range(args.rounds):
        new = engine.generate(max_new_tokens=args.new_tokens, eos_token_id=[], **feeds)
        t_old, lg_old = old_loop(old, engine.prefill.run(feeds), n, steps, mask)
        rounds["format4_in_place"].append(float(np.median(new.decode_ms)))
        rounds["format3_concat"].append(float(np.median(t_old)))
        diff = max(diff, float(np.abs(new.logits[:, 1:].transpose(1, 0, 2) - lg_old).max()))
    med = {k: float(np.median(v)) for k, v in rounds.items()}
    res = {"prefill": args.prefill, "old_decode": args.old_decode, "backend": engine.prefill.backend,
           "dtype": engine.metadata["dtype"], "batch": engine.metadata["batch"], "prompt_tokens": int(ids.shape[1]), "new_tokens": args.new_tokens,
           "environment": environment(args.threads, engine.prefill), "round_step_p50_ms": rounds,
           "median_step_ms": med, "speedup": med["format3_concat"] / med["format4_in_place"],
           "max_logit_diff": diff}
    print(f"{args.prefill} ({res['backend']}, {res['dtype']}), {args.new_tokens} new tokens: step "
          f"{med['format3_concat']:.2f} ms concatenating, {med['format4_in_place']:.2f} ms in place "
          f"({res['speedup']:.2f}x); logits differ by at most {diff:.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
