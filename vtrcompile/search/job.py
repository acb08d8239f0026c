"""The `search` job: model + calibration -> schedule.json (G-Search, P-Sigmoid or VTW's K), resumable."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import VtrError
from .algorithms import VTW_KL, gsearch, psigmoid, vtw_layer
from .evaluator import Metric, ScheduleEvaluator, calibration_items
from .schedule_file import FORMAT, save_schedule

log = logging.getLogger(__name__)


def _partial(out: Path, algo: str, settings: dict, model_id: str) -> dict[str, list]:
    """Evaluations recorded by an interrupted run of the same search, keyed by schedule."""
    if not out.is_file():
        return {}
    try:
        rec = json.loads(out.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        rec = None
    if not isinstance(rec, dict):
        raise VtrError(f"{out}: exists and is not a vtrcompile schedule (not a JSON object); move it away or "
                       "choose another --out")
    if rec.get("format") != FORMAT or rec.get("complete") or rec.get("algo") != algo \
            or rec.get("settings") != settings or rec.get("model_id") != model_id:
        return {}
    evals = rec.get("evaluations", [])
    try:
        done = {tuple(int(k) for k in e["keep"]): float(e["value"]) for e in evals}
    except (TypeError, KeyError, ValueError):
        raise VtrError(f"{out}: the evaluations of this interrupted search are damaged; delete the file to "
                       "start the search again") from None
    log.info("resuming from %s: %d evaluations already done", out, len(done))
    return done


def first_stage(model, text: str, tiles: int = 1):
    """'divprune keep=288' -> (its eager projector or vision stage, the canonical text a stacked build must
    match)."""
    from ..methods.registry import parse_then, resolve, stage_text, validate
    from ..models.family import family_of
    from ..reference.baselines import projector_stage
    from ..reference.vision import vision_stage

    method, given = parse_then(text, "--first")
    fam = family_of(model)
    n, segments = fam.budget_basis(model.config, tiles)  # budgets count patches where rows are protected
    plan = resolve(method, given, n, len(fam.language_model(model).layers), segments)
    makers = {"projector": projector_stage, "vision": vision_stage}
    stage = makers[plan[0].site](plan[0]) if len(plan) == 1 and plan[0].site in makers else None
    if stage is None:
        raise VtrError(f"--first: {method} is not a vision or projector method the search can run (random, pool, "
                       "divprune, gprune, prumerge, prumerge-plus, visionzip)")
    return stage, stage_text(method, validate(method, given))


def run_search(source, algo: str, calibration: str, out: Path, count: int = 280, tolerance: float = 0.01,
               budget: float | None = None, trials: int = 40, seed: int = 0, storage: str | None = None,
               metric: str | None = None, first: str | None = None) -> dict[str, Any]:
    """`first`: a projector method's text ("divprune keep=288") that runs before the LLM; the schedule is
    searched on the image tokens it leaves, and compiles with `--method A ... --then "schedule schedule=FILE"`."""
    from ..optimize import source_id

    if source.weights is not None:
        from ..memory import check_fits, eager_estimate

        check_fits("search", eager_estimate(source, source.dtype))
    model = source.eager().hf_model
    if model is None:
        raise VtrError("search runs the model eagerly on the calibration set: give a Hugging Face directory, a "
                       "preset or a pickled module (not an exported program)")
    mid = source_id(source)
    src_dir = source.label if source.kind == "hf-dir" else None
    items, answers, desc = calibration_items(calibration, model, count, src_dir, source.tiles)
    m = Metric(metric or ("accuracy" if answers is not None else "agreement"))
    if m.name == "accuracy" and answers is None:
        raise VtrError(f"--metric accuracy needs labels; {calibration} has none (use agreement or kl)")
    if algo == "vtw":
        m = Metric("kl")
    t0 = time.perf_counter()
    stage, first_text = first_stage(model, first, source.tiles) if first else (None, None)
    ev = ScheduleEvaluator(model, items, answers, stage)
    n, layers = ev.n_image, ev.layers
    base = m.value(ev, ev.full)
    settings: dict[str, Any] = {"calibration": calibration, "count": len(items), "metric": m.name, "seed": seed,
                                **({"first": first_text} if first_text else {})}
    if algo == "gsearch":
        settings["tolerance"] = tolerance
    elif algo == "psigmoid":
        if budget is None:
            raise VtrError("psigmoid needs --budget (mean keep fraction over the layers, e.g. 0.25)")
        settings.update(budget=budget, trials=trials)
    else:
        settings["kl_threshold"] = VTW_KL
    memo = _partial(out, algo, settings, mid)
    record: dict[str, Any] = {
        "algo": algo, "settings": settings, "model": source.label, "model_id": mid, "n_image": n,
        "llm_layers": layers, "calibration": desc, "metric": {"name": m.name, "baseline": base},
        **({"first": first_text} if first_text else {}),
        "evaluations": [{"keep": list(k), "value": v} for k, v in memo.items()], "complete": False,
    }

    def evaluate(keeps: list[int]) -> float:
        key = tuple(keeps)
        if key not in memo:
            memo[key] = m.value(ev, ev.logits(keeps))
            record["evaluations"].append({"keep": keeps, "value": memo[key], "seconds": time.perf_counter() - t0})
            save_schedule(out, record)  # a partial file: resumable, refused by optimize until complete
        return memo[key]

    if algo == "gsearch":
        keeps, steps = gsearch(evaluate, lambda v: m.drop(base, v) <= tolerance, n, layers,
                               before_layer=lambda k, layer: ev.checkpoint(k, layer))
        record["steps"] = steps
        value = evaluate(keeps) if any(k < n for k in keeps) else base
    elif algo == "psigmoid":
        sign = -1.0 if m.name == "kl" else 1.0
        name = f"psigmoid-{mid}-{m.name}-b{budget}-{calibration.replace('/', '_')}-{len(items)}-s{seed}"
        storage = storage or f"sqlite:///{out.with_suffix('.optuna.db')}"
        keeps, trials_log = psigmoid(lambda k: sign * evaluate(k), n, layers, budget, trials, seed, storage, name)
        for t in trials_log:
            t["value"] = sign * t["value"]
        record["trials"] = trials_log
        record["study"] = {"name": name, "storage": storage}
        value = memo[tuple(keeps)]
    elif algo == "vtw":
        k, steps = vtw_layer(lambda k: evaluate([n] * k + [0] * (layers - k)), layers)
        record["steps"] = steps
        if k is None:
            raise VtrError(f"vtw: no layer K in 1..{layers - 1} keeps the mean KL within {VTW_KL} on {desc}; "
                           "VTW would change this model's answers, so no K is recommended")
        record["vtw_layer"] = k
        keeps, value = [n] * k + [0] * (layers - k), memo[tuple([n] * k + [0] * (layers - k))]
    else:
        raise VtrError(f"unknown --algo {algo}; use gsearch, psigmoid or vtw")
    record.update(keep=keeps, budget=sum(keeps) / (n * layers), complete=True, seconds=time.perf_counter() - t0,
                  evaluated_schedules=len(memo))
    record["metric"]["value"] = value
    save_schedule(out, record)
    return record
