"""The `schedule` method: structure, the compiled graph (and ONNX Runtime engine) against the eager reference
and the search's evaluator, a schedule that must not fire, and the schedule file's guards."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from tests.conftest import REFERENCE_ATOL, max_diff, prompts
from vtrcompile.build import build
from vtrcompile.cli import main
from vtrcompile.errors import VtrError
from vtrcompile.evaluation import Item
from vtrcompile.lower.onnxruntime import OrtEngine
from vtrcompile.methods.registry import resolve
from vtrcompile.optimize import model_id, write_engine
from vtrcompile.reference.baselines import divprune_stage, projector_stage
from vtrcompile.reference.blocks import full_logits
from vtrcompile.reference.methods import run_stages, schedule_reference, schedule_sites
from vtrcompile.reference.vision import prumerge_plus_reference, prumerge_reference, visionzip_reference
from vtrcompile.search.evaluator import ScheduleEvaluator
from vtrcompile.search.schedule_file import load_schedule, save_schedule

SCHEDULES = {
    "progressive": [36, 36, 20, 9],
    "early-withdraw": [36, 12, 0, 0],
    "one-site": [36, 36, 36, 5],
}


def _write(tmp_path, tiny, keeps, name="s.json", **over):
    rec = {"algo": "gsearch", "settings": {}, "model": tiny.label, "model_id": model_id(tiny.module, None),
           "n_image": 36, "llm_layers": 4, "keep": keeps, "complete": True, **over}
    save_schedule(tmp_path / name, rec)
    return tmp_path / name


@pytest.fixture(scope="module")
def builds(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("sched")
    return {name: build(tiny, "schedule", {"schedule": str(_write(d, tiny, k, f"{name}.json"))})
            for name, k in SCHEDULES.items()}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_sites_and_tokens_follow_the_schedule(builds, name):
    b, keeps = builds[name], SCHEDULES[name]
    drops = [(layer, keeps[layer]) for layer in range(1, 4) if keeps[layer] < keeps[layer - 1]]
    if 0 in keeps:
        drops = drops[:drops.index(next(d for d in drops if d[1] == 0)) + 1]
    assert [(r.layer, r.count) for r in b.reductions] == drops
    s = b.example_inputs[0].shape[1]
    assert b.llm_tokens(s) == [s - 36 + k for k in keeps]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_graph_equals_reference_and_the_search_evaluator(tiny, builds, name):
    m, keeps = tiny.hf_model, SCHEDULES[name]
    cases = prompts(m.config)
    ev = ScheduleEvaluator(m, [Item(ids.numpy(), px.numpy()) for ids, px in cases])
    got_ev = ev.logits(keeps)
    ev.checkpoint(keeps, 2)  # the G-Search path: start from cached states entering layer 2
    got_cp = ev.logits(keeps)
    for i, (ids, px) in enumerate(cases):
        with torch.no_grad():
            graph = builds[name].logits(ids, px)
        ref = schedule_reference(m, ids, px, keeps)
        assert max_diff(graph, ref) <= REFERENCE_ATOL
        assert max_diff(got_ev[i], graph[0]) <= REFERENCE_ATOL
        assert max_diff(got_cp[i], graph[0]) <= REFERENCE_ATOL
        assert max_diff(graph, tiny.module(ids, px)) > 10 * REFERENCE_ATOL


def test_onnxruntime_engine_equals_reference(tiny, builds, tmp_path):
    eng = OrtEngine(write_engine(builds["progressive"], tiny, tmp_path / "s.onnx").files[-1], threads=1)
    for ids, px in prompts(tiny.hf_model.config)[:2]:
        ref = schedule_reference(tiny.hf_model, ids, px, SCHEDULES["progressive"])
        assert max_diff(eng(ids.numpy(), px.numpy()), ref) <= REFERENCE_ATOL


def test_schedule_without_drops_does_not_fire(tiny, tmp_path):
    b = build(tiny, "schedule", {"schedule": str(_write(tmp_path, tiny, [36, 36, 36, 36]))})
    assert b.reductions == []
    ids, px = prompts(tiny.hf_model.config)[0]
    with torch.no_grad():
        assert max_diff(b.logits(ids, px), full_logits(tiny.hf_model, ids, px)) <= REFERENCE_ATOL
        assert max_diff(ScheduleEvaluator(tiny.hf_model, [Item(ids.numpy(), px.numpy())]).full[0],
                        b.logits(ids, px)[0]) <= REFERENCE_ATOL


def test_schedule_file_guards(tiny, tmp_path):
    with pytest.raises(VtrError, match="did not finish"):
        load_schedule(_write(tmp_path, tiny, [36, 20, 10, 5], complete=False))
    with pytest.raises(VtrError, match="non-increasing"):
        load_schedule(_write(tmp_path, tiny, [36, 20, 25, 5]))
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(VtrError, match="not a JSON schedule"):
        load_schedule(tmp_path / "x.json")


def test_optimize_refuses_a_schedule_for_another_model(tiny, tmp_path):
    other = _write(tmp_path, tiny, [36, 20, 10, 5], name="other.json", model_id="0123456789abcdef")
    r = CliRunner().invoke(main, ["optimize", "tiny", "--method", "schedule", "--schedule", str(other),
                                  "--out", str(tmp_path / "e.onnx")])
    assert r.exit_code == 2 and "searched on model" in r.output and not (tmp_path / "e.onnx").exists()
    wrong_n = _write(tmp_path, tiny, [36, 20, 10, 5], name="n.json", n_image=576)
    r = CliRunner().invoke(main, ["optimize", "tiny", "--method", "schedule", "--schedule", str(wrong_n),
                                  "--out", str(tmp_path / "e.onnx")])
    assert r.exit_code == 2 and "error:" in r.output


def test_search_cli_end_to_end_and_resume(tiny, tmp_path, calibration_dir):
    out = tmp_path / "g.json"
    args = ["search", "tiny", "--algo", "gsearch", "--calibration", str(calibration_dir), "--out", str(out),
            "--tolerance", "0.2", "--count", "4"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    assert rec["complete"] and rec["model_id"] == model_id(tiny.module, None) and rec["metric"]["name"] == "agreement"
    assert rec["keep"][0] == 36 and len(rec["keep"]) == 4 and rec["evaluations"]
    # An interrupted run (complete: false) resumes from its evaluations: nothing is evaluated twice.
    rec["complete"] = False
    out.write_text(json.dumps(rec))
    r = CliRunner().invoke(main, args)
    again = json.loads(out.read_text())
    assert r.exit_code == 0 and again["keep"] == rec["keep"]
    assert len(again["evaluations"]) == len(rec["evaluations"])
    r = CliRunner().invoke(main, ["optimize", "tiny", "--method", "schedule", "--schedule", str(out),
                                  "--out", str(tmp_path / "s.onnx")])
    assert r.exit_code == 0, r.output


FIRST = "divprune keep=20 keep_ratio=0.098"  # the canonical text of --method divprune --keep 20


def test_schedule_after_a_projector_stage_equals_reference_and_evaluator(tiny, tmp_path):
    """divprune keep=20, then a searched schedule over the 20 tokens it leaves: the engine equals the eager
    composition and the search evaluator run with the same first stage."""
    m, keeps = tiny.hf_model, [20, 20, 10, 5]
    path = _write(tmp_path, tiny, keeps, n_image=20, first=FIRST)
    b = build(tiny, "divprune", {"keep": 20, "then": f"schedule schedule={path}"})
    assert [(r.method, r.layer, r.count) for r in b.reductions] == [("divprune", 0, 20), ("schedule", 2, 10),
                                                                     ("schedule", 3, 5)]
    cases = prompts(m.config)
    stage = projector_stage(resolve("divprune", {"keep": 20}, 36, 4)[0])
    ev = ScheduleEvaluator(m, [Item(ids.numpy(), px.numpy()) for ids, px in cases], first=stage)
    assert ev.n_image == 20
    got = ev.logits(keeps)
    for i, (ids, px) in enumerate(cases):
        with torch.no_grad():
            graph = b.logits(ids, px)
        ref = run_stages(m, ids, px, first=divprune_stage(20), sites=schedule_sites(m, keeps))
        assert max_diff(graph, ref) <= REFERENCE_ATOL
        assert max_diff(got[i], graph[0]) <= REFERENCE_ATOL


# A vision-site method as the first stage: its eager block comes from the pixels (reference/vision.py), and the
# search's evaluator runs the same stage; (method, options given, the canonical text, tokens it leaves).
VISION_FIRSTS = [
    ("prumerge", {"keep": 8}, "prumerge keep=8", 9),
    ("prumerge-plus", {"keep_ratio": 0.25}, "prumerge-plus keep_ratio=0.25", 19),
    ("visionzip", {"dominant": 8, "contextual": 4}, "visionzip contextual=4 dominant=8", 12),
]


@pytest.mark.parametrize("method,given,text,n", VISION_FIRSTS, ids=[v[0] for v in VISION_FIRSTS])
def test_schedule_after_a_vision_stage_equals_reference_and_evaluator(tiny, tmp_path, method, given, text, n):
    """A vision-site method, then a searched schedule over the n tokens it leaves: the engine equals the eager
    composition of the two references and the search evaluator run with the same first stage."""
    from vtrcompile.reference.vision import vision_stage
    from vtrcompile.search.job import first_stage

    m, keeps = tiny.hf_model, [n, n, n // 2, 2]
    path = _write(tmp_path, tiny, keeps, n_image=n, first=text)
    b = build(tiny, method, {**given, "then": f"schedule schedule={path}"})
    assert [(r.method, r.layer, r.count) for r in b.reductions] == [(method, 0, n), ("schedule", 2, n // 2),
                                                                     ("schedule", 3, 2)]
    stage, canonical = first_stage(m, " ".join([method, *(f"{k}={v}" for k, v in given.items())]))
    assert canonical == text
    cases = prompts(m.config)[:3]
    ev = ScheduleEvaluator(m, [Item(ids.numpy(), px.numpy()) for ids, px in cases], first=stage)
    assert ev.n_image == n
    got = ev.logits(keeps)
    ref_stage = vision_stage(resolve(method, given, 36, 4)[0])
    for i, (ids, px) in enumerate(cases):
        with torch.no_grad():
            graph = b.logits(ids, px)
        ref = run_stages(m, ids, px, first=ref_stage, sites=schedule_sites(m, keeps))
        assert max_diff(graph, ref) <= REFERENCE_ATOL
        assert max_diff(got[i], graph[0]) <= REFERENCE_ATOL
    # the stage alone (the evaluator's unreduced schedule) is the vision method's own whole-model reference
    alone = {"prumerge": lambda i, p: prumerge_reference(m, i, p, 8),
             "prumerge-plus": lambda i, p: prumerge_plus_reference(m, i, p, 0.25),
             "visionzip": lambda i, p: visionzip_reference(m, i, p, 8, 4)}[method]
    for i, (ids, px) in enumerate(cases):
        assert max_diff(ev.full[i], alone(ids, px)[0]) <= REFERENCE_ATOL


def test_a_schedule_is_compiled_after_the_stage_it_was_searched_after(tiny, tmp_path):
    staged = _write(tmp_path, tiny, [20, 20, 10, 5], name="staged.json", n_image=20, first=FIRST)
    plain = _write(tmp_path, tiny, [36, 20, 10, 5], name="plain.json")
    out = tmp_path / "e.onnx"
    for args, msg in [
        (["--method", "schedule", "--schedule", str(staged)], "searched after the first stage 'divprune keep=20"),
        (["--method", "divprune", "--keep", "20", "--then", f"schedule schedule={plain}"],
         "searched without a first stage; search again with --first \"divprune keep=20 keep_ratio=0.098\""),
        (["--method", "divprune", "--keep", "24", "--then", f"schedule schedule={staged}"],
         "searched after the first stage 'divprune keep=20"),
    ]:
        r = CliRunner().invoke(main, ["optimize", "tiny", *args, "--out", str(out)])
        assert r.exit_code == 2 and msg in r.output, r.output
        assert not out.exists()


@pytest.mark.slow
def test_search_with_a_first_stage_end_to_end(tiny, tmp_path, calibration_dir):
    out = tmp_path / "g.json"
    r = CliRunner().invoke(main, ["search", "tiny", "--algo", "gsearch", "--calibration", str(calibration_dir),
                                  "--out", str(out), "--tolerance", "0.2", "--count", "3", "--first",
                                  "divprune keep=20"])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    assert rec["first"] == FIRST and rec["n_image"] == 20 and rec["keep"][0] == 20
    assert '--method divprune --keep 20 --keep-ratio 0.098 --then "schedule schedule=' in r.output
    r = CliRunner().invoke(main, ["optimize", "tiny", "--method", "divprune", "--keep", "20", "--then",
                                  f"schedule schedule={out}", "--out", str(tmp_path / "s.onnx")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["search", "tiny", "--algo", "gsearch", "--calibration", str(calibration_dir),
                                  "--out", str(tmp_path / "h.json"), "--first", "fastv keep=9"])
    assert r.exit_code == 2 and "fastv is not a vision or projector method the search can run" in r.output


@pytest.mark.parametrize("first, says", [("", 'e.g. --first "divprune keep=288"'),
                                         ("bogus keep=3", "--first: unknown method 'bogus'"),
                                         ("divprune keep", "--first: 'keep' is not key=value")])
def test_a_bad_first_stage_is_named_as_first(first, says, tmp_path):
    """search --first is parsed before the model loads, and its errors name --first, not --then."""
    out = tmp_path / "s.json"
    r = CliRunner().invoke(main, ["search", "tiny", "--algo", "gsearch", "--calibration", "vqa-synth:val",
                                  "--out", str(out), "--first", first])
    assert r.exit_code == 2 and says in r.output and "--then" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()


def test_keep_auto_refuses_the_test_split(tmp_path):
    out = tmp_path / "never-written.onnx"
    r = CliRunner().invoke(main, ["optimize", "models/vqa-synth-llava", "--method", "prumerge", "--keep", "auto",
                                  "--calibration", "vqa-synth:test", "--out", str(out)])
    assert r.exit_code == 2 and "never used for choices" in r.output
    assert not any(tmp_path.iterdir())
