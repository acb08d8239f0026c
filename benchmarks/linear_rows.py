"""How fast a preset's LLM linear layers run per row: the decoder's q/k/v/o and SiLU-gated MLP weights, chained
for every layer and compiled by OpenVINO for the CPU, timed at several token counts (rows). A token-reduced
prefill runs these same weights on fewer rows; if the time does not fall in proportion to the rows, the reduced
engine cannot reach its FLOPs-ideal speedup whatever the graph looks like. Attention, norms and the embedding
are left out on purpose: only the linear layers, the bulk of a prefill.

One row times little more than reading the weights once, so it shows the floor every prefill pays whatever its
row count. `--weights int8` compresses the weights with NNCF (int8, per channel) as `optimize --weights int8` does,
to see whether halving the bytes read lowers that floor.

Usage: python benchmarks/linear_rows.py --preset llava15-geometry --dtype bfloat16 [--rows 16,88,631 --weights int8
       --out F]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from vtrcompile.lower.openvino import PRECISIONS
from vtrcompile.models.presets import PRESETS
from vtrcompile.profile import environment

ROWS = [1, 16, 32, 64, 88, 119, 176, 256, 400, 631]


def chain(text: dict, seed: int = 0):
    """An OpenVINO model x [rows, hidden] -> every layer's linear weights applied in turn (random values)."""
    rng = np.random.default_rng(seed)
    h, i, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    kv = h * text.get("num_key_value_heads", text["num_attention_heads"]) // text["num_attention_heads"]

    def weight(a: int, b: int):
        return ops.constant((rng.standard_normal((a, b)) * a ** -0.5).astype(np.float32))

    x = ops.parameter([-1, h], np.float32, name="x")
    y = x
    for _ in range(layers):
        q, k, v = (ops.matmul(y, weight(h, n), False, False) for n in (h, kv, kv))
        y = ops.matmul(ops.add(q, ops.add(ops.reduce_mean(k, -1, True), ops.reduce_mean(v, -1, True))),
                       weight(h, h), False, False)
        gate, up = ops.matmul(y, weight(h, i), False, False), ops.matmul(y, weight(h, i), False, False)
        y = ops.matmul(ops.multiply(ops.swish(gate), up), weight(i, h), False, False)
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    return ov.Model([y], [x]), params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llava15-geometry")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(PRECISIONS))
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default="native", choices=["native", "int8"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    text = PRESETS[args.preset].text
    model, params = chain(text)
    if args.weights == "int8":
        import nncf

        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    config = {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": PRECISIONS[args.dtype][0],
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    weight_bytes = params * (1 if args.weights == "int8" else 2 if args.dtype in ("bfloat16", "float16") else 4)
    rows = []
    for m in map(int, args.rows.split(",")):
        x = np.random.default_rng(m).standard_normal((m, text["hidden_size"])).astype(np.float32)
        for _ in range(5):
            request.infer({0: x})
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            request.infer({0: x})
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        rows.append({"rows": m, "p50_ms": t * 1e3, "tflops": 2 * params * m / t / 1e12,
                     "weight_gb_per_s": weight_bytes / t / 1e9})
    base = max(rows, key=lambda r: r["rows"])
    print(f"{args.preset} LLM linear layers, {params / 1e6:.1f}M weights ({args.weights}), OpenVINO {args.dtype}, "
          f"{args.threads} "
          f"threads; row-proportional time = the time at {base['rows']} rows scaled by rows")
    # a model to check: one read of the weights (the one-row time) plus compute in proportion to the rows,
    # the two not overlapping
    one = min(rows, key=lambda r: r["rows"])
    per_row = (base["p50_ms"] - one["p50_ms"]) / max(base["rows"] - one["rows"], 1)
    print("| rows | p50 ms | TFLOP/s | weights read GB/s | row-proportional time / measured | "
          "(one-row time + rows x per-row) / measured |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ideal = base["p50_ms"] * r["rows"] / base["rows"]
        r["row_ideal_over_measured"] = ideal / r["p50_ms"]
        r["read_plus_rows_over_measured"] = (one["p50_ms"] + per_row * (r["rows"] - one["rows"])) / r["p50_ms"]
        print(f"| {r['rows']} | {r['p50_ms']:.2f} | {r['tflops']:.2f} | {r['weight_gb_per_s']:.1f} | "
              f"{r['row_ideal_over_measured']:.2f} | {r['read_plus_rows_over_measured']:.2f} |")
    if args.out:
        env = {k: v for k, v in environment(args.threads).items() if k != "onnxruntime"}
        env.update(backend="openvino-cpu", openvino=ov.__version__, precision=PRECISIONS[args.dtype][0])
        Path(args.out).write_text(json.dumps({"preset": args.preset, "dtype": args.dtype, "weights": params,
                                              "weight_format": args.weights,
                                              "environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
