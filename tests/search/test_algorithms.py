"""G-Search, P-Sigmoid and VTW's rule on synthetic quality functions with known optima."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from vtrcompile.errors import VtrError
from vtrcompile.search.algorithms import (
    grid_counts,
    gsearch,
    l0_max,
    psigmoid,
    psigmoid_keeps,
    solve_rmin,
    vtw_layer,
)

N, L = 576, 12


def test_grid():
    assert grid_counts(N, N) == [576, 432, 288, 216, 144, 108, 72, 36, 0]
    assert grid_counts(N, 144) == [144, 108, 72, 36, 0]


@pytest.mark.parametrize("need", [
    [576, 300, 300, 200, 150, 150, 100, 40, 40, 10, 0, 0],
    [576, 576, 576, 500, 100, 1, 1, 1, 1, 1, 1, 1],
    [576] * 12,
])
def test_gsearch_finds_the_minimal_monotone_schedule(need):
    """Quality passes iff every layer keeps at least need_l (monotone in every count): the answer is, per
    layer, the smallest grid count >= need_l; bisection uses few evaluations."""
    calls = []

    def evaluate(keeps):
        calls.append(keeps)
        return 1.0 if all(k >= r for k, r in zip(keeps, need, strict=True)) else 0.0

    keeps, steps = gsearch(evaluate, lambda v: v >= 1.0, N, L)
    want = [N] + [min(c for c in grid_counts(N, N) if c >= r) for r in need[1:]]
    for i in range(1, L):  # never above the layer before
        want[i] = min(want[i], want[i - 1])
    assert keeps == want
    assert all(b <= a for a, b in zip(keeps, keeps[1:], strict=False))
    assert len(calls) <= 4 * (L - 1)  # bisection over 9 grid points: at most 4 per layer
    assert all(s["passed"] == (s["value"] >= 1.0) for s in steps)


def test_gsearch_checkpoints_each_layer_with_the_accepted_prefix():
    seen = []
    gsearch(lambda k: 1.0, lambda v: True, 64, 4, before_layer=lambda k, layer: seen.append((layer, list(k))))
    assert seen == [(1, [64, 64, 64, 64])]  # all-zero after layer 1: no later decisions are left


@pytest.mark.parametrize("budget", [0.25, 0.125, 0.5])
@pytest.mark.parametrize("k,l0", [(0.5, 2.0), (2.0, 4.5), (5.0, 0.3), (1.0, -0.5)])
def test_psigmoid_meets_the_budget_exactly(budget, k, l0):
    top = l0_max(k, L, budget)
    if top is None or l0 > top:
        assert psigmoid_keeps(k, l0, N, L, budget) is None
        return
    keeps = psigmoid_keeps(k, l0, N, L, budget)
    assert keeps[0] == N and sum(keeps) == round(budget * L * N)
    assert all(b <= a for a, b in zip(keeps, keeps[1:], strict=False))
    assert 0 <= solve_rmin(k, l0, L, budget) <= 1


def _quality(keeps):
    """Best when the counts follow an early drop to a floor: peaks at one (k, l0) region."""
    target = [576, 400, 200, 90, 60, 50, 45, 40, 35, 30, 25, 20]
    return -sum((a - b) ** 2 for a, b in zip(keeps, target, strict=True)) / 1e5


def test_psigmoid_improves_over_its_first_trial(tmp_path):
    keeps, trials = psigmoid(_quality, N, L, 0.25, 16, seed=0, storage=f"sqlite:///{tmp_path}/s.db")
    assert len(trials) >= 12
    assert max(t["value"] for t in trials) > trials[0]["value"]
    assert _quality(keeps) == max(t["value"] for t in trials)
    assert sum(keeps) == round(0.25 * L * N)


def test_psigmoid_is_seeded(tmp_path):
    a = psigmoid(_quality, N, L, 0.25, 5, seed=3, storage=f"sqlite:///{tmp_path}/a.db")[1]
    b = psigmoid(_quality, N, L, 0.25, 5, seed=3, storage=f"sqlite:///{tmp_path}/b.db")[1]
    assert [t["keep"] for t in a] == [t["keep"] for t in b]


def test_budget_below_one_layer_is_refused():
    with pytest.raises(VtrError, match="above 1/12"):
        psigmoid(_quality, N, L, 0.05, 2)


def _worker(storage: str, trials: int, log: str) -> None:
    import os
    import time

    def quality(keeps):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.2)  # long enough that both workers are inside the study at once
        return _quality(keeps)

    psigmoid(quality, N, L, 0.25, trials, seed=1, storage=storage, study_name="shared")


def test_two_workers_share_one_sqlite_study(tmp_path):
    """Two processes run trials of one study through SQLite; together they stop at --trials."""
    import optuna

    storage = f"sqlite:///{tmp_path}/shared.db"
    optuna.create_study(study_name="shared", storage=storage, direction="maximize")  # no creation race
    ctx = mp.get_context("spawn")
    log = tmp_path / "pids.txt"
    procs = [ctx.Process(target=_worker, args=(storage, 10, str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    study = optuna.load_study(study_name="shared", storage=storage)
    done = [t for t in study.trials if t.state.is_finished()]
    assert 10 <= len(done) <= 11  # MaxTrialsCallback: a trial already running when the limit is hit may finish
    pids = log.read_text().split()
    assert len(set(pids)) == 2 and len(pids) == len([t for t in done if t.value is not None])


def test_vtw_picks_the_first_layer_under_the_threshold():
    kls = {1: 0.3, 2: 0.01, 3: 0.004, 4: 0.001}
    k, steps = vtw_layer(lambda k: kls.get(k, 0.0), 6)
    assert k == 3 and [s["layer"] for s in steps] == [1, 2, 3]
    assert vtw_layer(lambda k: 1.0, 4)[0] is None
