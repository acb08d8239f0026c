"""ONNX Runtime engines with `--weights int8/int4` compressed in blocks of 32 rows throughout (vtrcompile before
2026-12-07) against this version's rule (lower/onnx_weights.py: blocks of 128 where a layer's K is a multiple of 128,
else 32), built from one model and timed in one process, taking turns: what the larger blocks buy.

Each rule's engines (the unmodified one and the --methods) are built into their own folder under --build-dir (a
folder's decode engine is shared by its engines; `optimize` with onnx_weights.LARGE_BLOCK set to 32 for the old
rule). Then, round after round, every engine runs the profile prompt's prefill and a greedy generation of
--new-tokens tokens (generation_backends.py's timers). Printed per engine: TTFT and TPOT p50 and, for a reduced
engine, its TTFT speedup over the same rule's unmodified engine.

Usage: python benchmarks/onnx_nbits_blocks.py --model llava15-geometry --weights int4 [--methods prumerge,fastv]
       [--new-tokens 16 --rounds 6 --reps 3 --build-dir build/nbits-blocks --reuse --out F.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path

import numpy as np
from generation import METHODS, label
from generation_backends import interleaved, timers

from vtrcompile import load_engine
from vtrcompile.engine.runners import read_engine_metadata
from vtrcompile.lower import onnx_weights
from vtrcompile.models.loading import load_model
from vtrcompile.optimize import Target, default_one_file, optimize
from vtrcompile.profile import environment

RULES = {"32": 32, "128": onnx_weights.LARGE_BLOCK}  # rule name -> LARGE_BLOCK (32: every layer in blocks of 32)


@contextlib.contextmanager
def large_block(size: int):
    saved = onnx_weights.LARGE_BLOCK, onnx_weights.BLOCK_RULE
    onnx_weights.LARGE_BLOCK, onnx_weights.BLOCK_RULE = size, [size, onnx_weights.BLOCK]
    try:
        yield
    finally:
        onnx_weights.LARGE_BLOCK, onnx_weights.BLOCK_RULE = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llava15-geometry")
    ap.add_argument("--weights", default="int4", choices=["int8", "int4"])
    ap.add_argument("--methods", default="prumerge", help="comma-separated subset of " + ",".join(m for m, _ in METHODS))
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--build-dir", type=Path, default=Path("build/nbits-blocks"))
    ap.add_argument("--reuse", action="store_true", help="keep engines of the same method and rule already built")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    src = load_model(args.model)
    target = Target(weights=args.weights)
    target = dataclasses.replace(target, one_file=default_one_file(target, src))
    chosen = [("none", {})] + [m for m in METHODS if m[0] in args.methods.split(",")]
    paths: list[tuple[str, str, Path]] = []
    for rule, size in RULES.items():
        with large_block(size):
            for method, opts in chosen:
                out = args.build_dir / f"{args.weights}-blocks-{rule}" / f"{method}.onnx"
                meta = read_engine_metadata(out) if args.reuse and out.is_file() else None
                if not (meta and meta.get("method") == method and meta.get("weights_blocks") == onnx_weights.BLOCK_RULE):
                    out = optimize(src, method, opts, out, target=target).files[-1]
                paths.append((rule, label(method, opts), out))
    engines = [load_engine(p, args.threads) for _, _, p in paths]
    fns = [timers(e, args.new_tokens) for e in engines]
    prefill, total = interleaved(fns, args.rounds, args.reps)
    rows = []
    for (rule, name, path), pr, tot in zip(paths, prefill, total, strict=True):
        ttft, e2e = float(np.median(pr)), float(np.median(tot))
        rows.append({"rule": rule, "method": name, "engine": str(path), "ttft_p50_ms": ttft, "end_to_end_p50_ms": e2e,
                     "tpot_derived_ms": (e2e - ttft) / max(args.new_tokens - 1, 1), "ttft_ms": pr,
                     "end_to_end_ms": tot})
    base = {r["rule"]: r["ttft_p50_ms"] for r in rows if r["method"] == "none"}
    print("| blocks | method | TTFT p50 (ms) | TPOT, derived (ms) | TTFT speedup over the unmodified engine |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        r["ttft_speedup"] = base[r["rule"]] / r["ttft_p50_ms"]
        rule = "32" if r["rule"] == "32" else "128 (rule)"
        print(f"| {rule} | {r['method']} | {r['ttft_p50_ms']:.2f} | {r['tpot_derived_ms']:.3f} | "
              f"{r['ttft_speedup']:.2f}x |")
    if args.out:
        res = {"model": args.model, "weights": args.weights, "new_tokens": args.new_tokens, "rounds": args.rounds,
               "reps": args.reps, "environment": environment(args.threads, engines[0].prefill), "rows": rows}
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
