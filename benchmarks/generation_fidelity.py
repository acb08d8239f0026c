"""How closely low-precision FastV 64 engines of the demo model generate what the float32 spec reference does:
per test prompt, whether the greedy tokens are equal and the largest per-step logit difference, over --steps steps
(the check tests/lower/bf16_generation.py runs on two prompts, here on --count). Next to each prompt, the relative
gap between the 64th and the 65th FastV score in float32: a gap under the engine dtype's rounding can keep another
token, which moves the logits without being a defect of the graph.

Build the engines first, e.g. `vtrcompile optimize models/vqa-synth-llava --method fastv --keep 64 --dtype float16
--out build/f16/fastv.onnx` (or `.pt2`, `.xml`, `--weights int8`); the engines must be FastV at layer 2 keeping 64.

Usage: python benchmarks/generation_fidelity.py ENGINE... [--count 30 --steps 8 --out F.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vtrcompile import load_engine
from vtrcompile.evaluation import VqaSynthItems
from vtrcompile.models.loading import load_model
from vtrcompile.profile import environment
from vtrcompile.reference.blocks import last_row_attention
from vtrcompile.reference.generation import generate_reference
from vtrcompile.reference.methods import fastv_reference, run_stages

MODEL = Path(__file__).resolve().parents[1] / "models" / "vqa-synth-llava"
LAYER, KEEP = 2, 64


def score_gap(model, ids: torch.Tensor, px: torch.Tensor) -> float:
    """(64th - 65th) / 64th of the float32 FastV scores of the image tokens (descending)."""
    scores = []

    def record(layer, h_prev, h, pos, start, n):
        scores.append(last_row_attention(model, layer - 1, h_prev, pos)[0, start:start + n])
        return h, pos, n

    with torch.no_grad():
        run_stages(model, ids, px, sites={LAYER: record})
    top = scores[0].sort(descending=True).values
    return float((top[KEEP - 1] - top[KEEP]) / top[KEEP - 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engines", nargs="+", type=Path)
    ap.add_argument("--count", type=int, default=30)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = load_model(str(MODEL)).eager().hf_model  # float32
    items = VqaSynthItems("test", args.count)
    engines = {str(p): load_engine(p, threads=args.threads) for p in args.engines}
    for path, e in engines.items():
        meta = e.metadata
        if meta.get("method") != "fastv":
            raise SystemExit(f"{path}: a FastV engine is needed (this one: {meta.get('method')})")
    rows = []
    for k in range(args.count):
        ids, px = torch.as_tensor(items[k].ids), torch.as_tensor(items[k].pixels)
        tokens, logits, lengths = generate_reference(
            model, ids, px, lambda m, i, p: fastv_reference(m, i, p, LAYER, KEEP), "keep", args.steps)
        row = {"prompt": k, "score_gap": score_gap(model, ids, px), "engines": {}}
        for path, e in engines.items():
            got = e.generate(input_ids=ids.numpy(), pixel_values=px.numpy(), max_new_tokens=args.steps,
                             eos_token_id=[])
            row["engines"][path] = {
                "same_tokens": got.tokens[0].tolist() == tokens.tolist(),
                "cache_lengths_equal": got.cache_lengths == lengths,
                "max_logit_diff": float(np.abs(got.logits[0] - logits.numpy()).max())}
        rows.append(row)
        print(f"prompt {k:3d}  score gap {row['score_gap']:.1e}  " + "  ".join(
            f"{'=' if r['same_tokens'] else 'x'} {r['max_logit_diff']:.3f}" for r in row["engines"].values()))
    summary = {}
    for path, e in engines.items():
        diffs = [r["engines"][path]["max_logit_diff"] for r in rows]
        summary[path] = {"dtype": e.metadata.get("dtype"), "weights": e.metadata.get("weights"),
                         "same_tokens": sum(r["engines"][path]["same_tokens"] for r in rows),
                         "cache_lengths_equal": sum(r["engines"][path]["cache_lengths_equal"] for r in rows),
                         "max_logit_diff": max(diffs), "median_max_logit_diff": float(np.median(diffs))}
        s = summary[path]
        print(f"{path}: {s['same_tokens']}/{len(rows)} prompts with the reference's tokens, largest per-step logit "
              f"difference {s['max_logit_diff']:.3f} (median over prompts {s['median_max_logit_diff']:.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": environment(args.threads), "steps": args.steps,
                                              "summary": summary, "prompts": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
