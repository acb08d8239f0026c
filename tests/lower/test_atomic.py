"""Scratch folders of atomic writes: gone after the body, even when a signal lands while they are removed."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from vtrcompile.lower import atomic


class _Stopped(Exception):
    pass


def test_a_signal_during_cleanup_is_raised_after_the_folder_is_gone(tmp_path, monkeypatch):
    """SIGTERM sent from inside the folder's removal (where a real one once landed: the folder stayed and the run
    ended with "Bad file descriptor") is held until the removal is done, then raised as the CLI's handler would."""
    def stop(signum, frame):
        raise _Stopped

    old = signal.signal(signal.SIGTERM, stop)
    real = atomic.shutil.rmtree
    calls = []

    def rmtree(path, ignore_errors=False):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the cleanup
        calls.append(path)
        real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    done = threading.Event()  # another thread, as the CLI has (thread pools): the kernel may hand it the signal
    other = threading.Thread(target=done.wait)
    other.start()
    try:
        with pytest.raises(_Stopped):
            with atomic.scratch_dir(tmp_path, ".x."):
                pass
    finally:
        signal.signal(signal.SIGTERM, old)
        done.set()
        other.join()
    assert len(calls) == 1 and list(tmp_path.iterdir()) == []
