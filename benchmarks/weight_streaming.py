"""Why a reduced prefill with few rows left misses its FLOPs-ideal speedup on a CPU: the LLM's weights.

A FLOPs count scales with the rows the LLM processes; the bytes of weight the runtime reads per prefill do not
(every linear layer's weight is read once, whatever the row count). With many rows the matmuls are compute
bound and the weight reads hide behind them; with few rows (PruMerge leaves 88 of 631 on llava15-geometry) they
no longer do. This script isolates that: a chain of MatMuls with the shapes and total size of one model's MLP
weights (every weight distinct, as in the engine, so none stays in cache), timed in ONNX Runtime at several row
counts. Its rates equal the engine's MLP rows in an ORT node profile (BENCHMARKS.md). `--backend openvino-bf16`
runs the same chain in OpenVINO with bf16 weights (half the bytes) and bf16 compute.

The control, timed in the same run at every row count: a chain of one layer (3 weights: 19 MB in f32, 9 MB in
bf16), whose weights stay in this CPU's last-level cache from one run to the next. It runs the same kernels on
the same shapes, so its time times the layer count is the chain's time without reading weights from memory;
the difference is what reading the distinct weights costs. Each timed run also pays a fixed cost of its own
(handing the input over and the output back: about 6 us in ONNX Runtime, 65-160 us in OpenVINO), measured with
a one-Identity model of the same input and counted once, not once per layer. (A chain whose layers all share
one weight set is no control: OpenVINO repacks the weights of each node separately.)

Usage: python benchmarks/weight_streaming.py --preset llava15-geometry --rows 631 88 32 [--backend openvino-bf16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from vtrcompile.models.presets import preset_config
from vtrcompile.profile import environment


def mlp_chain(rows: int, layers: int, hidden: int, inner: int) -> bytes:
    """x [rows, hidden] through `layers` MLPs without their activation: gate and up [hidden, inner] both applied
    to the layer's input, their sum through down [inner, hidden]; 3 distinct weights per layer, as in the LLM."""
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"

    def weight(name: str, k: int, n: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np.float32), name))
        return name

    for i in range(layers):
        nodes += [helper.make_node("MatMul", [x, weight(f"gate{i}", hidden, inner)], [f"g{i}"]),
                  helper.make_node("MatMul", [x, weight(f"up{i}", hidden, inner)], [f"u{i}"]),
                  helper.make_node("Add", [f"g{i}", f"u{i}"], [f"s{i}"]),
                  helper.make_node("MatMul", [f"s{i}", weight(f"down{i}", inner, hidden)], [f"h{i}"])]
        x = f"h{i}"
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "mlp_chain", [value("x", TensorProto.FLOAT, [rows, hidden])],
                              [value(x, TensorProto.FLOAT, [rows, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model.SerializeToString()


def runner(model: bytes, backend: str, threads: int):
    """A callable running the chain once: ONNX Runtime f32, or OpenVINO with weights and compute in bf16."""
    if backend == "onnxruntime":
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {"x": x})
    import openvino as ov

    core = ov.Core()
    net = core.read_model(model=model)
    compiled = core.compile_model(net, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "bf16"})
    request = compiled.create_infer_request()
    return lambda x: request.infer({"x": x})


def identity_model(rows: int, hidden: int) -> bytes:
    """x [rows, hidden] -> the same: what a run costs besides its ops."""
    value = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [value("x", TensorProto.FLOAT, [rows, hidden])],
                              [value("y", TensorProto.FLOAT, [rows, hidden])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model.SerializeToString()


def p50_seconds(model: bytes, rows: int, hidden: int, threads: int, reps: int, backend: str) -> float:
    run = runner(model, backend, threads)
    x = np.random.default_rng(1).standard_normal((rows, hidden)).astype(np.float32)
    for _ in range(3):
        run(x)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def time_chain(rows: int, layers: int, hidden: int, inner: int, threads: int, reps: int,
               backend: str = "onnxruntime") -> dict:
    p50 = p50_seconds(mlp_chain(rows, layers, hidden, inner), rows, hidden, threads, reps, backend)
    flops = layers * 3 * 2 * rows * hidden * inner
    weight_bytes = layers * 3 * hidden * inner * (4 if backend == "onnxruntime" else 2)
    return {"rows": rows, "layers": layers, "p50_ms": p50 * 1e3, "gflops_per_s": flops / p50 / 1e9,
            "weight_mb": weight_bytes / 1e6, "weight_gb_per_s": weight_bytes / p50 / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llava15-geometry")
    ap.add_argument("--rows", type=int, nargs="+", default=[631, 88, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "openvino-bf16"],
                    help="ONNX Runtime f32, or OpenVINO with bf16 weights and compute (needs a CPU with native bf16)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    text = preset_config(args.preset).text_config
    layers, hidden, inner = text.num_hidden_layers, text.hidden_size, text.intermediate_size
    rows, resident, per_run = [], [], []
    for r in args.rows:  # the chain and its control alternate, so a drift of the machine hits both alike
        rows.append(time_chain(r, layers, hidden, inner, args.threads, args.reps, args.backend))
        resident.append(time_chain(r, 1, hidden, inner, args.threads, args.reps * 4, args.backend))
        per_run.append(1e3 * p50_seconds(identity_model(r, hidden), r, hidden, args.threads, args.reps * 10,
                                         args.backend))
    base = rows[0]
    for r, c, o in zip(rows, resident, per_run, strict=True):
        r["time_ratio_vs_first"] = base["p50_ms"] / r["p50_ms"]
        r["rows_ratio_vs_first"] = base["rows"] / r["rows"]
        r["run_overhead_ms"] = o
        r["resident_ms"] = (c["p50_ms"] - o) * layers + o  # the control's layer, times the layers; one run's cost
    for r in rows:
        r["resident_time_ratio_vs_first"] = base["resident_ms"] / r["resident_ms"]
        r["reading_weights_ms"] = r["p50_ms"] - r["resident_ms"]
        print(f"{r['rows']:5d} rows: {r['p50_ms']:7.2f} ms, {r['gflops_per_s']:4.0f} GFLOP/s, "
              f"{r['weight_mb']:.0f} MB of weights at {r['weight_gb_per_s']:.1f} GB/s; "
              f"{r['time_ratio_vs_first']:.2f}x faster for {r['rows_ratio_vs_first']:.2f}x fewer rows")
        print(f"       weights in cache (one layer x {layers}): {r['resident_ms']:7.2f} ms, "
              f"{r['resident_time_ratio_vs_first']:.2f}x faster; reading the weights adds "
              f"{r['reading_weights_ms']:.2f} ms ({r['reading_weights_ms'] / r['p50_ms']:.0%})")
    suffix = "" if args.backend == "onnxruntime" else f"-{args.backend}"
    out = Path(args.out or f"benchmarks/results/weight-streaming-{args.preset}{suffix}.json")
    out.write_text(json.dumps({"preset": args.preset, "backend": args.backend, "llm_layers": layers, "hidden": hidden, "inner": inner,
                               "environment": environment(args.threads), "rows": rows,
                               "one_layer_control": resident}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
