"""Engines of any backends generating in one process, interleaved: which one answers fastest on this machine.

`generation.py` compares a reduced engine with the unmodified one on one backend, each backend in its own process;
this machine's speed drifts between processes (BENCHMARKS.md, "bandwidth modes"), so that cannot rank backends.
Here every engine runs the same profile prompt in turn, round after round, in one process: the prefill alone
(time to first token) and a whole greedy generation of `--new-tokens` tokens (EOS ignored), each over the same
rounds. Time per output token is derived: (end to end - prefill) / (new tokens - 1).

`--old-host-path` also opens each ONNX Runtime and OpenVINO engine a second time with the generation loop's host
work as it was before 2026-12-07, timed in the same rounds: ONNX Runtime leaving a decode step's outputs to be
allocated every step (the runner binds them once to buffers of its own since: `OrtEngine._binding`), OpenVINO running
each request through `InferRequest.infer`, which also builds a dict of every output (`OvEngine._infer` since).

Usage: python benchmarks/generation_backends.py ENGINE [ENGINE ...] [--new-tokens 32 --rounds 10 --reps 3
       --threads 2 --old-host-path --out F.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vtrcompile import load_engine
from vtrcompile.engine.host_inputs import prefill_feeds
from vtrcompile.profile import environment, layout, profile_prompt


def timers(engine, new_tokens: int):
    """(prefill, generation) timers of one engine on the profile prompt, in ms."""
    ids, pixels = profile_prompt(engine.metadata)[:2]
    feeds = prefill_feeds(engine.metadata, ids, pixels)

    def prefill() -> float:
        t0 = time.perf_counter()
        engine.prefill.run(feeds)
        return (time.perf_counter() - t0) * 1e3

    def generation() -> float:
        t0 = time.perf_counter()
        engine.generate(max_new_tokens=new_tokens, eos_token_id=[], **feeds)
        return (time.perf_counter() - t0) * 1e3
    return prefill, generation, int(ids.shape[1])


def ort_outputs_allocated_every_step(engine) -> None:
    engine.decode._fixed = None  # the runner then leaves every output to ONNX Runtime


def openvino_runs_through_infer(engine) -> None:
    from vtrcompile.lower.openvino import first_run_done

    for runner in (engine.prefill, engine.decode):
        def infer(request, runner=runner) -> None:
            request.infer(share_outputs=True)  # builds the dict of outputs, which the runner no longer reads
            if not runner._ran:
                runner._ran = True
                first_run_done(runner)
        runner._infer = infer


OLD_HOST_PATHS = {"onnxruntime": ort_outputs_allocated_every_step, "openvino": openvino_runs_through_infer}


def interleaved(fns: list, rounds: int, reps: int) -> tuple[list[list[float]], list[list[float]]]:
    """Each engine's (prefill, generation) timers in turn, round after round, each kind `reps` times after one
    warm-up run -> every engine's prefill times and generation times (ms), in the order of `fns`."""
    prefill: list[list[float]] = [[] for _ in fns]
    total: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for (p, g, _n), pr, tot in zip(fns, prefill, total, strict=True):
            pr += [p() for _ in range(reps + 1)][1:]
            tot += [g() for _ in range(reps + 1)][1:]
    return prefill, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engines", nargs="+")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3, help="runs of each kind per engine and round (1 more as warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--old-host-path", action="store_true",
                    help="also each ONNX Runtime and OpenVINO engine with the host work of before 2026-12-07")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    engines = [load_engine(p, args.threads) for p in args.engines]
    paths, labels = list(args.engines), [layout(e.metadata) for e in engines]
    if args.old_host_path:
        for p, e in zip(args.engines, list(engines), strict=True):
            if e.prefill.backend in OLD_HOST_PATHS and e.metadata.get("decode"):
                other = load_engine(p, args.threads)
                OLD_HOST_PATHS[e.prefill.backend](other)
                engines.append(other)
                paths.append(p)
                labels.append(layout(e.metadata) + ", host work of before 2026-12-07")
    fns = [timers(e, args.new_tokens) for e in engines]
    prefill, total = interleaved(fns, args.rounds, args.reps)
    rows = []
    for path, label, e, pr, tot, (_p, _g, n) in zip(paths, labels, engines, prefill, total, fns, strict=True):
        ttft, e2e = float(np.median(pr)), float(np.median(tot))
        rows.append({"engine": path, "backend": e.prefill.backend, "dtype": e.metadata["dtype"],
                     "weights": e.metadata.get("weights", "none"), "method": e.metadata["method"], "layout": label,
                     "prompt_tokens": n, "ttft_p50_ms": ttft, "end_to_end_p50_ms": e2e,
                     "tpot_derived_ms": (e2e - ttft) / max(args.new_tokens - 1, 1),
                     "ttft_ms": pr, "end_to_end_ms": tot})
    res = {"new_tokens": args.new_tokens, "rounds": args.rounds, "reps": args.reps,
           "environment": environment(args.threads, engines[0].prefill), "engines": rows}
    print(f"| engine | backend, dtype | layout | TTFT p50 (ms) | {args.new_tokens} tokens p50 (ms) | TPOT, derived (ms) |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        weights = "" if r["weights"] == "none" else f", {r['weights']} weights"
        print(f"| {r['engine']} | {r['backend']} {r['dtype']}{weights} | {r['layout']} | {r['ttft_p50_ms']:.2f} | "
              f"{r['end_to_end_p50_ms']:.2f} | {r['tpot_derived_ms']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
