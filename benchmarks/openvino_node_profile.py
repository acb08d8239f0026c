"""Where an OpenVINO prefill spends its time, unmodified engine vs reduced, by kind of work (PERF_COUNT).

Each compiled node's time is summed per region: the linear layers are told apart by their weight's shape
(the LLM's MLP, its attention projections, the vision tower's, the lm_head, from the preset's config; the
projector's second linear has the attention projections' shape and counts with them), every other node by its
OpenVINO layer type. Per region: milliseconds per prefill in both engines and their ratio, to set against the
ratio of the rows each engine's LLM processes. Median over `--reps` runs after warm-up.

Usage: python benchmarks/openvino_node_profile.py --preset llava15-geometry --method prumerge --dtype bfloat16
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
from pathlib import Path

import numpy as np

from vtrcompile.engine.host_inputs import prefill_feeds
from vtrcompile.lower.openvino import OvEngine
from vtrcompile.models.loading import load_model
from vtrcompile.models.presets import preset_config
from vtrcompile.optimize import Target, optimize
from vtrcompile.profile import environment, profile_prompt


def linear_regions(preset: str) -> dict[frozenset, str]:
    """Weight shape (as a set of its two dims) -> region, for the linear layers of a LLaVA-style preset."""
    cfg = preset_config(preset)
    text, vision = cfg.text_config, cfg.vision_config
    return {frozenset((text.hidden_size, text.intermediate_size)): "linear: LLM MLP",
            frozenset((text.hidden_size,)): "linear: LLM attention projections",
            frozenset((text.hidden_size, text.num_key_value_heads * text.hidden_size // text.num_attention_heads)):
                "linear: LLM attention projections",
            frozenset((text.hidden_size, text.vocab_size)): "linear: lm_head",
            frozenset((vision.hidden_size,)): "linear: vision tower",
            frozenset((vision.hidden_size, vision.intermediate_size)): "linear: vision tower"}


def region_times(engine: OvEngine, regions: dict[frozenset, str], warmup: int, reps: int) -> dict[str, float]:
    """Region -> median milliseconds per prefill, from OpenVINO's per-node counters."""
    ops = {op.get_friendly_name(): op for op in engine.compiled.get_runtime_model().get_ordered_ops()}

    def region(name: str, node_type: str) -> str:
        op = ops.get(name)
        if op is None or op.get_rt_info()["layerType"].astype(str) != "FullyConnected":
            return node_type
        w = op.input(1).get_partial_shape()
        dims = frozenset(int(d.get_length()) for d in w if d.is_static) if w.rank.is_static else frozenset()
        return regions.get(dims, f"linear: other {sorted(dims)}")

    ids, px = profile_prompt(engine.metadata)
    feeds = prefill_feeds(engine.metadata, ids, px)
    for _ in range(warmup):
        engine.run(feeds)
    per = collections.defaultdict(list)
    for _ in range(reps):
        engine.run(feeds)
        acc: collections.Counter = collections.Counter()
        for p in engine.request.profiling_info:
            acc[region(p.node_name, p.node_type)] += p.real_time.total_seconds() * 1e3
        for k, v in acc.items():
            per[k].append(v)
    return {k: float(np.median(v)) for k, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llava15-geometry")
    ap.add_argument("--method", default="prumerge")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--build-dir", default="build/openvino-profile")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    d = Path(args.build_dir) / f"{args.preset}-{args.dtype}"
    engines = {}
    for m in ("none", args.method):
        out = d / f"{m}.xml"
        if not out.exists():
            optimize(load_model(args.preset), m, {}, out, target=Target(backend="openvino", dtype=args.dtype))
        engines[m] = OvEngine(out, extra_config={"PERF_COUNT": True})
    regions = linear_regions(args.preset)
    base, red = (region_times(engines[m], regions, 3, args.reps) for m in ("none", args.method))
    rows = {}
    print(f"| region | unmodified ms | {args.method} ms | ratio |")
    print("|---|---:|---:|---:|")
    for k in sorted(set(base) | set(red), key=lambda k: -base.get(k, 0.0)):
        b, r = base.get(k, 0.0), red.get(k, 0.0)
        if max(b, r) < 0.1:
            continue
        rows[k] = {"unmodified_ms": b, "reduced_ms": r}
        print(f"| {k} | {b:.2f} | {r:.2f} | {b / r:.2f}x |" if r else f"| {k} | {b:.2f} | 0 | - |")
    print(f"| all nodes | {sum(base.values()):.2f} | {sum(red.values()):.2f} | "
          f"{sum(base.values()) / sum(red.values()):.2f}x |")
    out = Path(args.out or f"benchmarks/results/openvino-node-profile-{args.preset}-{args.method}-{args.dtype}.json")
    out.write_text(json.dumps({"preset": args.preset, "method": args.method, "dtype": args.dtype, "reps": args.reps,
                               "environment": environment(engines[args.method].threads, engines[args.method]),
                               "regions": rows},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
