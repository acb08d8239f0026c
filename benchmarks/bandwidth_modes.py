"""Is a decode step's process-to-process spread the machine's memory bandwidth? Several fresh processes, each
measuring first its own read bandwidth (a sum over a 512 MiB tensor, 1 thread and `--threads` threads; one fresh
tensor is enough, as fresh allocations within one process read alike) and then the isolated decode step of one
engine pair (one prefill of the profile prompt, room for 32 new tokens, the step `decode_step.py` times). A decode
step at batch 1 reads all of the LLM's weights, so where the spread is the machine's, the step time follows the
process's bandwidth, and the weight bytes over the step time stay close to it.

Usage: python benchmarks/bandwidth_modes.py PREFILL DECODE [--processes 8 --reps 30 --threads 2 --out F.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

MIB = 512


def read_bandwidth_gib_s(threads: int) -> float:
    """Median read bandwidth of a sum over a fresh 512 MiB float32 tensor (3 warm-up sums dropped)."""
    torch.set_num_threads(threads)
    a = torch.ones(MIB * 2**18, dtype=torch.float32)
    ts = []
    for _ in range(13):
        t0 = time.perf_counter()
        a.sum()
        ts.append(time.perf_counter() - t0)
    return MIB / 1024 / float(np.median(ts[3:]))


def child(prefill_path: str, decode_path: str, reps: int, threads: int) -> dict:
    import onnx
    from decode_step import profile_step_feeds

    from vtrcompile.engine.runners import open_engine
    from vtrcompile.lower.onnx import initializer_bytes

    bw1, bwn = read_bandwidth_gib_s(1), read_bandwidth_gib_s(threads)
    prefill, decode = open_engine(prefill_path, threads), open_engine(decode_path, threads)
    decode.bind(profile_step_feeds(prefill, decode)[0])
    step_ms = float(np.median([decode.time_ms() for _ in range(reps + 3)][3:]))
    weights = initializer_bytes(onnx.load(decode_path, load_external_data=False))
    return {"bandwidth_1_thread_gib_s": bw1, f"bandwidth_{threads}_threads_gib_s": bwn, "step_ms": step_ms,
            "decode_weight_bytes": weights, "weights_over_step_gib_s": weights / 2**30 / (step_ms / 1e3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("prefill")
    ap.add_argument("decode", help="an ONNX decode engine (its weight bytes are read from the graph)")
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--reps", type=int, default=30, help="timed decode steps per process (3 more as warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.prefill, args.decode, args.reps, args.threads)))
        return
    from vtrcompile.profile import environment

    rows = []
    for i in range(args.processes):
        cmd = [sys.executable, __file__, args.prefill, args.decode, "--child", "--reps", str(args.reps),
               "--threads", str(args.threads)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        rows.append(r)
        print(f"process {i + 1}: read {r['bandwidth_1_thread_gib_s']:.0f} GiB/s (1 thread), "
              f"{r[f'bandwidth_{args.threads}_threads_gib_s']:.0f} GiB/s ({args.threads} threads); decode step "
              f"{r['step_ms']:.2f} ms = {r['weights_over_step_gib_s']:.0f} GiB/s of weights")
    if args.out:
        Path(args.out).write_text(json.dumps({"prefill": args.prefill, "decode": args.decode,
                                              "environment": environment(args.threads), "processes": rows}, indent=1))


if __name__ == "__main__":
    main()
