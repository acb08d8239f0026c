"""Measured memory of running engines: each engine in a fresh process, the process's peak resident memory once
loaded, after two prefills of the profile prompt, and after two generations (greedy, `--new-tokens`) on top.

The KV bytes `profile` reports are computed from the caches' shapes; this measures what a serving process holds:
the weights as the runtime keeps them, its activations and workspace (allocated for the largest shapes run, then
kept), the cache buffers `generate` allocates (and keeps for the next generation), the decode engine, which loads on
the first generation. A process per engine and run, because allocators keep what a run freed (a second engine in the
same process would reuse the first one's pages). The baseline's peak less the reduced engine's is the memory the
reduction saves a serving process. Linux only: VmRSS and VmHWM from /proc/self/status.

Usage: python benchmarks/runtime_memory.py BASELINE REDUCED [MORE ...] [--new-tokens 32 --reps 3 --threads 2
       --out F.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MIB = 1024 * 1024


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/self/status has no {key}: this script needs Linux")


def child(engine_path: str, new_tokens: int, threads: int) -> dict:
    """One engine in this process: MiB resident once loaded, and the peak after the prefills and the generations."""
    from vtrcompile import load_engine
    from vtrcompile.engine.host_inputs import prefill_feeds
    from vtrcompile.profile import profile_prompt

    engine = load_engine(engine_path, threads)
    ids, pixels = profile_prompt(engine.metadata)[:2]
    feeds = prefill_feeds(engine.metadata, ids, pixels)
    loaded = _status_kb("VmRSS")
    for _ in range(2):
        engine(**feeds)
    after_prefill = _status_kb("VmHWM")
    for _ in range(2):
        out = engine.generate(max_new_tokens=new_tokens, eos_token_id=[], **feeds)
    after_generate = _status_kb("VmHWM")
    meta = engine.metadata
    itemsize = 2 if meta["dtype"] in ("bfloat16", "float16") else 4
    kv_at_end = sum(2 * meta["batch"] * meta["kv_heads"] * (s + new_tokens - 1) * meta["head_dim"] * itemsize
                    for s in out.cache_lengths)
    return {"engine": engine_path, "backend": engine.prefill.backend, "dtype": meta["dtype"], "batch": meta["batch"],
            "prompt_tokens": int(ids.shape[1]), "loaded_mib": loaded / 1024, "peak_after_prefill_mib": after_prefill / 1024,
            "peak_after_generate_mib": after_generate / 1024, "kv_bytes_at_end_computed_mib": kv_at_end / MIB}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engines", nargs="+")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per engine, taken in turn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.engines[0], args.new_tokens, args.threads)))
        return
    runs: dict[str, list[dict]] = {e: [] for e in args.engines}
    for _ in range(args.reps):
        for e in args.engines:
            proc = subprocess.run([sys.executable, __file__, e, "--child", "--new-tokens", str(args.new_tokens),
                                   "--threads", str(args.threads)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{e}: the measuring process failed:\n{proc.stderr[-2000:]}")
            runs[e].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    keys = ["loaded_mib", "peak_after_prefill_mib", "peak_after_generate_mib", "kv_bytes_at_end_computed_mib"]
    summary = {e: {k: statistics.median(r[k] for r in rs) for k in keys} for e, rs in runs.items()}
    width = max(len(e) for e in args.engines)
    print(f"{'engine':{width}}  loaded MiB  peak after prefills MiB  peak after generations MiB  KV at end "
          "(computed) MiB")
    for e, m in summary.items():
        print(f"{e:{width}}  {m['loaded_mib']:10.1f}  {m['peak_after_prefill_mib']:23.1f}  "
              f"{m['peak_after_generate_mib']:26.1f}  {m['kv_bytes_at_end_computed_mib']:24.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"new_tokens": args.new_tokens, "threads": args.threads,
                                              "reps": args.reps, "runs": runs, "median": summary}, indent=1))


if __name__ == "__main__":
    main()
