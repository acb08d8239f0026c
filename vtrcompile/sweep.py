"""Methods x budgets on one model -> engines, accuracy and measured prefill speedup -> table, JSON, plot."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .errors import VtrError

log = logging.getLogger(__name__)

# Final image-token budgets as fractions of N: 50%, 25%, 64/576, 32/576 (the papers' usual operating points).
FRACTIONS = (0.5, 0.25, 64 / 576, 32 / 576)
SEED_METHODS = ("fastv", "pyramiddrop", "pumer", "gprune", "prumerge", "prumerge-plus", "visionzip", "vtw")
BASELINES = ("random", "pool", "divprune", "dart")
# Stacked pairs: the first stage keeps half the image tokens before the LLM, the second reaches the budget.
STACKED = ("divprune+pyramiddrop", "divprune+fastv", "pool+pyramiddrop")
DEFAULT_METHODS = SEED_METHODS + BASELINES + STACKED


def check_methods(methods: tuple[str, ...]) -> None:
    """Every name a method of the registry (not 'none'), or two joined by '+' (a stacked pair)."""
    from .methods.registry import METHODS

    bad = [m or "''" for m in methods if any(p not in METHODS or p == "none" for p in m.split("+"))
           or m.count("+") > 1]
    if bad:
        raise VtrError(f"--methods: unknown {', '.join(bad)}; see `vtrcompile methods` (stack two with '+')")


def _config(method: str, f: float, n: int) -> dict[str, Any] | None:
    """Options that leave about f*N image tokens at the last layer (None: the method has no such budget)."""
    k = max(1, round(f * n))
    if method in ("fastv", "gprune", "pumer", "random", "divprune"):
        return {"keep": k}
    if method == "pyramiddrop":  # three stages of lambda: N * lambda^3 left after the last one
        return {"keep_ratio": round(f ** (1 / 3), 4)}
    if method == "prumerge":
        return {"keep": max(1, k - 1)}  # n + the leftover token
    if method == "prumerge-plus":
        return {"keep_ratio": round(f / 2, 4)}  # outliers plus the grid, about twice the ratio
    if method == "visionzip":
        dom = max(2, round(k * 54 / 64))
        return {"dominant": dom, "contextual": max(1, k - dom)}
    if method == "pool":  # s*s tokens, s at most the grid side
        from .methods.pool import token_grid

        side = min(token_grid(n))
        return {"keep": min(side, max(1, round(k ** 0.5))) ** 2}
    if method == "dart":  # 4 image pivots + a multiple of the 8 pivots
        return {"keep": 4 + 8 * max(1, round((k - 4) / 8))}
    return None


def configs(method: str, n: int, layers: int) -> list[dict[str, Any]]:
    """Options that put `method` at each budget of FRACTIONS (VTW has no token budget: its layer K). A stacked
    pair 'a+b': a at 50% of N, then b (as --then text) at the smaller budgets, relative to what a leaves."""
    if "+" in method:
        from .methods.registry import resolve

        first, second = method.split("+")
        opts = _config(first, 0.5, n)
        if opts is None:
            return []
        n1 = resolve(first, opts, n, layers)[-1].count
        out = []
        for f in FRACTIONS[1:]:
            then = _config(second, f * n / n1, n1)
            if then is not None:
                out.append({**opts, "then": " ".join([second, *(f"{k}={v}" for k, v in then.items())])})
        return out
    if method == "vtw":  # K at 3L/4, L/2, L/4
        return [{"layer": k} for k in sorted({3 * layers // 4, layers // 2, max(1, layers // 4)}, reverse=True)]
    return [c for f in FRACTIONS if (c := _config(method, f, n)) is not None]


def paired_delta(correct: list[int], base: list[int]) -> tuple[float, float]:
    """Accuracy difference (points) against the baseline on the same prompts, and two standard errors of it
    (paired: the per-prompt differences' standard deviation over sqrt(n))."""
    import numpy as np

    d = np.asarray(correct, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return 100 * float(d.mean()), 200 * se


def label(method: str, opts: dict[str, Any]) -> str:
    return method + "".join(f" {k}={v}" for k, v in opts.items())


def run(source, items, out_dir: Path, methods: tuple[str, ...] = DEFAULT_METHODS, reps: int = 10,
        warmup: int = 2, threads: int | None = None, max_prompt: int = 1024) -> dict[str, Any]:
    """Build each engine with `optimize`, evaluate it on `items`, profile it against the same baseline."""
    from .evaluation import accuracy
    from .lower.atomic import check_writable
    from .lower.onnxruntime import OrtEngine
    from .optimize import optimize
    from .profile import compare

    out_dir = Path(out_dir)
    eng_dir = out_dir / "engines"
    base_path = eng_dir / "baseline.onnx"
    check_writable(out_dir / "sweep.json")
    check_writable(base_path)
    if source.hf_model is not None:  # refuse a model that cannot answer the benchmark before building anything
        items.check_engine(source.family.prompt_facts(source.hf_model.config, source.tiles), source.label)
    base = optimize(source, "none", {}, base_path, max_prompt)
    meta = base.metadata
    items.check_engine(meta, str(base_path))
    n, layers = meta["n_image"], meta["llm_layers"]
    runs = [(m, o) for m in methods for o in configs(m, n, layers)]
    log.info("sweep: %d engines + baseline, %d prompts each", len(runs), len(items))
    base_acc = accuracy(OrtEngine(base_path, threads), items, "baseline")
    answers = [items[i].answer for i in range(len(items))]
    base_right = [int(p == a) for p, a in zip(base_acc["predictions"], answers, strict=True)]
    rows: list[dict[str, Any]] = []
    for i, (m, o) in enumerate(runs, 1):
        name = label(m, o)
        path = eng_dir / (name.replace(" ", "_").replace("=", "") + ".onnx")
        log.info("[%d/%d] %s", i, len(runs), name)
        try:
            res = optimize(source, m.split("+")[0], o, path, max_prompt)  # a stacked pair: its `then` is in o
        except VtrError as e:  # e.g. a PuMer count its schedule cannot reach: recorded, not fatal
            log.warning("%s: skipped (%s)", name, e)
            rows.append({"method": m, "options": o, "label": name, "skipped": str(e)})
            continue
        acc = accuracy(OrtEngine(path, threads), items, name)
        rep = compare(path, base_path, warmup, reps, threads)
        red = rep["engines"]["reduced"]
        delta, two_se = paired_delta([int(p == a) for p, a in zip(acc["predictions"], answers, strict=True)],
                                     base_right)
        rows.append({
            "method": m, "options": o, "label": name,
            "image_tokens_last_layer": red["llm_tokens_per_layer"][-1] - (rep["prompt_tokens"] - n),
            "llm_tokens_per_layer": red["llm_tokens_per_layer"],
            "coarse": acc["coarse"], "fine": acc["fine"], "overall": acc["overall"], "per_kind": acc["per_kind"],
            "delta_overall_points": delta, "delta_overall_2se": two_se,
            "speedup_p50": rep["speedup_p50"], "flops_ratio": rep["flops_ratio"],
            "prefill_p50_ms": red["latency"]["p50_ms"],
            "baseline_p50_ms": rep["engines"]["baseline"]["latency"]["p50_ms"],
            "selector_share": rep["selector"]["share"] if rep["selector"] else None,
        })
        for p in res.files:
            p.unlink(missing_ok=True)  # engines are rebuilt on demand; keep the sweep folder small
    return {"model": meta["model"], "model_id": meta["model_id"], "benchmark": f"vqa-synth:{items.split}",
            "prompts": len(items), "n_image": n, "llm_layers": layers,
            "baseline": {k: base_acc[k] for k in ("coarse", "fine", "overall", "per_kind")},
            "environment": rep_env(threads), "rows": rows}


def rep_env(threads: int | None) -> dict[str, Any]:
    import os

    from .profile import environment

    return environment(threads or os.cpu_count() or 1)


def _pct(v: float | None, base: float | None = None, signed: bool = False) -> str:
    """An accuracy in percent ("-" where the prompts held no question of that class); with `base`, the
    difference in points."""
    if v is None or (signed and base is None):
        return "-"
    return f"{100 * (v - base):+.1f}" if signed else f"{100 * v:.1f}"


def markdown(r: dict[str, Any]) -> str:
    b = r["baseline"]
    lines = [
        f"Model `{r['model']}` ({r['model_id']}), {r['benchmark']}, {r['prompts']} prompts, N={r['n_image']}; "
        f"speedup = measured prefill p50 ratio against the unmodified engine (ONNX Runtime, "
        f"{r['environment']['threads']} threads).",
        "",
        "| method | options | image tokens (last layer) | coarse | fine | Δ coarse | Δ fine | Δ overall ± 2 SE | "
        "prefill speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| none | | {r['n_image']} | {_pct(b['coarse'])} | {_pct(b['fine'])} | | | | 1.00x |",
    ]
    for row in r["rows"]:
        opts = ", ".join(f"{k}={v}" for k, v in row["options"].items())
        if "skipped" in row:
            lines.append(f"| {row['method']} | {opts} | | | | | | | skipped: {row['skipped'][:60]} |")
            continue
        noise = (f"{row['delta_overall_points']:+.1f} ± {row['delta_overall_2se']:.1f}"
                 if "delta_overall_points" in row else "")
        lines.append(
            f"| {row['method']} | {opts} | {row['image_tokens_last_layer']} | {_pct(row['coarse'])} | "
            f"{_pct(row['fine'])} | {_pct(row['coarse'], b['coarse'], True)} | "
            f"{_pct(row['fine'], b['fine'], True)} | {noise} | {row['speedup_p50']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    """Accuracy against measured prefill speedup, one curve per method; coarse and fine side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    rows = [x for x in r["rows"] if "skipped" not in x]
    for ax, cls in zip(axes, ("coarse", "fine"), strict=True):
        ax.set_title(f"{cls} questions")
        if r["baseline"][cls] is None:  # no question of this class among the prompts
            ax.text(0.5, 0.5, f"no {cls} questions", ha="center", transform=ax.transAxes)
            continue
        base = 100 * r["baseline"][cls]
        ax.axhline(base, color="gray", lw=0.8, ls="--")
        ax.plot([1.0], [base], "ks", label="unmodified")
        for m in dict.fromkeys(x["method"] for x in rows):
            pts = sorted((x["speedup_p50"], 100 * x[cls]) for x in rows if x["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, label=m)
        ax.set_xlabel("measured prefill speedup (x)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{r['benchmark']} ({r['prompts']} prompts): accuracy vs prefill speedup")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(r: dict[str, Any], out_dir: Path) -> list[Path]:
    from .lower.atomic import write_atomically

    out_dir = Path(out_dir)
    paths = []
    for name, fn in (("sweep.json", lambda p: p.write_text(json.dumps(r, indent=1))),
                     ("sweep.md", lambda p: p.write_text(markdown(r))),
                     ("sweep.png", lambda p: plot(r, p))):
        paths += write_atomically(out_dir / name, fn)
    return paths
