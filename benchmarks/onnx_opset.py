"""ONNX Runtime engines at the exporter's default opset against ORT_OPSET, generating in one process, interleaved.

For each method, builds the one-file `.onnx` engine twice into `--work`: at opset 20 (the exporter's default, what
every ONNX Runtime engine was before ORT_OPSET) and at `vtrcompile.lower.onnx.ORT_OPSET`. Reports each engine's
attention nodes (`Attention` / `Softmax`) and `RotaryEmbedding` nodes, checks that both opsets generate the same
greedy tokens with logits within 1e-4, then times them as `generation_backends.py` does: time to first token and
`--new-tokens` tokens, every engine in turn, round after round.

Usage: python benchmarks/onnx_opset.py --model models/vqa-synth-llava --work build/opset [--methods none fastv:keep=64]
       [--rounds 15 --reps 3 --threads 2 --out F.json]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import onnx
from generation_backends import interleaved, timers  # beside this script

from vtrcompile import decode, load_engine
from vtrcompile import optimize as opt
from vtrcompile.engine.host_inputs import prefill_feeds
from vtrcompile.lower.onnx import ORT_OPSET
from vtrcompile.models.loading import load_model
from vtrcompile.profile import environment, profile_prompt

DEFAULT_OPSET = 20


def build(model: str, method: str, options: dict, out: Path, opset: int) -> Path:
    """The one-file engine of `method` at `opset` (the opset the library passes for ONNX Runtime, swapped)."""
    saved = opt.ORT_OPSET, decode.ORT_OPSET
    opt.ORT_OPSET = decode.ORT_OPSET = opset
    try:
        opt.optimize(load_model(model), method, options, out, target=opt.Target(one_file=True))
    finally:
        opt.ORT_OPSET, decode.ORT_OPSET = saved
    return out


def node_counts(path: Path) -> dict[str, int]:
    m = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in m.graph.node]
    for n in m.graph.node:  # a one-file engine: the phases are the branches of one If
        nodes += [x for a in n.attribute if a.g is not None for x in a.g.node]
    c = collections.Counter(n.op_type for n in nodes)
    return {k: c[k] for k in ("Attention", "Softmax", "RotaryEmbedding")}


def parse_method(text: str) -> tuple[str, str, dict]:
    name, _, rest = text.partition(":")
    options = {k: int(v) if v.isdigit() else v for k, v in (kv.split("=") for kv in rest.split(",") if kv)}
    return text.replace(":", "-").replace("=", "").replace(",", "-"), name, options


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--methods", nargs="+", default=["none", "fastv:keep=64"])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    paths: dict[tuple[str, int], Path] = {}
    for spec in args.methods:
        label, method, options = parse_method(spec)
        for opset in (DEFAULT_OPSET, ORT_OPSET):
            out = Path(args.work) / f"opset{opset}" / f"{label}.onnx"
            paths[label, opset] = out if out.is_file() else build(args.model, method, options, out, opset)
    engines = {k: load_engine(p, args.threads) for k, p in paths.items()}
    result: dict = {"model": args.model, "environment": environment(args.threads, next(iter(engines.values())).prefill), "new_tokens": args.new_tokens,
                    "rounds": args.rounds, "reps": args.reps, "engines": {}}
    for label in dict.fromkeys(k[0] for k in paths):
        a, b = engines[label, DEFAULT_OPSET], engines[label, ORT_OPSET]
        ids, pixels = profile_prompt(a.metadata)[:2]
        feeds = prefill_feeds(a.metadata, ids, pixels)
        ga, gb = (e.generate(max_new_tokens=args.new_tokens, eos_token_id=[], **feeds) for e in (a, b))
        same, diff = bool(np.array_equal(ga.tokens, gb.tokens)), float(np.abs(ga.logits - gb.logits).max())
        print(f"{label}: same {args.new_tokens} greedy tokens at both opsets: {same}; logits differ by {diff:.2e}")
        if not same or diff > 1e-4:
            raise SystemExit(f"{label}: the opsets disagree")
        result["engines"][label] = {"same_tokens": same, "max_logit_diff": diff}
    times = interleaved([timers(e, args.new_tokens) for e in engines.values()], args.rounds, args.reps)
    ttft, total = (dict(zip(engines, t, strict=True)) for t in times)
    print("| engine | opset | Attention / Softmax / RotaryEmbedding nodes | TTFT p50 (ms) | "
          f"{args.new_tokens} tokens p50 (ms) |")
    print("|---|---:|---|---:|---:|")
    tokens = f"tokens_{args.new_tokens}_p50_ms"
    for (label, opset), path in paths.items():
        row = {"nodes": node_counts(path), "ttft_p50_ms": float(np.median(ttft[label, opset])),
               tokens: float(np.median(total[label, opset])),
               "ttft_ms": ttft[label, opset], "total_ms": total[label, opset]}
        result["engines"][label][f"opset{opset}"] = row
        n = row["nodes"]
        print(f"| {label} | {opset} | {n['Attention']} / {n['Softmax']} / {n['RotaryEmbedding']} | "
              f"{row['ttft_p50_ms']:.2f} | {row[tokens]:.2f} |")
    for label, r in result["engines"].items():
        new, old = r[f"opset{ORT_OPSET}"], r[f"opset{DEFAULT_OPSET}"]
        print(f"{label}: opset {ORT_OPSET} / opset {DEFAULT_OPSET}: TTFT {new['ttft_p50_ms'] / old['ttft_p50_ms']:.3f}, "
              f"{args.new_tokens} tokens {new[tokens] / old[tokens]:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
