"""Write outputs so that a failure never leaves a half-written file at the destination."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import VtrError


def check_writable(out: Path) -> None:
    """Refuse, before any work, an output path the OS will not let us write, naming it and the reason."""
    try:
        _check_writable(out)
    except OSError as e:  # name too long, symlink loop, a file system that refuses: the OS's own reason
        raise VtrError(f"cannot write {out}: {e.strerror or type(e).__name__}; choose another --out") from None
    except ValueError as e:  # an embedded NUL byte
        raise VtrError(f"cannot write {out!r}: {e}; choose another --out") from None


def _check_writable(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise VtrError(f"cannot write {out}: {parent} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VtrError(f"cannot write {out}: cannot create its directory {parent} ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise VtrError(f"cannot write {out}: directory {parent} is not writable; choose another --out")
    if out.is_dir():
        raise VtrError(f"cannot write {out}: it is a directory; give a file name such as {out}/engine.onnx")
    # the OS may refuse even where permissions look fine (/proc, a read-only mount, a name too long): ask it now
    with scratch_dir(parent, f".{out.name[:64]}.probe."):
        pass
    probe = parent / f".{out.name}.vtr-probe"
    _LIVE.add(probe)
    try:
        probe.touch()
    finally:
        with _signals_deferred():
            _remove(probe)


# Scratch folders (and write probes) made and not yet removed. A signal whose handler raises can land in the few
# bytecodes between a scratch folder's body and the hold that guards its removal (seen once in
# tests/test_interrupts.py: a probe folder left behind); the CLI removes whatever is still listed here when it
# ends on an interrupt.
_LIVE: set[Path] = set()


def remove_scratch() -> None:
    """Remove every scratch folder still listed (an interrupted run's leftovers); the CLI calls it on an interrupt."""
    with _signals_deferred():
        for path in list(_LIVE):
            _remove(path)


def _remove(path: Path) -> None:
    """Remove a scratch folder or probe file (gone already: nothing to do) and unlist it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    _LIVE.discard(path)


@contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder in `parent` for the body to write in, removed on leaving (what the body renamed out of it
    stays). Its name is chosen and listed before it exists and it is made inside the try, so a signal (SIGINT,
    SIGTERM: raised in Python) landing anywhere leaves nothing behind: the removal runs with signals held back, and
    a signal landing just before that hold is taken leaves the folder listed for `remove_scratch`. tempfile.mkdtemp
    makes the folder before it returns its name, and an interrupt in between leaked it (a search's partial file,
    seen in tests/test_interrupts.py)."""
    path = parent / f"{prefix}{os.getpid()}.{uuid.uuid4().hex[:12]}"
    _LIVE.add(path)
    try:
        path.mkdir(mode=0o700)
        yield path
    finally:
        with _signals_deferred():
            _remove(path)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back while the body runs, and handed to their handlers (the CLI's raise) after it.
    A signal landing inside shutil.rmtree left the folder behind, and once, between its close of a directory and
    its note that it had closed it, made it close the descriptor again: the run ended with "Bad file descriptor"
    and exit 2 instead of the interrupt (tests/test_interrupts.py, decode point). Held at Python's level, not with
    pthread_sigmask: the process has other threads (thread pools), and the kernel hands a process-directed signal
    to any thread that does not block it, whose C handler then wakes the main thread's Python handler anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs signal handlers in the main thread only, and only it may change them
        return
    got: list[int] = []
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    handlers = {s: h for s, h in handlers.items() if callable(h)}  # default or ignored: nothing of ours to defer
    for s in handlers:
        signal.signal(s, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        for s in got:
            handlers[s](s, None)


def write_atomically(out: Path, write: Callable[[Path], None]) -> list[Path]:
    """Call write(tmp_path) inside a temporary folder next to `out`, then rename every file it made
    (the main file and sidecars such as `<name>.data`) into place. Returns the final paths."""
    check_writable(out)
    try:
        with scratch_dir(out.parent, f".{out.name[:64]}.") as tmpdir:
            write(tmpdir / out.name)
            made = sorted(tmpdir.iterdir(), key=lambda p: p.name != out.name)
            if not made or made[0].name != out.name:
                raise VtrError(f"the backend wrote no {out.name}")
            final = []
            for p in made[1:] + made[:1]:  # sidecars first, main file last
                dest = out.parent / p.name
                os.replace(p, dest)
                final.append(dest)
            return final
    except OSError as e:  # no room for the folder, disk full, file system gone read-only, ...: nothing partial stays
        raise VtrError(f"cannot write {out}: {e.strerror or type(e).__name__} in {out.parent}; choose another "
                       "--out") from None
