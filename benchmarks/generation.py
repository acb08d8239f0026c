"""Generation benchmark: TTFT, time per output token, end to end for N new tokens and KV-cache bytes,
reduced engine pairs vs the unmodified pair, same backend and precision (ONNX Runtime f32 by default;
`--ext .xml --dtype bfloat16` for OpenVINO bf16, the fastest CPU path on an AMX Xeon), same prompt.

Also, for the LLaVA-1.5-7B architecture (built on the meta device, nothing exported): the KV bytes per
sequence each method leaves, from the rewritten graph's per-layer token counts, and how many sequences'
caches fit in 40 GB (computed from shapes, not measured).

Usage: python benchmarks/generation.py --model llava15-geometry --new-tokens 32 --reps 10
       python benchmarks/generation.py --model models/vqa-synth-llava
       python benchmarks/generation.py --model llava15-geometry --ext .xml --dtype bfloat16
       python benchmarks/generation.py --model llava15-geometry --weights int8     (ONNX Runtime, int8 weights; or int4)
       python benchmarks/generation.py --model llava15-geometry --batch 4 --methods prumerge,fastv
       python benchmarks/generation.py --kv-7b
       (--build-only builds the engines and times nothing; --reuse keeps engines of this format already built;
       .onnx engines are one-file engines, as `optimize` writes them; --two-files builds prefill/decode pairs)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from vtrcompile.engine.io import FORMAT_VERSION
from vtrcompile.engine.runners import read_engine_metadata
from vtrcompile.models.loading import load_model
from vtrcompile.optimize import Target, backend_for, default_one_file, optimize
from vtrcompile.profile import compare

METHODS = [
    ("fastv", {"keep": 64}),
    ("pyramiddrop", {}),
    ("prumerge", {}),
    ("gprune", {}),
]


def label(method: str, opts: dict) -> str:
    return method + "".join(f" {k}={v}" for k, v in opts.items())


def engine(src, method: str, opts: dict, path: Path, target: Target, reuse: bool) -> Path:
    """Build the engine at `path`, or with `reuse` keep one already there of this vtrcompile's engine format, the
    same method and options, with its decode engine beside it."""
    meta = read_engine_metadata(path) if reuse and path.is_file() else None
    if meta and meta.get("format") == FORMAT_VERSION and meta.get("method") == method and \
            meta.get("options") == opts and (path.parent / meta["decode"]["file"]).is_file():
        logging.info("%s: reused", path)
        return path
    return optimize(src, method, opts, path, target=target).files[-1]


def run(model: str, new_tokens: int, reps: int, warmup: int, build_dir: Path, kv_budget_gb: float,
        ext: str = ".onnx", dtype: str = "float32", batch: int = 1, methods: list[str] | None = None,
        reuse: bool = False, build_only: bool = False, two_files: bool = False, weights: str = "none") -> dict:
    src = load_model(model, batch=batch)
    target = Target(backend=backend_for(Path("e" + ext), None), dtype=dtype, weights=weights)
    if not two_files:  # what `optimize` writes by default
        target = dataclasses.replace(target, one_file=default_one_file(target, src))
    base = engine(src, "none", {}, build_dir / f"baseline{ext}", target, reuse)
    rows = []
    for method, opts in [m for m in METHODS if methods is None or m[0] in methods]:
        name = label(method, opts).replace(" ", "_").replace("=", "")
        red = engine(src, method, opts, build_dir / f"{name}{ext}", target, reuse)
        if build_only:
            continue
        rep = compare(red, base, warmup=warmup, reps=reps, new_tokens=new_tokens,
                      kv_budget_gb=kv_budget_gb, selector_reps=3)
        rep["label"] = label(method, opts)
        rows.append(rep)
        g = rep["generation"]
        logging.info("%s: TTFT %.2fx, TPOT %.2fx, e2e %.2fx, KV %.3f", rep["label"], rep["speedup_p50"],
                     g["decode_speedup_p50"], g["end_to_end_speedup_p50"], g["kv_ratio"])
    return {"model": model, "new_tokens": new_tokens, "backend": target.backend, "dtype": dtype, "batch": batch,
            "weights": weights, "one_file": target.one_file, "runs": rows}


def kv_7b(new_tokens: int, budget_gb: float) -> dict:
    """Per-sequence KV bytes (fp16/bf16) of the 7B architecture's reduced graphs, from their shapes."""
    from vtrcompile.build import build
    from vtrcompile.models.decoder import cache_geometry

    src = load_model("llava15-7b")
    geo = cache_geometry(src.hf_model)
    s = src.example_inputs[0].shape[1]
    prompt = 631  # LLaVA-1.5's system prompt + 576 image tokens + a question
    rows = []
    for method, opts in [("none", {}), *METHODS]:
        b = build(src, method, opts, max_prompt=2048)
        drop = [s - t for t in b.llm_tokens(s)]
        per_token = 2 * geo["kv_heads"] * geo["head_dim"] * 2  # keys and values, 2 bytes each
        cached = [prompt - d + new_tokens for d in drop]
        kv = per_token * sum(cached)
        rows.append({"label": label(method, opts), "cached_tokens_per_layer": cached, "kv_bytes": kv,
                     "sequences_in_budget": int(budget_gb * 1e9 // kv)})
        logging.info("7B %s: %.1f MB per sequence", method, kv / 1e6)
    return {"architecture": "llava15-7b (CLIP-L/14-336 + Llama-7B, 32 layers x 32 kv heads x 128)",
            "prompt_tokens": prompt, "new_tokens": new_tokens, "dtype_bytes": 2, "budget_gb": budget_gb, "rows": rows}


def markdown(out: dict) -> str:
    lines = [f"model `{out['model']}`, {out['runs'][0]['prompt_tokens']}-token prompt, {out['new_tokens']} new tokens, "
             f"{out['runs'][0]['environment']['threads']} threads, {out['runs'][0]['environment']['backend']}, "
             f"{out.get('dtype', 'float32')}, {out.get('weights', 'none')} weights, batch {out.get('batch', 1)} "
             "(KV per sequence)", "",
             "| method | TTFT p50 ms (base / reduced) | TTFT speedup | FLOPs-ideal | TPOT p50 ms (base / reduced) "
             "| TPOT speedup | end to end ms (base / reduced) | e2e speedup | KV after prefill MB (base / reduced) "
             "| KV ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["runs"]:
        e, g = r["engines"], r["generation"]
        gb, gr = g["engines"]["baseline"], g["engines"]["reduced"]
        lines.append(
            f"| {r['label']} | {e['baseline']['latency']['p50_ms']:.1f} / {e['reduced']['latency']['p50_ms']:.1f} "
            f"| {r['speedup_p50']:.2f}x | {r['flops_ratio']:.2f}x "
            f"| {gb['decode_step']['p50_ms']:.2f} / {gr['decode_step']['p50_ms']:.2f} | {g['decode_speedup_p50']:.2f}x "
            f"| {gb['end_to_end']['p50_ms']:.0f} / {gr['end_to_end']['p50_ms']:.0f} | {g['end_to_end_speedup_p50']:.2f}x "
            f"| {gb['kv_bytes_after_prefill'] / 1e6:.2f} / {gr['kv_bytes_after_prefill'] / 1e6:.2f} "
            f"| {g['kv_ratio']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llava15-geometry")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--kv-budget-gb", type=float, default=40.0)
    ap.add_argument("--build-dir", default="build/bench-gen")
    ap.add_argument("--kv-7b", action="store_true", help="only the 7B KV-bytes table (from shapes)")
    ap.add_argument("--ext", default=".onnx", choices=[".onnx", ".xml", ".pt2"], help="engine type (backend)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=1, help="prompts per run the engines are built for")
    ap.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(m for m, _ in METHODS))
    ap.add_argument("--reuse", action="store_true", help="keep engines already built (this engine format, same method)")
    ap.add_argument("--build-only", action="store_true", help="build (or --reuse) the engines, time nothing")
    ap.add_argument("--two-files", action="store_true", help=".onnx: prefill/decode pairs instead of one-file engines")
    ap.add_argument("--weights", default="none", choices=["none", "int8", "int4"], help="weight compression (optimize --weights)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    if args.kv_7b:
        out = kv_7b(args.new_tokens, args.kv_budget_gb)
        path = Path(args.out or "benchmarks/results/generation-kv-7b.json")
    else:
        tag = "" if (args.ext, args.dtype) == (".onnx", "float32") else f"-{args.ext[1:]}-{args.dtype}"
        tag += f"-b{args.batch}" if args.batch > 1 else ""
        tag += "-two-files" if args.two_files and args.ext == ".onnx" else ""
        tag += f"-{args.weights}" if args.weights != "none" else ""
        out = run(args.model, args.new_tokens, args.reps, args.warmup,
                  Path(args.build_dir) / (Path(args.model).name + tag), args.kv_budget_gb, args.ext, args.dtype,
                  args.batch, args.methods.split(",") if args.methods else None, args.reuse, args.build_only,
                  args.two_files, args.weights)
        if args.build_only:
            return
        path = Path(args.out or f"benchmarks/results/generation-{Path(args.model).name}{tag}.json")
        print(markdown(out))
    out["total_s"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
