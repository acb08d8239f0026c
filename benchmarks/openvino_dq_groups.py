"""OpenVINO engines with compressed weights (`--weights int8/int4`, float32 activations) under several activation
group sizes, timed in one process, taking turns: which DYNAMIC_QUANTIZATION_GROUP_SIZE the runner should compile with.

The CPU plugin multiplies int8/int4 weights by activations it quantizes to int8 on the fly, in groups of
DYNAMIC_QUANTIZATION_GROUP_SIZE elements (its default 32; 0 turns it off). For each group size the prefill IR and its
decode IR are compiled once (`OvEngine(..., extra_config=...)`); then, round after round, every setting runs the
prefill on the profile prompt and a decode step at that prompt's context. The decode step reads cache buffers of the
lengths the prefill left in each layer (filled with zeros: the time does not depend on their values). The first
setting's logits are the reference for the others' largest difference (prefill, last position).

Usage: python benchmarks/openvino_dq_groups.py ENGINE.xml [--groups 32,128] [--rounds 10] [--steps 4] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vtrcompile.engine.host_inputs import prefill_feeds
from vtrcompile.lower.openvino import OvEngine
from vtrcompile.profile import environment, profile_prompt


def decode_feeds(meta: dict, prefill_out: dict, room: int = 16) -> dict:
    """A decode step's inputs after `prefill_out`: each layer's buffer holds its prefill length plus `room` rows."""
    feeds: dict = {}
    lengths = []
    for t in meta["io"]["inputs"]:
        name = t["name"]
        if name.startswith("past_key_values."):
            layer = name.split(".")[1]
            s = prefill_out[f"present.{layer}.{name.rsplit('.', 1)[1]}"].shape
            feeds[name] = np.zeros((s[0], s[1], s[2] + room, s[3]), np.float32)
            if name.endswith(".key"):
                lengths.append(s[2])
    feeds["past_lengths"] = np.asarray(lengths, np.int64)
    feeds["layer_position_ids"] = np.ascontiguousarray(prefill_out["next_layer_position_ids"], np.int64)
    feeds["input_ids"] = np.ones((feeds["layer_position_ids"].shape[0], 1), np.int64)
    missing = {t["name"] for t in meta["io"]["inputs"]} - feeds.keys()
    if missing:
        raise SystemExit(f"decode inputs this script does not fill: {sorted(missing)} (batch engines are not covered)")
    return feeds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", type=Path, help="an OpenVINO prefill IR with its decode IR beside it (two files)")
    ap.add_argument("--groups", default="32,128", help="DYNAMIC_QUANTIZATION_GROUP_SIZE values (the first: reference)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=4, help="decode steps timed per setting and round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    groups = [int(g) for g in args.groups.split(",")]
    prefill = {g: OvEngine(args.engine, args.threads, {"DYNAMIC_QUANTIZATION_GROUP_SIZE": g}) for g in groups}
    meta = prefill[groups[0]].metadata
    if meta.get("weights", "none") == "none" or meta.get("dtype") != "float32":
        raise SystemExit(f"{args.engine}: not a float32 engine with compressed weights")
    decode_path = args.engine.parent / meta["decode"]["file"]
    decode = {g: OvEngine(decode_path, args.threads, {"DYNAMIC_QUANTIZATION_GROUP_SIZE": g}) for g in groups}
    ids, pixels = profile_prompt(meta)[:2]
    feeds = prefill_feeds(meta, ids, pixels)
    outs = {g: prefill[g].run(feeds) for g in groups}
    step = decode_feeds(decode[groups[0]].metadata, outs[groups[0]])
    ref = outs[groups[0]]["logits"]
    times: dict = {g: {"prefill_ms": [], "decode_step_ms": []} for g in groups}
    for g in groups:  # warm-up, discarded
        decode[g].run(step)
    for _ in range(args.rounds):
        for g in groups:
            t0 = time.perf_counter()
            prefill[g].run(feeds)
            times[g]["prefill_ms"].append((time.perf_counter() - t0) * 1e3)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                decode[g].run(step)
                times[g]["decode_step_ms"].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for g in groups:
        row = {"group": g, "prompt_tokens": int(ids.shape[1]),
               "max_abs_logit_diff_vs_first": float(np.abs(outs[g]["logits"] - ref).max()),
               "same_top1_as_first": bool((outs[g]["logits"].argmax(-1) == ref.argmax(-1)).all())}
        for k, v in times[g].items():
            row[k.replace("_ms", "_p50_ms")] = float(np.median(v))
            row[k.replace("_ms", "_p10_ms")] = float(np.percentile(v, 10))
        rows.append(row)
        print(f"group {g:>4}: prefill p50 {row['prefill_p50_ms']:.1f} ms, decode step p50 {row['decode_step_p50_ms']:.2f}"
              f" ms, logits vs group {groups[0]}: {row['max_abs_logit_diff_vs_first']:.3g}", flush=True)
    result = {"engine": str(args.engine), "weights": meta["weights"], "rounds": args.rounds, "steps": args.steps,
              "environment": environment(args.threads, prefill[groups[0]]), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
