"""Scale check: the LLaVA-1.5-7B architecture through `inspect` and `optimize` to ONNX (external data).

Records wall time per stage and the process's peak resident memory. Weights are random: bfloat16 on
the CPU (`--weights bf16`, the ONNX gets ~14 GB of external data), or the meta device (`--weights meta`,
the ONNX holds the graph only). Usage: python benchmarks/scale_7b.py --weights bf16 --out-dir build/scale
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path

import torch

from vtrcompile.build import build, prompt_range
from vtrcompile.capture import capture, editable_module
from vtrcompile.inspect_report import facts_report
from vtrcompile.lower.onnx import ORT_OPSET, export_onnx
from vtrcompile.lower.tensorrt_preflight import preflight
from vtrcompile.models.loading import ModelSource, NextTokenLogits, example_prompt
from vtrcompile.models.presets import build_preset
from vtrcompile.optimize import engine_metadata
from vtrcompile.passes.analysis import analyze
from vtrcompile.passes.strip_runtime_asserts import strip_runtime_asserts


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", choices=["bf16", "meta"], default="bf16")
    ap.add_argument("--out-dir", default="build/scale")
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("onnxscript").setLevel(logging.WARNING)
    stages: dict[str, float] = {}
    t = time.perf_counter()
    device, dtype = ("meta", torch.float32) if args.weights == "meta" else ("cpu", torch.bfloat16)
    model = build_preset("llava15-7b", device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    src = ModelSource(f"preset:llava15-7b ({args.weights})", "preset", NextTokenLogits(model), None,
                      example_prompt(model.config), hf_model=model)
    stages["build_model_s"] = time.perf_counter() - t

    t = time.perf_counter()  # what `vtrcompile inspect` does
    ep = capture(src)
    gm = editable_module(ep)
    strip_runtime_asserts(gm)
    report = facts_report(gm, analyze(gm), prompt_range(ep))
    stages["inspect_s"] = time.perf_counter() - t
    del ep, gm

    t = time.perf_counter()  # what `vtrcompile optimize --method fastv --keep K` does
    b = build(src, "fastv", {"layer": 2, "keep": args.keep})
    stages["capture_passes_reexport_s"] = time.perf_counter() - t
    t = time.perf_counter()
    meta = engine_metadata(b, src)
    stages["metadata_flops_hash_s"] = time.perf_counter() - t
    t = time.perf_counter()
    out = Path(args.out_dir) / f"llava15-7b-fastv{args.keep}-{args.weights}.onnx"
    files = export_onnx(b.program, out, meta, opset=ORT_OPSET)
    stages["onnx_export_s"] = time.perf_counter() - t
    findings = preflight(out)
    result = {
        "weights": args.weights, "parameters": n_params, "graph_nodes": len(b.program.graph.nodes),
        "decoder_layers": len(report["decoder_layers"]), "n_image": report["boundary"]["n_image"],
        "llm_tokens_631": b.llm_tokens(631)[:4], "stages": stages, "total_s": sum(stages.values()),
        "peak_rss_gb": peak_rss_gb(), "files": {str(f): f.stat().st_size for f in files},
        "preflight_findings": [str(f) for f in findings], "gflop_prefill_631": (
            meta["flops_poly"][0] + meta["flops_poly"][1] * 631 + meta["flops_poly"][2] * 631**2) / 1e9,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.result:
        Path(args.result).write_text(text)


if __name__ == "__main__":
    main()
