"""Measured memory of a serving process (engine/resident.py, `profile --memory`): each engine in a fresh process,
resident once loaded, then the peak after prefills and after generations; a system that cannot measure it is
refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from vtrcompile.cli import main
from vtrcompile.engine import resident
from vtrcompile.engine.runners import read_engine_metadata
from vtrcompile.errors import VtrError
from vtrcompile.profile import compare, format_report


def test_status_lines_are_read_in_kib_and_a_missing_one_is_a_one_line_error(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  123456 kB\nVmRSS:\t   65432 kB\n")
    assert resident.status_kib("VmHWM", status) == 123456
    assert resident.status_kib("VmRSS", status) == 65432
    with pytest.raises(VtrError, match="VmSwap.*--memory"):
        resident.status_kib("VmSwap", status)
    with pytest.raises(VtrError, match="Linux"):
        resident.status_kib("VmHWM", tmp_path / "no-such-file")
    with pytest.raises(VtrError, match="reset the peak.*--memory"):
        resident.reset_peak(tmp_path / "no-dir" / "clear_refs")


def test_a_system_that_cannot_reset_the_peak_is_refused_before_any_work(tmp_path, monkeypatch):
    resident.check_available()  # this machine can
    monkeypatch.setattr(resident, "CLEAR_REFS", tmp_path / "no-dir" / "clear_refs")
    with pytest.raises(VtrError, match="reset the peak.*cannot be written.*--memory"):
        resident.check_available()


def test_the_peak_is_reset_to_what_is_resident_now():
    """After a reset, VmHWM is this process's resident memory, not the peak it reached before."""
    import numpy as np

    big = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched
    peak = resident.status_kib("VmHWM")
    del big
    resident.reset_peak()
    after = resident.status_kib("VmHWM")
    assert after <= resident.status_kib("VmRSS") + 1024 and after < peak - 32 * 1024


@pytest.fixture(scope="module")
def pair(tiny_engines):
    return Path(tiny_engines["prumerge"].files[-1]), Path(tiny_engines["none"].files[-1])


def test_profile_measures_each_engine_in_a_fresh_process(pair, opened_engines):
    """`profile --memory` measures each engine in a fresh process; in its own process `profile` opens each engine
    once, as every open engine holds its own copy of the weights (a second opening of both prefill engines for the
    generation profile held 4.8 GB at peak against 3.5 GB, `llava15-geometry` f32)."""
    reduced, baseline = pair
    r = compare(reduced, baseline, warmup=1, reps=2, threads=1, new_tokens=3, memory=True)
    assert r["generation"]["engines"]["reduced"]["cache_matches_schedule"]
    decode = read_engine_metadata(reduced)["decode"]["file"]
    assert sorted(opened_engines) == sorted([reduced.name, baseline.name, decode, decode]), opened_engines
    for name in ("reduced", "baseline"):
        m = r["memory"][name]
        assert set(m) == {"loaded_mib", "peak_after_prefills_mib", "decode_opened_mib", "peak_after_generations_mib"}
        # a Python process with torch and an engine loaded; the peak only grows from its reset
        assert 100 < m["loaded_mib"] <= m["peak_after_prefills_mib"] + 1 <= m["peak_after_generations_mib"] + 1
        # opening the decode engine (its weights, its session) grows the process, by less than all it holds after
        assert 0 < m["decode_opened_mib"] < m["peak_after_generations_mib"]
    text = format_report(r)
    assert "resident memory (MiB)" in text and "peak, + 2 generations" in text and "fresh process" in text
    assert "decode engine opened (+)" in text
    # prefill only: no generation row
    r = compare(reduced, baseline, warmup=0, reps=1, threads=1, new_tokens=0, memory=True)
    assert set(r["memory"]["reduced"]) == {"loaded_mib", "peak_after_prefills_mib"}
    assert "peak, 2 prefills" in format_report(r) and "generations" not in format_report(r)
    assert "decode engine" not in format_report(r)


def test_a_failed_measurement_is_one_line(tmp_path):
    not_an_engine = tmp_path / "x.onnx"
    not_an_engine.write_bytes(b"not onnx")
    with pytest.raises(VtrError, match="x.onnx: the memory measurement failed .*run without --memory"):
        resident.measure(not_an_engine, 2, 1, 35, 20)


def test_memory_options_that_cannot_work_fail_before_any_work(pair, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    res = CliRunner().invoke(main, ["optimize", "tiny", "--method", "fastv", "--keep", "8", "--out",
                                    str(out / "f.onnx"), "--memory"])
    assert res.exit_code == 2 and "add --profile" in res.output and not any(out.iterdir()), res.output
    monkeypatch.setattr(resident, "STATUS", tmp_path / "no-status")
    res = CliRunner().invoke(main, ["optimize", "tiny", "--method", "fastv", "--keep", "8", "--out",
                                    str(out / "f.onnx"), "--profile", "--memory"])
    assert res.exit_code == 2 and "Linux" in res.output and not any(out.iterdir()), res.output
    reduced, baseline = pair
    res = CliRunner().invoke(main, ["profile", str(reduced), "--baseline", str(baseline), "--memory"])
    assert res.exit_code == 2, res.output
    assert [ln for ln in res.output.splitlines() if ln.startswith("error:")] == \
        [ln for ln in res.output.splitlines() if ln.strip()], res.output


def test_the_serving_refusal_advises_what_the_engine_would_need_less_with():
    """The advice follows the engine's metadata: a decode engine is told of one-file engines, an engine with
    uncompressed weights of --weights int4 (ONNX Runtime and OpenVINO take it), a float32 one of bfloat16; an
    engine whose metadata is unknown before loading (AOTInductor's) only of more memory."""
    from vtrcompile.memory import serving_estimate

    def advice(meta):
        need, what, adv = serving_estimate(3 * 2**30, meta)
        assert need == 3 * 2**30 and what.startswith("its 3.2 GB of weights")
        return adv

    plain = advice({"role": "prefill", "dtype": "float32"})
    assert [a.split(" ")[0] for a in plain] == ["rebuild", "--dtype", "free"], plain
    assert "--weights int4" in plain[0]
    decode = advice({"role": "decode", "dtype": "bfloat16", "weights": "none"})
    assert [a.split(" ")[0] for a in decode] == ["build", "rebuild", "free"], decode
    compressed = advice({"role": "decode", "dtype": "float32", "weights": "int4"})
    assert not any("--weights" in a for a in compressed) and len(compressed) == 3, compressed
    assert advice(None) == ["free memory or use a machine with more"]


def test_an_engine_whose_weights_do_not_fit_is_refused_before_it_is_opened(pair, monkeypatch):
    """Each runtime keeps its own copy of an engine's weights (the decode engine a second one of the LLM's): opening
    an engine is refused in one line, naming the numbers, when its weights exceed the memory available, instead of
    the kernel killing the process halfway through loading."""
    import onnx
    from onnx import numpy_helper

    from vtrcompile import load_engine, memory
    from vtrcompile.lower.onnxruntime import read_engine

    reduced, baseline = pair
    weights = read_engine(reduced)[1]
    model = onnx.load(str(reduced))  # the weights themselves, external data resolved
    assert weights == sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer) > 0
    decode = reduced.parent / read_engine(reduced)[0]["decode"]["file"]
    decode_weights = read_engine(decode)[1]
    monkeypatch.setattr(memory, "available_bytes", lambda: weights - 1)
    with pytest.raises(VtrError) as e:
        load_engine(reduced, threads=1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"opening {reduced.name} needs about")
    assert f"{weights / memory.GB:.1f} GB of weights" in msg and "available" in msg and "second copy" not in msg
    assert "rebuild it with `vtrcompile optimize --weights int4` and no --dtype" in msg  # a float32 engine
    # the prefill engine fits; its decode engine, opened on the first generation, does not
    monkeypatch.setattr(memory, "available_bytes", lambda: max(weights, decode_weights) + 1)
    engine = load_engine(reduced, threads=1)
    monkeypatch.setattr(memory, "available_bytes", lambda: decode_weights - 1)
    with pytest.raises(VtrError, match=f"opening {decode.name} needs about .*a second copy of the LLM's.*"
                       "build a one-file engine"):
        engine.decode  # noqa: B018
    # the commands say it in one line, exit 2
    r = CliRunner().invoke(main, ["profile", str(reduced), "--baseline", str(baseline), "--reps", "1"])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and "needs about" in r.output
