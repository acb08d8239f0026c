"""Searched schedules (G-Search, P-Sigmoid) vs FastV and PyramidDrop at the same mean token budget, on the
trained demo model: search on vqa-synth:val, evaluate on vqa-synth:test, prefill speedup measured.

    python benchmarks/search.py --trials 40 --test-count 1400

Writes benchmarks/results/search.json and prints a markdown table (pasted into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from vtrcompile.errors import VtrError
from vtrcompile.evaluation import accuracy, benchmark_items
from vtrcompile.lower.onnxruntime import OrtEngine
from vtrcompile.methods.registry import resolve
from vtrcompile.models.loading import load_model
from vtrcompile.optimize import optimize
from vtrcompile.profile import compare
from vtrcompile.search.job import run_search

log = logging.getLogger("bench")


def mean_budget(reductions, n: int, layers: int) -> float:
    """Mean fraction of the N image tokens present over the LLM layers, from a method's plan."""
    return sum(_keeps(reductions, n, layers)) / (n * layers)


def fastv_at(budget: float, n: int, layers: int) -> dict:
    """FastV (K=2 when it can reach the budget, else K=1) with keep chosen for the closest mean budget."""
    for k_layer in (2, 1):
        keep = round((budget * layers * n - k_layer * n) / (layers - k_layer))
        if keep >= 1:
            return {"layer": k_layer, "keep": keep}
    return {"layer": 1, "keep": 1}


def pyramiddrop_at(budget: float, n: int, layers: int) -> dict:
    """The keep ratio whose plan comes closest to the budget (its first site, L/4, bounds it from below)."""
    best = None
    for i in range(1, 100):
        lam = i / 100
        try:
            b = mean_budget(resolve("pyramiddrop", {"keep_ratio": lam}, n, layers), n, layers)
        except VtrError:
            continue
        if best is None or abs(b - budget) < abs(best[1] - budget):
            best = (lam, b)
    return {"keep_ratio": best[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/vqa-synth-llava")
    ap.add_argument("--val-count", type=int, default=280)
    ap.add_argument("--test-count", type=int, default=1400)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--build-dir", default="build/search")
    ap.add_argument("--out", default="benchmarks/results/search.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("torch").setLevel(logging.ERROR)
    d = Path(args.build_dir)
    d.mkdir(parents=True, exist_ok=True)
    src = load_model(args.model)
    t0 = time.perf_counter()
    searches = {
        "G-Search tol 1 pt": ("gsearch", {"tolerance": 0.01}),
        "P-Sigmoid 0.25": ("psigmoid", {"budget": 0.25, "trials": args.trials}),
        "P-Sigmoid 0.125": ("psigmoid", {"budget": 0.125, "trials": args.trials}),
    }
    schedules = {}
    for name, (algo, kw) in searches.items():
        path = d / (name.replace(" ", "_").replace(".", "") + ".json")
        rec = run_search(src, algo, "vqa-synth:val", path, count=args.val_count, **kw)
        schedules[name] = (path, rec)
        log.info("%s: %s (budget %.4f, val %.4f vs %.4f) after %.0fs", name, rec["keep"], rec["budget"],
                 rec["metric"]["value"], rec["metric"]["baseline"], time.perf_counter() - t0)
    items = benchmark_items("vqa-synth:test", args.test_count)
    base_path = d / "baseline.onnx"
    base = optimize(src, "none", {}, base_path, 1024)
    n, layers = base.metadata["n_image"], base.metadata["llm_layers"]
    base_acc = accuracy(OrtEngine(base_path), items, "baseline")
    rows = []
    for name, (path, rec) in schedules.items():
        group = [(name, "schedule", {"schedule": str(path)}),
                 (f"FastV @ {rec['budget']:.3f}", "fastv", fastv_at(rec["budget"], n, layers)),
                 (f"PyramidDrop @ {rec['budget']:.3f}", "pyramiddrop", pyramiddrop_at(rec["budget"], n, layers))]
        for label, method, opts in group:
            out = d / (label.replace(" ", "_").replace("@", "at").replace(".", "") + ".onnx")
            res = optimize(src, method, opts, out, 1024)
            b = mean_budget(res.build.reductions, n, layers)
            acc = accuracy(OrtEngine(out), items, label)
            rep = compare(out, base_path, 2, args.reps)
            rows.append({"group": name, "label": label, "method": method, "options": opts,
                         "keep_per_layer": _keeps(res.build.reductions, n, layers),
                         "budget": b, "coarse": acc["coarse"], "fine": acc["fine"], "overall": acc["overall"],
                         "speedup_p50": rep["speedup_p50"], "prefill_p50_ms": rep["engines"]["reduced"]["latency"]["p50_ms"],
                         "baseline_p50_ms": rep["engines"]["baseline"]["latency"]["p50_ms"]})
            log.info("%s: budget %.4f coarse %.3f fine %.3f speedup %.2fx", label, b, acc["coarse"], acc["fine"],
                     rep["speedup_p50"])
    result = {"model": src.label, "val_count": args.val_count, "test_count": args.test_count, "trials": args.trials,
              "baseline": {k: base_acc[k] for k in ("coarse", "fine", "overall")},
              "schedules": {k: v[1] for k, v in schedules.items()}, "rows": rows,
              "seconds": time.perf_counter() - t0}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(result))


def _keeps(reductions, n: int, layers: int) -> list[int]:
    present, out = n, []
    sites = {r.layer: r.count for r in reductions}
    for layer in range(layers):
        present = sites.get(layer, present)
        out.append(present)
    return out


def markdown(r: dict) -> str:
    b = r["baseline"]
    lines = ["| schedule | image tokens per LLM layer | mean budget | coarse | fine | Δ overall | prefill speedup |",
             "|---|---|---:|---:|---:|---:|---:|",
             f"| unmodified | 576 x 12 | 1.000 | {100 * b['coarse']:.1f} | {100 * b['fine']:.1f} | | 1.00x |"]
    for row in r["rows"]:
        lines.append(f"| {row['label']} | {row['keep_per_layer']} | {row['budget']:.3f} | {100 * row['coarse']:.1f} | "
                     f"{100 * row['fine']:.1f} | {100 * (row['overall'] - b['overall']):+.1f} | "
                     f"{row['speedup_p50']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
