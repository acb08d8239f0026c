"""Fuzzing the CLI and the Python API: damaged files of every input kind, nonsense option values and output
paths the OS refuses. Shared by the test (tests/fuzz/test_fuzz.py, a fixed seeded sample) and the figure
(benchmarks/fuzz.py, more cases per command).

The oracle, for every case: the run ends either with exit 2 and exactly one `error:` line that names the
file (or option) at fault, or with exit 0 (a damaged file that still holds a valid input, such as a flipped
bit in a weight); never another exit code, never a Python traceback, never a hang (a per-case alarm), and
never a file left behind (the folders the case can write to are compared before and after).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from vtrcompile.cli import main

MUTATIONS = ("empty", "truncated", "bitflip", "wrong-format")
WRONG_FORMATS = [b"\x89PNG\r\n\x1a\n" + bytes(40), b'{"hello": [1, 2, 3]}', b"PK\x03\x04" + bytes(60),
                 b"\x80\x04K\x01.", b"\x00" * 64, "añ\u00e9 text \u2603\n".encode()]


def mutate(data: bytes, how: str, rng: np.random.Generator) -> bytes:
    """One damaged version of `data`: emptied, cut at a random point, 1-8 random bits flipped, or replaced by
    a file of another format."""
    if how == "empty":
        return b""
    if how == "truncated":
        return data[:int(rng.integers(0, max(1, len(data))))]
    if how == "bitflip":
        buf = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, len(buf)))
            buf[i] ^= 1 << int(rng.integers(0, 8))
        return bytes(buf)
    if how == "wrong-format":
        return WRONG_FORMATS[int(rng.integers(0, len(WRONG_FORMATS)))]
    raise ValueError(how)


@dataclass
class Case:
    """One run: `args` for the CLI (or `call` for the Python API), the folders it may write to, the words the
    error line must hold (the file's or option's name), and what it may leave behind on success."""

    command: str
    label: str
    args: list[str] = field(default_factory=list)
    call: Callable[[], object] | None = None
    names: tuple[str, ...] = ()
    watch: tuple[Path, ...] = ()
    may_create: tuple[str, ...] = ()  # file names (glob) a successful run may leave in `watch`


@dataclass
class Outcome:
    command: str
    label: str
    exit_code: int
    seconds: float
    problem: str | None  # None: the case passed the oracle

    def as_dict(self) -> dict:
        return self.__dict__.copy()


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: int) -> Iterator[None]:
    def fire(signum, frame):
        raise _Hang

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _listing(dirs: tuple[Path, ...]) -> set[Path]:
    out: set[Path] = set()
    for d in dirs:
        if d.is_dir():
            out |= set(d.rglob("*"))
    return out


def run_case(case: Case, timeout_s: int = 120) -> Outcome:
    before = _listing(case.watch)
    t0 = time.perf_counter()
    problem = None
    code = -1
    try:
        with _alarm(timeout_s):
            if case.call is not None:
                code, output = _call_api(case.call)
            else:
                res = CliRunner().invoke(main, case.args)
                code, output = res.exit_code, res.output
                if res.exception is not None and not isinstance(res.exception, SystemExit):
                    problem = f"uncaught {type(res.exception).__name__}: {res.exception}"
    except _Hang:
        problem, output = f"no answer within {timeout_s}s", ""
    seconds = time.perf_counter() - t0
    if problem is None:
        problem = _judge(case, code, output)
    if problem is None:
        new = _listing(case.watch) - before
        stray = sorted(p for p in new if not any(p.match(g) for g in case.may_create) or code != 0
                       or any(part.startswith(".") for part in p.relative_to(_root(p, case.watch)).parts))
        if stray:
            problem = f"left behind: {[str(p) for p in stray[:3]]}"
    return Outcome(case.command, case.label, code, seconds, problem)


def _root(p: Path, dirs: tuple[Path, ...]) -> Path:
    return next(d for d in dirs if d == p or d in p.parents)


def _call_api(call: Callable[[], object]) -> tuple[int, str]:
    """The Python API's contract: success, or a VtrError whose message is one line."""
    from vtrcompile.errors import VtrError

    try:
        call()
    except VtrError as e:
        return 2, f"error: {e}\n"
    return 0, ""


def _judge(case: Case, code: int, output: str) -> str | None:
    if "Traceback" in output:
        return "traceback in the output"
    if code == 0:
        return None
    if code != 2:
        return f"exit {code}"
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("error:")]
    if len(lines) != 1:
        return f"{len(lines)} error lines: {output.strip()[-300:]}"
    if case.names and not any(n in lines[0] for n in case.names):
        return f"the error does not name {case.names}: {lines[0][:300]}"
    return None


# ----------------------------------------------------------------------------------------------------------
# Input kinds. Each generator yields Cases for `n` seeded mutations of one kind of input.


def damaged_copies(src: Path, dest_dir: Path, rng: np.random.Generator, n: int) -> Iterator[tuple[str, Path]]:
    """`n` damaged copies of the file `src` (mutations in turn), each in its own folder under dest_dir."""
    data = src.read_bytes()
    for i in range(n):
        how = MUTATIONS[i % len(MUTATIONS)]
        d = dest_dir / f"{src.name}-{i}-{how}"
        d.mkdir(parents=True)
        p = d / src.name
        p.write_bytes(mutate(data, how, rng))
        yield how, p


def damaged_folders(src_dir: Path, target: str, dest_dir: Path, rng: np.random.Generator, n: int
                    ) -> Iterator[tuple[str, Path]]:
    """`n` copies of the folder `src_dir` with the file `target` in it damaged (or missing)."""
    data = (src_dir / target).read_bytes()
    for i in range(n):
        how = (*MUTATIONS, "missing")[i % (len(MUTATIONS) + 1)]
        d = dest_dir / f"{src_dir.name}-{target}-{i}-{how}"
        shutil.copytree(src_dir, d)
        if how == "missing":
            (d / target).unlink()
        else:
            (d / target).write_bytes(mutate(data, how, rng))
        yield how, d


NONSENSE = ["", "abc", "-1", "0", "1.5", "nan", "inf", "-inf", "1e309", "99999999999999999999", "1,2", "../..",
            "\u2603", " ", "--json"]


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path
