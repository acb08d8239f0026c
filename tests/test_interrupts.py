"""SIGINT / SIGTERM at several points of `optimize`, `search` and `sweep`: no temporary or partial file is
left, the exit code is 128 + the signal, and an interrupted search resumes from what it saved."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

CLI = [sys.executable, "-c", "from vtrcompile.cli import main; main()"]


def _hidden(d: Path) -> list[Path]:
    """Temporary files and folders (every one vtrcompile makes starts with a dot)."""
    return [p for p in d.rglob(".*")] if d.is_dir() else []


def _interrupt(args: list[str], when: Callable[[], bool], sig: int, timeout: float = 300) -> tuple[int, str, bool]:
    """Run the CLI, send `sig` as soon as when() holds; (exit code, stderr, whether the signal was sent)."""
    p = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0, sent = time.monotonic(), False
    while p.poll() is None and time.monotonic() - t0 < timeout:
        if _catches(p.pid, sig) and when():
            p.send_signal(sig)
            sent = True
            break
        time.sleep(0.002)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err, sent


def _catches(pid: int, sig: int) -> bool:
    """Whether the process has installed its handler for `sig` (before that, while Python imports, the
    default action kills it: no file has been written yet, but it cannot report the interrupt either)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return True  # no /proc: fall back to the other conditions alone
    return bool(caught >> (sig - 1) & 1)


def _appears(d: Path, pattern: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return any(e.name.startswith(pattern) for e in os.scandir(d))
        except FileNotFoundError:
            return False
    return check


def _after(seconds: float) -> Callable[[], bool]:
    """True `seconds` after it is first asked (the first ask comes once the CLI has its handlers)."""
    t0: list[float] = []

    def check() -> bool:
        t0 or t0.append(time.monotonic())
        return time.monotonic() - t0[0] > seconds
    return check


def _check_clean(out: Path, code: int, err: str, sig: int, sent: bool) -> None:
    assert sent, "the run ended before the signal point"
    assert not _hidden(out), _hidden(out)
    if code == 0:  # the signal landed after the last write: a complete result is fine
        return
    assert code == 128 + sig, err
    assert f"interrupted by {signal.Signals(sig).name}" in err and "Traceback" not in err, err
    for f in out.glob("*.onnx"):  # whatever is there is complete: it opens
        from vtrcompile.engine.runners import read_engine_metadata

        assert read_engine_metadata(f) is not None, f


@pytest.mark.parametrize("point,sig", [("early", signal.SIGTERM), ("decode", signal.SIGINT),
                                       pytest.param("prefill", signal.SIGTERM, marks=pytest.mark.slow)])
def test_optimize_interrupted(tmp_path, point, sig, no_decode_cache):
    out = tmp_path / "out"
    out.mkdir()
    when = {"early": _after(1.0), "decode": _appears(out, ".decode-"), "prefill": _appears(out, ".x.onnx.")}[point]
    code, err, sent = _interrupt(["optimize", "tiny", "--method", "fastv", "--keep", "8", "--out",
                                  str(out / "x.onnx")], when, sig)
    _check_clean(out, code, err, sig, sent)
    assert code == 128 + sig, "the signal landed after the run had finished"
    if point == "early":
        assert not list(out.iterdir())
    if point == "decode":
        assert not (out / "x.onnx").exists()  # the prefill is written last
    if (out / "x.onnx").exists():  # the one file is written in one step: never the prefill engine alone
        from vtrcompile.engine.metadata import is_one_file
        from vtrcompile.engine.runners import read_engine_metadata

        assert is_one_file(read_engine_metadata(out / "x.onnx"))


def test_search_interrupted_resumes(tmp_path, calibration_dir):
    out = tmp_path / "out"
    out.mkdir()
    sched = out / "s.json"
    args = ["search", "tiny", "--algo", "gsearch", "--calibration", str(calibration_dir), "--count", "2",
            "--out", str(sched)]

    def saved_twice() -> bool:  # the partial file exists and has at least two evaluations
        try:
            return len(json.loads(sched.read_text()).get("evaluations", [])) >= 2
        except (OSError, ValueError):
            return False

    code, err, sent = _interrupt(args, saved_twice, signal.SIGINT)
    _check_clean(out, code, err, signal.SIGINT, sent)
    if code == 0:
        pytest.skip("the search finished before the signal landed")
    rec = json.loads(sched.read_text())
    assert rec["complete"] is False and len(rec["evaluations"]) >= 2
    done = len(rec["evaluations"])
    res = subprocess.run([*CLI, "-v", *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"{done} evaluations already done" in res.stderr or "evaluations already done" in res.stderr
    final = json.loads(sched.read_text())
    assert final["complete"] is True and len(final["evaluations"]) >= done


@pytest.mark.slow
def test_sweep_interrupted(tmp_path):
    demo = Path(__file__).resolve().parents[1] / "models" / "vqa-synth-llava"
    out = tmp_path / "sweep"
    code, err, sent = _interrupt(["sweep", str(demo), "--methods", "fastv", "--count", "4", "--reps", "1",
                                  "--warmup", "0", "--out-dir", str(out)], _appears(out / "engines", "baseline.onnx"),
                                 signal.SIGTERM)
    _check_clean(out, code, err, signal.SIGTERM, sent)
    assert not (out / "sweep.json").exists() or code == 0


FINALIZER = """
class Dying:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100000):
            pass  # the handler runs here, inside the finalizer
@cli.main.command('run')
def run():
    Dying()
    time.sleep(30)
    print('ran on')
"""

CONVERTED = """
@cli.main.command('run')
def run():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    except KeyboardInterrupt:
        raise RuntimeError('a library turned the interrupt into its own error') from None
    print('ran on')
"""


@pytest.mark.parametrize("command", [FINALIZER, CONVERTED], ids=["inside-a-finalizer", "turned-into-an-error"])
def test_an_interrupt_that_python_cannot_raise_as_such_still_ends_the_run(tmp_path, command):
    """A signal whose handler runs inside a `__del__` cannot raise there (Python prints "Exception ignored" and runs
    on): the CLI delivers it again, so the run still stops at once. One that a library turns into its own error
    still ends as an interrupt. Both: exit 128 + signal, the one interrupt line, no traceback."""
    script = tmp_path / "command.py"
    script.write_text(f"import os, signal, time\nfrom vtrcompile import cli\n{command}\ncli.main(['run'])\n")
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    assert "interrupted by SIGTERM" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "ran on" not in res.stdout and time.monotonic() - t0 < 20
