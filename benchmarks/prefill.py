"""Prefill benchmark on the LLaVA-1.5-geometry preset: FastV and G-Prune vs the unmodified engine.

Builds every engine with `vtrcompile.optimize`, measures each against the same baseline engine with the
profile protocol (interleaved runs, warm-up discarded), and writes benchmarks/results/prefill.json plus a
markdown table. Usage: python benchmarks/prefill.py [--reps 20] [--preset llava15-geometry]
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

CONFIGS = [
    ("fastv", {"layer": 2, "keep": 288}),
    ("fastv", {"layer": 2, "keep": 144}),
    ("fastv", {"layer": 2, "keep": 64}),
    ("gprune", {"keep_ratio": 0.5}),
    ("gprune", {"keep_ratio": 0.25}),
]


def label(method: str, opts: dict) -> str:
    return method + "".join(f" {k}={v}" for k, v in opts.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llava15-geometry")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--build-dir", default="build/bench")
    ap.add_argument("--out", default="benchmarks/results/prefill.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    d = Path(args.build_dir)
    src = load_model(args.preset)
    t0 = time.perf_counter()
    base = optimize(src, "none", {}, d / "baseline.onnx")
    rows = []
    for method, opts in CONFIGS:
        name = label(method, opts).replace(" ", "_").replace("=", "")
        res = optimize(src, method, opts, d / f"{name}.onnx")
        rep = compare(res.files[-1], base.files[-1], warmup=args.warmup, reps=args.reps)
        rep["label"] = label(method, opts)
        rep["preflight_findings"] = [str(f) for f in res.findings]
        rows.append(rep)
        logging.info("%s: %.2fx (ideal %.2fx)", rep["label"], rep["speedup_p50"], rep["flops_ratio"])
    out = {"preset": args.preset, "total_s": time.perf_counter() - t0, "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(markdown(out))


def markdown(out: dict) -> str:
    lines = [
        "| method | image tokens kept | tokens into last layer | baseline p50 ms | reduced p50 ms | speedup p50 "
        "| FLOPs-ideal | measured/ideal | selector ms (% of reduced) | gathers ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["runs"]:
        e = r["engines"]
        kept = e["reduced"]["llm_tokens_per_layer"][-1] - (r["prompt_tokens"] - e["reduced"]["image_tokens_in"])
        lines.append(
            f"| {r['label']} | {kept} | {e['reduced']['llm_tokens_per_layer'][-1]} "
            f"| {e['baseline']['latency']['p50_ms']:.1f} | {e['reduced']['latency']['p50_ms']:.1f} "
            f"| {r['speedup_p50']:.2f}x | {r['flops_ratio']:.2f}x | {r['speedup_p50'] / r['flops_ratio']:.2f} "
            f"| {r['selector']['ms']:.2f} ({100 * r['selector']['share']:.1f}%) | {r['selector']['gather_ms']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
