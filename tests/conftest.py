"""Shared fixtures: the tiny preset (random weights, built from a config) and cached builds."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping

import numpy as np
import pytest
import torch

from vtrcompile.build import build
from vtrcompile.models.loading import ModelSource, load_model

warnings.filterwarnings("ignore", category=FutureWarning)

# Named tolerance for "engine equals the method's eager reference" (float32 end to end).
REFERENCE_ATOL = 1e-4


@pytest.fixture(scope="session", autouse=True)
def _decode_cache(tmp_path_factory):
    """One decode engine per model, dtype and backend for the whole run, copied into each test's folder
    (vtrcompile/decode_cache.py), shared by the xdist workers of this run. Tests of building one take
    `no_decode_cache`."""
    from vtrcompile import decode_cache

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this run's folder, above each worker's own
    mp = pytest.MonkeyPatch()
    mp.setenv(decode_cache.ENV, str(root / "decode-cache"))
    yield
    mp.undo()


@pytest.fixture
def opened_engines(monkeypatch) -> list[str]:
    """The file names of the engines this test opens (each open engine holds its own copy of its weights)."""
    from pathlib import Path

    from vtrcompile.engine import generate, runners

    opened: list[str] = []
    real = runners.open_engine

    def counting(path, threads=None):
        opened.append(Path(path).name)
        return real(path, threads)

    monkeypatch.setattr(runners, "open_engine", counting)
    monkeypatch.setattr(generate, "open_engine", counting)
    return opened


@pytest.fixture
def no_decode_cache(monkeypatch):
    from vtrcompile import decode_cache

    monkeypatch.delenv(decode_cache.ENV, raising=False)


@pytest.fixture(scope="session")
def tiny() -> ModelSource:
    return load_model("tiny")


@functools.cache
def _cached_build(method: str, options: tuple):
    return build(load_model("tiny"), method, dict(options))


@pytest.fixture(scope="session")
def tiny_build():
    """tiny_build(method, **options) -> Build, cached across the session."""
    return lambda method, **opts: _cached_build(method, tuple(sorted(opts.items())))


def prompts(config, cases=((5, 8), (1, 1), (20, 3), (0, 12))):
    """Prompts with different prefix/suffix lengths around the image block, each with its own image."""
    from vtrcompile.models.loading import example_prompt

    return [example_prompt(config, pre, suf, seed=10 + i) for i, (pre, suf) in enumerate(cases)]


def max_diff(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


def check_against_reference(engine, reference, source: ModelSource) -> None:
    """engine(ids, px) equals reference(model, ids, px) within REFERENCE_ATOL over several prompts, and
    differs from the unmodified model (so the reduction really happened). A rewritten graph returns the KV
    cache after its logits; only the logits are compared here."""
    m = source.hf_model
    for ids, px in prompts(m.config):
        with torch.no_grad():
            got = engine(ids, px)
            if isinstance(got, (tuple, list)):
                got = got[0]
            assert max_diff(got, reference(m, ids, px)) <= REFERENCE_ATOL
            assert max_diff(got, source.module(ids, px)) > 10 * REFERENCE_ATOL


def check_generation(engine, model, prompt_list, prefill, positions: str, steps: int) -> list:
    """engine.generate over prompt_list equals the spec's generation reference (reference/generation.py): the
    same greedy tokens, per-step logits within REFERENCE_ATOL, each layer's cache length the reference's.
    Returns the engine's outputs, in prompt order."""
    from vtrcompile.reference.generation import generate_reference

    outs = []
    for ids, px in prompt_list:
        out = engine.generate(input_ids=ids.numpy(), pixel_values=px.numpy(), max_new_tokens=steps, eos_token_id=[])
        tokens, logits, lengths = generate_reference(model, ids, px, prefill, positions, steps)
        assert out.tokens[0].tolist() == tokens.tolist()
        assert float(np.abs(out.logits[0] - logits.numpy()).max()) <= REFERENCE_ATOL
        assert out.cache_lengths == lengths
        outs.append(out)
    return outs


# name -> (method, options) of the tiny ONNX engines; the second budgets are only used by tests marked slow
TINY_ENGINES = {
    "fastv-k2-18": ("fastv", {"layer": 2, "keep": 18}), "fastv-k1-5": ("fastv", {"layer": 1, "keep": 5}),
    "gprune-9": ("gprune", {"keep": 9}), "gprune-default": ("gprune", {}), "pyramiddrop": ("pyramiddrop", {}),
    "vtw": ("vtw", {}), "pumer": ("pumer", {}), "prumerge": ("prumerge", {"keep": 8}),
    "prumerge-plus": ("prumerge-plus", {}), "visionzip": ("visionzip", {"dominant": 8, "contextual": 4}),
    "none": ("none", {}),
    "random": ("random", {}), "pool": ("pool", {}), "divprune-9": ("divprune", {"keep": 9}),
    "dart-12": ("dart", {"keep": 12}),
    "divprune+fastv": ("divprune", {"keep": 20, "then": "fastv keep=8"}),
    "gprune+pyramiddrop": ("gprune", {"keep": 20, "then": "pyramiddrop"}),
    # second budgets
    "pyramiddrop-0.7": ("pyramiddrop", {"keep_ratio": 0.7}), "vtw-1": ("vtw", {"layer": 1}),
    "pumer-0.2": ("pumer", {"prune_ratio": 0.2, "merge_ratio": 0.2}), "prumerge-20": ("prumerge", {"keep": 20}),
    "prumerge-plus-0.25": ("prumerge-plus", {"keep_ratio": 0.25}),
    "visionzip-20-6": ("visionzip", {"dominant": 20, "contextual": 6}),
    "random-llm2": ("random", {"site": "llm@2", "keep": 10, "seed": 3}), "pool-9": ("pool", {"keep": 9}),
    "divprune-default": ("divprune", {}), "dart-20": ("dart", {"keep": 20, "layer": 1}),
    "pool+dart": ("pool", {"keep": 16, "then": "dart keep=12 layer=1"}),
}
SECOND_BUDGETS = {"pyramiddrop-0.7", "vtw-1", "pumer-0.2", "prumerge-20", "prumerge-plus-0.25", "visionzip-20-6",
                  "random-llm2", "pool-9", "divprune-default", "dart-20", "pool+dart"}
# Engines whose per-backend checks run only with -m slow: every ONNX export costs 10-20 s on 2 cores, so the
# default run keeps one engine per kind of rewrite (FastV: keep at llm@K, G-Prune: projector, PyramidDrop:
# progressive renumber, PuMer: merge, PruMerge: vision site, Random: constant subset, DivPrune+FastV: stacked).
# The graphs of the others still equal their eager references in the default run (tests/methods, passes).
SLOW_ENGINES = SECOND_BUDGETS | {"fastv-k1-5", "gprune-default", "vtw", "prumerge-plus", "visionzip", "pool",
                                 "divprune-9", "dart-12", "gprune+pyramiddrop"}


class FamilyEngines(dict):
    """ONNX engines of one model, built on first use (a run builds only those its selected tests need) into one
    folder, so they share one decode engine: name -> `optimize`'s result for `recipes[name]` = (method, options)."""

    def __init__(self, src, folder, recipes: dict[str, tuple[str, dict]], max_prompt: int = 256) -> None:
        super().__init__()
        self.src, self.folder, self.recipes, self.max_prompt = src, folder, recipes, max_prompt

    def __missing__(self, name: str):
        from vtrcompile.optimize import optimize

        method, opts = self.recipes[name]
        self[name] = optimize(self.src, method, opts, self.folder / f"{name}.onnx", max_prompt=self.max_prompt)
        return self[name]


class _Engines(Mapping):
    """Engines built on first use (so a run builds only those its selected tests need), into one folder so
    they share one decode engine."""

    def __init__(self, tiny, tiny_build, folder) -> None:
        self._tiny, self._build, self._folder, self._done = tiny, tiny_build, folder, {}

    def __getitem__(self, name: str):
        if name not in self._done:
            from vtrcompile.optimize import write_engine

            method, opts = TINY_ENGINES[name]
            self._done[name] = write_engine(self._build(method, **opts), self._tiny, self._folder / f"{name}.onnx")
        return self._done[name]

    def __iter__(self):
        return iter(TINY_ENGINES)

    def __len__(self) -> int:
        return len(TINY_ENGINES)


@pytest.fixture(scope="session")
def tiny_engines(tiny, tiny_build, tmp_path_factory):
    """ONNX Runtime engines of the tiny preset for every method (two budgets each), built on first use."""
    return _Engines(tiny, tiny_build, tmp_path_factory.mktemp("engines"))


def budget_params(pairs):
    """pytest params over (engine name, ...) tuples; the engines of SLOW_ENGINES marked slow."""
    return [pytest.param(*p, marks=pytest.mark.slow) if p[0] in SLOW_ENGINES else p for p in pairs]


@pytest.fixture(scope="session")
def calibration_dir(tmp_path_factory):
    """A calibration folder: a few vqa-synth images as PNG files (no prompts.jsonl)."""
    from PIL import Image

    from vtrcompile.datasets import vqa_synth as vs

    d = tmp_path_factory.mktemp("calibration")
    for i in range(6):
        Image.fromarray(vs.render(vs.sample("val", i).scene)).save(d / f"img{i}.png")
    return d
