"""Measured memory of serving processes, engine against engine: `vtrcompile profile --memory` (engine/resident.py)
for any number of engines and several fresh processes each, taken in turn, with the medians.

Each process loads one engine and records its peak resident memory (VmHWM) once loaded, after two prefills of the
profile prompt, what opening the decode engine added, and the peak after two generations on top; what the process
holds, weights and runtime workspace included.
The KV bytes `profile` reports are computed from shapes; this is the measured side. Linux only.

Usage: python benchmarks/runtime_memory.py BASELINE REDUCED [MORE ...] [--new-tokens 32 --reps 3 --threads 2
       --out F.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from vtrcompile.engine.resident import measure
from vtrcompile.engine.runners import backend_of
from vtrcompile.profile import DEFAULT_PREFIX, DEFAULT_SUFFIX, environment

KEYS = ("loaded_mib", "peak_after_prefills_mib", "decode_opened_mib", "peak_after_generations_mib")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engines", nargs="+")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per engine, taken in turn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {e: [] for e in args.engines}
    for _ in range(args.reps):
        for e in args.engines:
            runs[e].append(measure(e, args.new_tokens, args.threads, DEFAULT_PREFIX, DEFAULT_SUFFIX))
    median = {e: {k: statistics.median(r[k] for r in rs) for k in KEYS} for e, rs in runs.items()}
    width = max(len(e) for e in args.engines)
    print(f"{'peak resident MiB':{width}}  {'loaded':>8}  {'after 2 prefills':>16}  {'decode opened (+)':>17}  "
          f"{'after 2 generations':>19}")
    for e, m in median.items():
        print(f"{e:{width}}  {m[KEYS[0]]:8.1f}  {m[KEYS[1]]:16.1f}  {m[KEYS[2]]:17.1f}  {m[KEYS[3]]:19.1f}")
    if args.out:
        # each engine ran in its own process: name each one's backend (environment() alone names ONNX Runtime's)
        env = {**environment(args.threads), "backend": {e: backend_of(e) for e in args.engines}}
        if "openvino" in env["backend"].values():
            import openvino

            env["openvino"] = openvino.__version__
        Path(args.out).write_text(json.dumps({"new_tokens": args.new_tokens, "reps": args.reps, "environment": env,
                                              "runs": runs, "median": median}, indent=1))


if __name__ == "__main__":
    main()
