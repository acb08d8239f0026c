"""Fuzz figure: malformed inputs per command (and the Python API), and how each run ended.

Same harness and oracle as tests/fuzz/test_fuzz.py (exit 2 with one line naming the file or option, or a
correct success; never another exit code, a traceback, a hang or a file left behind), with more damaged
copies per input kind and several seeds.

Usage: python benchmarks/fuzz.py --per-kind 10 --seeds 1 2 3 --out benchmarks/results/fuzz.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fuzz.harness import aoti_cases, build_corpus, cases, run_case  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-kind", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--timeout", type=int, default=300, help="seconds before a case counts as a hang")
    ap.add_argument("--out", default="benchmarks/results/fuzz.json")
    ap.add_argument("--aoti", type=int, default=8, help="damaged copies of a real AOTInductor package (0: none)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)

    t0 = time.perf_counter()
    per_command: dict[str, dict] = defaultdict(lambda: {"cases": 0, "exit_2": 0, "exit_0": 0, "problems": [],
                                                        "max_s": 0.0})
    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_corpus(Path(tmp) / "corpus")
        extra = []
        if args.aoti:  # one real package of the tiny preset, then damaged copies of it
            from vtrcompile.build import build
            from vtrcompile.models.loading import load_model
            from vtrcompile.optimize import Target, write_engine

            tiny = load_model("tiny")
            pkg = write_engine(build(tiny, "none", {}), tiny, Path(tmp) / "aoti" / "e.pt2", Target(backend="aoti"),
                               decode=False).files[-1]
            extra = aoti_cases(pkg, pkg, Path(tmp), np.random.default_rng(args.seeds[0]), args.aoti)
        for seed in args.seeds:
            work = Path(tmp) / f"work-{seed}"
            for case in [*cases(corpus, np.random.default_rng(seed), args.per_kind, work),
                         *(extra if seed == args.seeds[0] else [])]:
                o = run_case(case, args.timeout)
                row = per_command[o.command]
                row["cases"] += 1
                row["exit_2"] += o.exit_code == 2 and o.problem is None
                row["exit_0"] += o.exit_code == 0 and o.problem is None
                row["max_s"] = max(row["max_s"], round(o.seconds, 2))
                if o.problem:
                    row["problems"].append(f"[{o.label}] {o.problem}")
                    print(f"PROBLEM {o.command} [{o.label}]: {o.problem}", flush=True)
    result = {"per_kind": args.per_kind, "seeds": args.seeds, "seconds": round(time.perf_counter() - t0),
              "commands": dict(per_command),
              "total": {k: sum(r[k] for r in per_command.values()) for k in ("cases", "exit_2", "exit_0")},
              "problems": sum(len(r["problems"]) for r in per_command.values())}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| command | malformed inputs | one-line error, exit 2 | correct success, exit 0 | problems |")
    print("|---|---:|---:|---:|---:|")
    for cmd, r in result["commands"].items():
        print(f"| {cmd} | {r['cases']} | {r['exit_2']} | {r['exit_0']} | {len(r['problems'])} |")
    print(f"total {result['total']}, problems {result['problems']}, {result['seconds']} s")


if __name__ == "__main__":
    main()
