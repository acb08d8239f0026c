"""Scratch folders of atomic writes: gone after the body, even when a signal lands while they are removed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vtrcompile.lower import atomic

# Run in a fresh interpreter: the test sends SIGTERM to its own process, and in a test worker that had run a few
# hundred other tests (xdist, --dist loadfile, right after tests/fuzz) that killed the worker twice, which then
# left the run hanging; the cause was not found (the kill never reproduced with a probe of the threads' signal
# masks and handlers in place, nor with the same two files alone).
CLEANUP_SIGNAL = """
import os, shutil, signal, sys, threading
from pathlib import Path
from vtrcompile.lower import atomic

class Stopped(Exception):
    pass

def stop(signum, frame):
    raise Stopped

signal.signal(signal.SIGTERM, stop)
real, calls = shutil.rmtree, []

def rmtree(path, ignore_errors=False):
    os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the cleanup
    calls.append(path)
    real(path, ignore_errors=ignore_errors)

atomic.shutil.rmtree = rmtree
done = threading.Event()  # another thread, as the CLI has (thread pools): the kernel may hand it the signal
other = threading.Thread(target=done.wait)
other.start()
parent = Path(sys.argv[1])
try:
    with atomic.scratch_dir(parent, ".x."):
        pass
except Stopped:
    print("stopped after the removal:", len(calls), sorted(p.name for p in parent.iterdir()))
finally:
    done.set()
    other.join()
"""


def test_a_signal_during_cleanup_is_raised_after_the_folder_is_gone(tmp_path):
    """SIGTERM sent from inside the folder's removal (where a real one once landed: the folder stayed and the run
    ended with "Bad file descriptor") is held until the removal is done, then raised as the CLI's handler would."""
    res = subprocess.run([sys.executable, "-c", CLEANUP_SIGNAL, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "stopped after the removal: 1 []", res.stdout + res.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_signal_just_before_the_cleanup_leaves_the_folder_to_the_cli(tmp_path, monkeypatch):
    """A signal handled in the bytecodes between the body's end and the hold on signals (it raises there, so the
    folder's removal never starts): the folder stays listed, and the CLI's interrupt path removes it. A probe
    folder was once left behind this way (tests/test_interrupts.py, decode point)."""
    from contextlib import contextmanager

    from click.testing import CliRunner

    from vtrcompile.cli import main

    real = atomic._signals_deferred
    raised = []

    @contextmanager
    def lands_first(*args):  # the first hold is never taken: the signal's KeyboardInterrupt comes first
        if not raised:
            raised.append(True)
            raise KeyboardInterrupt
        with real():
            yield

    monkeypatch.setattr(atomic, "_signals_deferred", lands_first)
    with pytest.raises(KeyboardInterrupt):
        with atomic.scratch_dir(tmp_path, ".x."):
            pass
    [left] = list(tmp_path.iterdir())
    assert left in atomic._LIVE
    atomic.remove_scratch()
    assert list(tmp_path.iterdir()) == [] and not atomic._LIVE

    raised.clear()  # the same through the CLI: optimize's first scratch folder is check_writable's probe
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["optimize", "tiny", "--method", "fastv", "--out", str(out / "x.onnx")])
    assert res.exit_code == 130 and "interrupted by SIGINT" in res.output, res.output
    assert list(out.iterdir()) == [] and not atomic._LIVE
