"""Accuracy-vs-speedup frontier over one or more sweep runs of the same model and prompts.

Usage: python benchmarks/frontier.py build/sweep-new/sweep.json benchmarks/results/sweep-vqa-synth.json
(runs of the same model, prompts and baseline answers; an engine in several runs is taken from the first run
listed; rows of a run that kept no per-prompt predictions are shown without the paired noise).
Writes benchmarks/results/frontier-vqa-synth.{json,md,png}: every engine's overall accuracy change against the
unmodified engine (paired, with two standard errors), its measured prefill speedup, whether it is on the
Pareto frontier, and the project's goal (>= 2.5x at <= 1 point lost, >= 4x at <= 3 points) checked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GOALS = ((2.5, 1.0), (4.0, 3.0))  # (prefill speedup, overall points lost at most)


def merge(paths: list[Path]) -> dict:
    runs = [json.loads(p.read_text()) for p in paths]
    head = runs[0]
    for r in runs[1:]:
        same = all(r[k] == head[k] for k in ("model_id", "benchmark", "prompts", "n_image"))
        if not same or r["baseline"] != head["baseline"]:
            raise SystemExit(f"runs differ in model, benchmark, prompts or baseline answers: {paths}")
    rows, seen = [], set()
    for r, p in zip(runs, paths, strict=True):
        for x in r["rows"]:
            if "skipped" in x or x["label"] in seen:  # an engine measured again: the first run listed wins
                continue
            seen.add(x["label"])
            x = dict(x, run=str(p), onnxruntime=r["environment"].get("onnxruntime"))
            if "delta_overall_points" not in x:  # a run from before predictions were kept: no paired noise
                x["delta_overall_points"] = 100 * (x["overall"] - head["baseline"]["overall"])
                x["delta_overall_2se"] = None
            rows.append(x)
    return {**{k: head[k] for k in ("model", "model_id", "benchmark", "prompts", "n_image", "baseline",
                                    "environment")}, "runs": [str(p) for p in paths], "rows": rows}


def frontier(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both speedup and accuracy change."""
    return [r for r in rows if not any(
        o["speedup_p50"] >= r["speedup_p50"] and o["delta_overall_points"] >= r["delta_overall_points"]
        and (o["speedup_p50"], o["delta_overall_points"]) != (r["speedup_p50"], r["delta_overall_points"])
        for o in rows)]


def goals(rows: list[dict]) -> list[dict]:
    out = []
    for speed, loss in GOALS:
        ok = [r for r in rows if r["delta_overall_points"] >= -loss]
        best = max(ok, key=lambda r: r["speedup_p50"]) if ok else None
        out.append({"speedup": speed, "max_loss_points": loss, "met": bool(best and best["speedup_p50"] >= speed),
                    "best_within_loss": None if best is None else {
                        "label": best["label"], "speedup_p50": best["speedup_p50"],
                        "delta_overall_points": best["delta_overall_points"],
                        "delta_overall_2se": best["delta_overall_2se"]}})
    return out


def markdown(m: dict) -> str:
    b = m["baseline"]
    lines = [f"Model `{m['model']}` ({m['model_id']}), {m['benchmark']}, {m['prompts']} prompts, N={m['n_image']}, "
             f"unreduced overall {100 * b['overall']:.1f}% (coarse {100 * b['coarse']:.1f}, fine "
             f"{100 * b['fine']:.1f}); ONNX Runtime, {m['environment']['threads']} threads.", "",
             "| engine | image tokens (last layer) | Δ overall (points) ± 2 SE | Δ fine | prefill speedup | frontier |",
             "|---|---:|---:|---:|---:|:-:|"]
    front = {id(r) for r in frontier(m["rows"])}
    for r in sorted(m["rows"], key=lambda r: -r["speedup_p50"]):
        noise = f"± {r['delta_overall_2se']:.1f}" if r["delta_overall_2se"] is not None else "(earlier run)"
        lines.append(f"| {r['label']} | {r['image_tokens_last_layer']} | {r['delta_overall_points']:+.1f} {noise} | "
                     f"{100 * (r['fine'] - b['fine']):+.1f} | {r['speedup_p50']:.2f}x | {'*' if id(r) in front else ''} |")
    lines.append("")
    for g in m["goals"]:
        best = g["best_within_loss"]
        what = "no engine" if best is None else (f"{best['label']}: {best['speedup_p50']:.2f}x at "
                                                 f"{best['delta_overall_points']:+.1f} points")
        lines.append(f"- goal >= {g['speedup']}x at <= {g['max_loss_points']:g} point(s) lost: "
                     f"{'met' if g['met'] else 'not met'}; fastest within the loss: {what}")
    return "\n".join(lines) + "\n"


def plot(m: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    colours = plt.get_cmap("tab20").colors
    for i, method in enumerate(dict.fromkeys(r["method"] for r in m["rows"])):
        pts = sorted((r["speedup_p50"], r["delta_overall_points"], r["delta_overall_2se"]) for r in m["rows"]
                     if r["method"] == method)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0.0 for p in pts], fmt="os^Dv"[i % 5] + "-",
                    ms=4, lw=1, capsize=2, color=colours[i % len(colours)], label=method)
    front = sorted((r["speedup_p50"], r["delta_overall_points"]) for r in frontier(m["rows"]))
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1.2, label="frontier")
    for speed, loss in GOALS:
        ax.plot([speed], [-loss], "r*", ms=12)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("measured prefill speedup (x), ONNX Runtime")
    ax.set_ylabel("overall accuracy change (points), ±2 SE paired")
    ax.set_title(f"{m['benchmark']} ({m['prompts']} prompts): every method; red stars = the goal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweeps", nargs="+", type=Path)
    ap.add_argument("--out", default="benchmarks/results/frontier-vqa-synth")
    args = ap.parse_args()
    m = merge(args.sweeps)
    m["goals"] = goals(m["rows"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(m, indent=1))
    out.with_suffix(".md").write_text(markdown(m))
    plot(m, out.with_suffix(".png"))
    print(markdown(m))


if __name__ == "__main__":
    main()
