"""Fuzzed inputs for every command and the Python API (seeded; a fixed sample that runs in CI; the larger
figure in BENCHMARKS.md comes from benchmarks/fuzz.py with the same harness)."""

from __future__ import annotations

import numpy as np
import pytest

from .harness import build_corpus, cases, run_case

SEED = 20261123
PER_KIND = 1  # cases per input kind and option (benchmarks/fuzz.py runs 8 per kind with two seeds)


@pytest.fixture(scope="module")
def fuzz_cases(tiny_engines, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    corpus = build_corpus(root / "corpus", tiny_engines["fastv-k2-18"].files[-1])
    return cases(corpus, np.random.default_rng(SEED), PER_KIND, root / "work")


def test_every_command_and_the_api_are_fuzzed(fuzz_cases):
    commands = {c.command for c in fuzz_cases}
    assert commands >= {"inspect", "optimize", "profile", "generate", "eval", "search", "sweep", "methods",
                        "load_engine", "engine()", "engine.generate"}
    assert len(fuzz_cases) >= 100


def test_no_traceback_no_wrong_exit_no_leftover_file(fuzz_cases):
    outcomes = [run_case(c) for c in fuzz_cases]
    bad = [f"{o.command} [{o.label}]: {o.problem}" for o in outcomes if o.problem]
    assert not bad, "\n".join(bad)
    # the damaged inputs were refused, not silently accepted: most cases end in a one-line error
    assert sum(o.exit_code == 2 for o in outcomes) >= 0.8 * len(outcomes)
