"""G-Search, P-Sigmoid and VTW's KL rule as pure functions over a quality callable (docs/methods.md).

`evaluate(keeps) -> float` scores a schedule n_0..n_{L-1}; nothing here knows about models, so the unit
tests drive these with synthetic quality functions whose optimum is known.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from ..errors import VtrError

log = logging.getLogger(__name__)

GRID = (1.0, 3 / 4, 1 / 2, 3 / 8, 1 / 4, 3 / 16, 1 / 8, 1 / 16, 0.0)
VTW_KL = 0.005


def grid_counts(n: int, cap: int) -> list[int]:
    """The spec's grid x N, rounded, not above `cap`, largest first."""
    return sorted({round(g * n) for g in GRID if round(g * n) <= cap}, reverse=True)


def gsearch(evaluate: Callable[[list[int]], float], ok: Callable[[float], bool], n: int, layers: int,
            before_layer: Callable[[list[int], int], None] | None = None) -> tuple[list[int], list[dict]]:
    """Greedy, shallow to deep: n_l = the smallest grid count (<= n_{l-1}) whose schedule, with n_l applied to
    layers l..L-1, still passes `ok`. The spec's monotonicity assumption (fewer tokens never helps) makes the
    passing candidates a prefix of the descending grid, so bisection finds the boundary; the largest candidate
    (n_{l-1}) is the schedule accepted one step earlier and passes by induction (the unreduced model at l=1)."""
    keeps = [n] * layers
    steps: list[dict] = []
    for layer in range(1, layers):
        cands = grid_counts(n, keeps[layer - 1])
        if len(cands) == 1:
            continue
        if before_layer is not None:
            before_layer(keeps, layer)
        lo, hi = 0, len(cands) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            sched = keeps[:layer] + [cands[mid]] * (layers - layer)
            v = evaluate(sched)
            passed = ok(v)
            steps.append({"layer": layer, "candidate": cands[mid], "keep": sched, "value": v, "passed": passed})
            log.info("gsearch layer %d: n=%d -> %.4f %s", layer, cands[mid], v, "pass" if passed else "fail")
            lo, hi = (mid, hi) if passed else (lo, mid - 1)
        keeps[layer:] = [cands[lo]] * (layers - layer)
    return keeps, steps


def _sig(k: float, l0: float, layers: int) -> list[float]:
    return [1.0 / (1.0 + math.exp(min(50.0, k * (layer - l0)))) for layer in range(1, layers)]


def solve_rmin(k: float, l0: float, layers: int, budget: float) -> float:
    """r_min such that the mean of r(l) over all L layers (r(0) = 1) equals the budget (linear in r_min)."""
    s = _sig(k, l0, layers)
    return (layers * budget - 1.0 - sum(s)) / sum(1.0 - x for x in s)


def psigmoid_keeps(k: float, l0: float, n: int, layers: int, budget: float) -> list[int] | None:
    """n_l = N r(l), r(l) = r_min + (1 - r_min) / (1 + exp(k (l - l0))), r(0) = 1, rounded so that the counts
    sum to exactly round(budget L N) (largest remainders, ties to the shallower layer, which keeps the
    counts non-increasing). None when no r_min in [0, 1] meets the budget for this (k, l0)."""
    r_min = solve_rmin(k, l0, layers, budget)
    if not 0.0 <= r_min <= 1.0:
        return None
    real = [n * (r_min + (1.0 - r_min) * s) for s in _sig(k, l0, layers)]
    floors = [math.floor(x) for x in real]
    extra = round(budget * layers * n) - n - sum(floors)
    order = sorted(range(len(real)), key=lambda i: (-(real[i] - floors[i]), i))
    for i in order[:max(0, extra)]:
        floors[i] += 1
    keeps = [n] + [min(n, f) for f in floors]
    for i in range(1, len(keeps)):
        keeps[i] = min(keeps[i], keeps[i - 1])
    return keeps


def l0_max(k: float, layers: int, budget: float, lo: float = -1.0) -> float | None:
    """The largest l0 in [lo, L-1] with r_min >= 0 (the sum of the sigmoids grows with l0); None if none."""
    room = layers * budget - 1.0
    if sum(_sig(k, lo, layers)) > room:
        return None
    a, b = lo, float(layers - 1)
    if sum(_sig(k, b, layers)) <= room:
        return b
    for _ in range(60):
        mid = (a + b) / 2
        a, b = (mid, b) if sum(_sig(k, mid, layers)) <= room else (a, mid)
    return a


def psigmoid(evaluate: Callable[[list[int]], float], n: int, layers: int, budget: float, trials: int,
             seed: int = 0, storage: str | None = None, study_name: str = "psigmoid",
             on_trial: Callable[[dict], None] | None = None) -> tuple[list[int], list[dict[str, Any]]]:
    """(k, l0) by Bayesian optimisation (optuna's GP sampler, seeded), maximising evaluate(keeps).

    l0 is sampled as a fraction u of its feasible range [-1, l0_max(k)] so that every (k, u) meets the budget;
    a k for which no l0 does is pruned. `storage` (an optuna URL: sqlite, postgresql, mysql) lets several
    processes share one study; `trials` counts the study's finished trials, whoever ran them."""
    import optuna

    if not 1.0 / layers < budget <= 1.0:
        raise VtrError(f"--budget {budget}: with r(0) = 1 the mean keep fraction over {layers} layers is above "
                       f"1/{layers} = {1 / layers:.4f}; pick a budget in ({1 / layers:.4f}, 1]")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                sampler=optuna.samplers.GPSampler(seed=seed), load_if_exists=True)

    def objective(trial: optuna.Trial) -> float:
        k = trial.suggest_float("k", 0.25, 10.0, log=True)
        u = trial.suggest_float("u", 0.0, 1.0)
        top = l0_max(k, layers, budget)
        if top is None:
            raise optuna.TrialPruned()
        l0 = -1.0 + u * (top + 1.0)
        keeps = psigmoid_keeps(k, l0, n, layers, budget)
        if keeps is None:
            raise optuna.TrialPruned()
        v = evaluate(keeps)
        trial.set_user_attr("l0", l0)
        trial.set_user_attr("r_min", solve_rmin(k, l0, layers, budget))
        trial.set_user_attr("keep", keeps)
        rec = {"trial": trial.number, "k": k, "l0": l0, "keep": keeps, "value": v}
        log.info("psigmoid trial %d: k=%.3f l0=%.2f -> %.4f", trial.number, k, l0, v)
        if on_trial:
            on_trial(rec)
        return v

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    stop = optuna.study.MaxTrialsCallback(trials, states=states)
    done = len(study.get_trials(deepcopy=False, states=states))
    if done < trials:
        study.optimize(objective, n_trials=trials - done, callbacks=[stop])
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not finished:
        raise VtrError(f"psigmoid: no feasible trial for budget {budget}; try a larger --budget")
    log_ = [{"trial": t.number, "k": t.params["k"], "l0": t.user_attrs["l0"], "r_min": t.user_attrs["r_min"],
             "keep": t.user_attrs["keep"], "value": t.value} for t in sorted(finished, key=lambda t: t.number)]
    best = max(log_, key=lambda r: (r["value"], -r["trial"]))
    return best["keep"], log_


def vtw_layer(kl_of: Callable[[int], float], layers: int, threshold: float = VTW_KL) -> tuple[int | None, list[dict]]:
    """VTW's K: the first layer where withdrawing every image token changes the last token's next-token
    distribution by mean KL <= threshold on the calibration prompts."""
    steps = []
    for k in range(1, layers):
        kl = kl_of(k)
        steps.append({"layer": k, "kl": kl, "passed": kl <= threshold})
        log.info("vtw K=%d: mean KL %.5f", k, kl)
        if kl <= threshold:
            return k, steps
    return None, steps
