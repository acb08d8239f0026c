"""The sweep's budgets for every method and stacked pair, its paired noise estimate, and a stacked pair end to end."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from vtrcompile import sweep
from vtrcompile.cli import main
from vtrcompile.errors import VtrError
from vtrcompile.methods.registry import resolve


@pytest.mark.parametrize("method", sweep.DEFAULT_METHODS)
def test_every_default_config_plans_on_the_demo_geometry(method):
    """Each budget is a valid option set (576 image tokens, 12 layers), landing near its fraction of N."""
    first = method.split("+")[0]
    cfgs = sweep.configs(method, 576, 12)
    assert cfgs
    if method == "pumer":  # its three-site schedule cannot reach 32 tokens: the sweep records the row as skipped
        with pytest.raises(VtrError, match="cannot be reached"):
            resolve("pumer", cfgs.pop(), 576, 12)
    for opts in cfgs:
        reds = resolve(first, opts, 576, 12)
        if "+" in method:
            assert reds[0].layer == 0 and reds[-1].layer >= 1 and opts["then"].startswith(method.split("+")[1])
    if method not in ("vtw", "prumerge-plus", "visionzip", "pyramiddrop") and "+" not in method:
        finals = [resolve(first, o, 576, 12)[-1].count for o in cfgs]
        assert all(abs(f - round(x * 576)) <= 8 for f, x in zip(finals, sweep.FRACTIONS, strict=False)), finals


def test_check_methods():
    sweep.check_methods(("fastv", "divprune+fastv"))
    for bad in ("nope", "none", "divprune+nope", "a+b+c", ""):
        with pytest.raises(VtrError, match="--methods: unknown"):
            sweep.check_methods((bad,))


def test_paired_delta():
    base = [1, 1, 1, 1, 0, 0, 1, 1]
    same = sweep.paired_delta(base, base)
    assert same == (0.0, 0.0)
    d, two_se = sweep.paired_delta([1, 1, 1, 0, 0, 0, 1, 1], base)
    assert d == pytest.approx(-12.5) and two_se == pytest.approx(200 * (0.125 * 0.875 * 8 / 7) ** 0.5 / 8 ** 0.5)


@pytest.mark.slow
def test_a_stacked_pair_sweeps_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    r = CliRunner().invoke(main, ["sweep", "models/vqa-synth-llava", "--methods", "divprune+fastv", "--count", "3",
                                  "--reps", "1", "--warmup", "0", "--out-dir", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [x["method"] for x in rows] == ["divprune+fastv"] * 3 and not any("skipped" in x for x in rows)
    assert all(x["speedup_p50"] > 0 and "delta_overall_2se" in x for x in rows)


def test_tables_show_a_class_without_questions_as_a_dash():
    """A few prompts may hold no question of one class (its accuracy is None): the sweep's markdown and the eval
    table print "-" there instead of failing."""
    from vtrcompile.cli import _format_eval

    acc = {"coarse": 0.5, "fine": None, "overall": 0.5, "per_kind": {}}
    r = {"model": "m", "model_id": "x", "benchmark": "vqa-synth", "prompts": 3, "n_image": 36,
         "environment": {"threads": 2}, "baseline": acc,
         "rows": [{"method": "fastv", "options": {"keep": 8}, "image_tokens_last_layer": 8, **acc,
                   "speedup_p50": 2.0}]}
    md = sweep.markdown(r)
    assert "| none | | 36 | 50.0 | - |" in md and "| 50.0 | - | +0.0 | - |" in md
    table = _format_eval({"benchmark": "vqa-synth", "baseline": acc,
                          "engines": [{"path": "e.onnx", "method": "fastv", "accuracy": acc}]})
    rows = [line.split() for line in table.splitlines()]
    assert ["(baseline)", "none", "50.0", "-", "50.0", "1.00x"] in rows
    assert ["e.onnx", "fastv", "50.0", "(+0.0)", "-", "50.0", "(+0.0)"] in rows
