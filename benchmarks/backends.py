"""The same reduced and unmodified graphs on each backend this machine can run: prefill speedup per backend.

    python benchmarks/backends.py --model models/vqa-synth-llava --device cpu
    python benchmarks/backends.py --model llava15-geometry --device cuda --dtype float16   # on a GPU machine

ONNX Runtime (CPU), OpenVINO (.xml, CPU) and AOTInductor (.pt2, CPU or CUDA); TensorRT (.plan) where
TensorRT and a GPU exist.
Writes benchmarks/results/backends-<model>-<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from vtrcompile.errors import VtrError
from vtrcompile.models.loading import load_model
from vtrcompile.optimize import Target, optimize
from vtrcompile.profile import compare

CONFIGS = [("fastv", {"keep": 64}), ("gprune", {"keep": 64}), ("pyramiddrop", {}), ("prumerge", {})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/vqa-synth-llava")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--build-dir", default="build/backends")
    ap.add_argument("--out", default=None)
    ap.add_argument("--backends", default=None, help="comma-separated subset of aoti, onnxruntime, openvino, openvino-int8")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    d = Path(args.build_dir)
    ap_backends = args.backends.split(",") if args.backends else None
    backends = [("aoti", ".pt2", "none")] + ([("onnxruntime", ".onnx", "none"), ("openvino", ".xml", "none"),
                                              ("openvino", ".xml", "int8")] if args.device == "cpu"
                                             else [("tensorrt", ".plan", "none")])
    backends = [b for b in backends if ap_backends is None
                or (b[0] if b[2] == "none" else f"{b[0]}-{b[2]}") in ap_backends]
    rows = []
    for backend, ext, weights in backends:
        t = Target(backend=backend, device=args.device, dtype=args.dtype, max_prompt=1024, weights=weights)
        tag = backend if weights == "none" else f"{backend}-{weights}"
        try:
            src = load_model(args.model)
            t0 = time.perf_counter()
            base = d / f"{tag}-baseline{ext}"
            optimize(src, "none", {}, base, target=t)
            base_s = time.perf_counter() - t0
        except VtrError as e:
            logging.warning("%s: skipped (%s)", backend, e)
            continue
        for method, opts in CONFIGS:
            out = d / f"{tag}-{method}{ext}"
            t0 = time.perf_counter()
            optimize(src, method, opts, out, target=t)
            build_s = time.perf_counter() - t0
            rep = compare(out, base, 3, args.reps)
            e = rep["engines"]
            label = rep["environment"]["backend"] + ("" if weights == "none" else f" ({weights} weights)")
            rows.append({"backend": label, "method": method, "options": opts,
                         "baseline_p50_ms": e["baseline"]["latency"]["p50_ms"],
                         "reduced_p50_ms": e["reduced"]["latency"]["p50_ms"], "speedup_p50": rep["speedup_p50"],
                         "flops_ratio": rep["flops_ratio"], "build_s": build_s, "baseline_build_s": base_s,
                         "environment": rep["environment"]})
            logging.info("%s %s: %.2fx", tag, method, rep["speedup_p50"])
    name = Path(args.model).name
    out = Path(args.out or f"benchmarks/results/backends-{name}-{args.device}.json")
    out.write_text(json.dumps({"model": args.model, "device": args.device, "dtype": args.dtype, "rows": rows},
                              indent=1))
    print("| backend | method | baseline p50 (ms) | reduced p50 (ms) | speedup | FLOPs-ideal | build (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        opts = " ".join(f"{k}={v}" for k, v in r["options"].items())
        print(f"| {r['backend']} | {r['method']} {opts} | {r['baseline_p50_ms']:.1f} | {r['reduced_p50_ms']:.1f} | "
              f"{r['speedup_p50']:.2f}x | {r['flops_ratio']:.2f}x | {r['build_s']:.0f} |")


if __name__ == "__main__":
    main()
