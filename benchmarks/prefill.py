"""Prefill benchmark on a geometry preset (LLaVA-1.5's by default): reduced engines vs the unmodified engine.

Builds every engine with `vtrcompile.optimize`, measures each against the same baseline engine with the
profile protocol (interleaved runs, warm-up discarded), and writes a JSON file plus a markdown table.
Suites: `core` (FastV and G-Prune budgets), `methods` (every method at its defaults and at 64 and 144
final image tokens), `selector` (DivPrune next to Random and G-Prune at the same counts), `families` (the
methods every family supports, at their defaults and at 64 final image tokens, e.g. on internvl-geometry),
`deepstack` (Qwen3-VL: FastV at layer 3, PyramidDrop, VTW: sites after the DeepStack layers; `families` runs the
ones before them).
Usage: python benchmarks/prefill.py --suite methods --reps 10
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from vtrcompile.models.loading import load_model
from vtrcompile.optimize import optimize
from vtrcompile.profile import compare

SUITES = {
    "core": [
        ("fastv", {"layer": 2, "keep": 288}),
        ("fastv", {"layer": 2, "keep": 144}),
        ("fastv", {"layer": 2, "keep": 64}),
        ("gprune", {"keep_ratio": 0.5}),
        ("gprune", {"keep_ratio": 0.25}),
    ],
    # Defaults first, then budgets chosen so the last layers see 144 and 64 image tokens.
    "methods": [
        ("fastv", {}), ("fastv", {"keep": 144}), ("fastv", {"keep": 64}),
        ("gprune", {}), ("gprune", {"keep": 144}), ("gprune", {"keep": 64}),
        ("pumer", {}), ("pumer", {"keep": 144}), ("pumer", {"keep": 64}),
        ("pyramiddrop", {}), ("pyramiddrop", {"keep_ratio": 0.631}), ("pyramiddrop", {"keep_ratio": 0.482}),
        ("vtw", {}),
        ("prumerge", {}), ("prumerge", {"keep": 143}), ("prumerge", {"keep": 63}),
        ("prumerge-plus", {}), ("prumerge-plus", {"keep_ratio": 0.055}),
        ("visionzip", {}), ("visionzip", {"dominant": 122, "contextual": 22}),
    ],
    # DivPrune's selector cost: Random at the same count has the same LLM work and a constant selector, so the
    # p50 difference is DivPrune's selector end to end (ORT's per-node share counts kernel time only); G-Prune
    # at the same count computes the same N x N similarity matmul.
    "selector": [
        ("divprune", {}), ("random", {"keep": 56}), ("gprune", {"keep": 56}),
        ("divprune", {"keep": 144}), ("random", {"keep": 144}),
    ],
    "families": [
        ("fastv", {}), ("gprune", {}), ("pyramiddrop", {}), ("divprune", {}),
        ("fastv", {"keep": 64}), ("gprune", {"keep": 64}), ("divprune", {"keep": 64}),
    ],
    # LLaVA-NeXT (2880 patches + 48 row ends at 672x672): the budgets count patches; the row ends always stay.
    "anyres": [
        ("fastv", {}), ("gprune", {}), ("pyramiddrop", {}), ("divprune", {}), ("fastv", {"keep": 576}),
    ],
    # Qwen3-VL: sites after the DeepStack layers (k = 3 on the preset and on the released models); the `families`
    # suite has the sites before them, whose reductions gather the later DeepStack additions.
    "deepstack": [
        ("fastv", {"layer": 3}), ("fastv", {"layer": 3, "keep": 64}), ("pyramiddrop", {}), ("vtw", {"layer": 6}),
    ],
}


def label(method: str, opts: dict) -> str:
    return method + "".join(f" {k}={v}" for k, v in opts.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llava15-geometry")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    ap.add_argument("--build-dir", default="build/bench")
    ap.add_argument("--suite", choices=list(SUITES), default="core")
    ap.add_argument("--tiles", type=int, default=1, help="images (tiles) per prompt, for families that tile")
    ap.add_argument("--max-prompt", type=int, default=2048, help="longest prompt the engines take")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/prefill-<suite>.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    d = Path(args.build_dir)
    src = load_model(args.preset, tiles=args.tiles)
    t0 = time.perf_counter()
    base = optimize(src, "none", {}, d / "baseline.onnx", max_prompt=args.max_prompt)
    rows = []
    for method, opts in SUITES[args.suite]:
        name = label(method, opts).replace(" ", "_").replace("=", "").replace(".", "")
        res = optimize(src, method, opts, d / f"{name}.onnx", max_prompt=args.max_prompt)
        rep = compare(res.files[-1], base.files[-1], warmup=args.warmup, reps=args.reps, threads=args.threads)
        rep["label"] = label(method, opts)
        rep["preflight_findings"] = [str(f) for f in res.findings]
        rows.append(rep)
        logging.info("%s: %.2fx (ideal %.2fx)", rep["label"], rep["speedup_p50"], rep["flops_ratio"])
    out = {"preset": args.preset, "tiles": args.tiles, "total_s": time.perf_counter() - t0, "runs": rows}
    path = Path(args.out or f"benchmarks/results/prefill-{args.suite}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(markdown(out))


def compact(xs: list[int]) -> str:
    """[576, 576, 64, 64, 64] -> '576x2, 64x3'."""
    out: list[list[int]] = []
    for x in xs:
        if out and out[-1][0] == x:
            out[-1][1] += 1
        else:
            out.append([x, 1])
    return ", ".join(f"{v}x{n}" if n > 1 else str(v) for v, n in out)


def markdown(out: dict) -> str:
    lines = [
        "| method | image tokens into each LLM layer | baseline p50 ms | reduced p50 ms | speedup p50 "
        "| FLOPs-ideal | measured/ideal | selector ms (% of reduced) | gathers ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["runs"]:
        e = r["engines"]
        text = r["prompt_tokens"] - e["reduced"]["image_tokens_in"]
        per_layer = [t - text for t in e["reduced"]["llm_tokens_per_layer"]]
        lines.append(
            f"| {r['label']} | {compact(per_layer)} "
            f"| {e['baseline']['latency']['p50_ms']:.1f} | {e['reduced']['latency']['p50_ms']:.1f} "
            f"| {r['speedup_p50']:.2f}x | {r['flops_ratio']:.2f}x | {r['speedup_p50'] / r['flops_ratio']:.2f} "
            f"| {r['selector']['ms']:.2f} ({100 * r['selector']['share']:.1f}%) | {r['selector']['gather_ms']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
