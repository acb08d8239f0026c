"""Measured memory of a process serving an engine: its resident memory once the engine is loaded, then its peak
resident memory from there after two prefills of the profile prompt, and after two generations on top (the decode
engine loads on the first).

Each engine is measured in a fresh process (`python -m vtrcompile.engine.resident`): allocators and runtimes keep
what a run freed, so a second engine in the same process would reuse the first one's pages and show nothing. What
is counted is everything the process holds: the weights as the runtime keeps them, its activations and workspace
for the largest shapes it ran, the cache buffers `generate` allocates and keeps for the next generation. Loading's
own transient peak is left out: the peak is reset once the engine is loaded. Host memory only: a TensorRT
engine's GPU memory is not counted. Linux only (VmRSS and VmHWM from /proc/self/status, the peak reset through
/proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from ..errors import VtrError

log = logging.getLogger(__name__)

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
KIB_PER_MIB = 1024


def status_kib(key: str, status: Path | None = None) -> int:
    """A `VmRSS:`-style line of /proc/self/status, in KiB; VtrError where the system has none."""
    status = status or STATUS
    try:
        for line in status.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    raise VtrError(f"measuring memory needs {key} in {status} (Linux); run without --memory on this system")


def reset_peak(clear_refs: Path | None = None) -> None:
    """Set VmHWM to the memory resident now (Linux: 5 written to /proc/self/clear_refs)."""
    clear_refs = clear_refs or CLEAR_REFS
    try:
        clear_refs.write_text("5")
    except OSError as e:
        raise VtrError(f"measuring memory needs to reset the peak in {clear_refs} ({e.strerror}); run without "
                       "--memory on this system") from None


def check_available() -> None:
    """Refuse, in one line and before any work, a system where probe() cannot measure: it reads VmRSS and VmHWM
    and resets the peak."""
    status_kib("VmRSS")
    status_kib("VmHWM")
    if not os.access(CLEAR_REFS, os.W_OK):
        raise VtrError(f"measuring memory needs to reset the peak in {CLEAR_REFS}, which cannot be written here; run "
                       "without --memory on this system")


def probe(engine_path: str | Path, new_tokens: int, threads: int, prefix: int, suffix: int) -> dict:
    """In this process: MiB resident once `engine_path` is loaded, then the peak from there (loading's own transient
    peak left out) after two prefills and, with new_tokens > 0, what opening the decode engine added (before it ran:
    its weights as the runtime holds them, a second copy of the LLM's beside the prefill engine's) and the peak after
    two generations of new_tokens tokens."""
    from ..profile import profile_prompt
    from .generate import load_engine
    from .host_inputs import prefill_feeds

    engine = load_engine(engine_path, threads)
    ids, pixels = profile_prompt(engine.metadata, prefix, suffix)
    feeds = prefill_feeds(engine.metadata, ids, pixels)
    res = {"loaded_mib": status_kib("VmRSS") / KIB_PER_MIB}
    reset_peak()
    for _ in range(2):  # as Engine() runs it: shared, on the requests that generate() then uses too
        engine.prefill.run(feeds, shared=True)
    res["peak_after_prefills_mib"] = status_kib("VmHWM") / KIB_PER_MIB
    if new_tokens > 0:
        before = status_kib("VmRSS")
        engine.decode  # noqa: B018 (opens it)
        res["decode_opened_mib"] = (status_kib("VmRSS") - before) / KIB_PER_MIB
        for _ in range(2):
            engine.generate(max_new_tokens=new_tokens, eos_token_id=[], **feeds)
        res["peak_after_generations_mib"] = status_kib("VmHWM") / KIB_PER_MIB
    return res


def measure(engine_path: str | Path, new_tokens: int, threads: int, prefix: int, suffix: int,
            timeout_s: float = 900) -> dict:
    """probe() of one engine in a fresh Python process."""
    check_available()
    cmd = [sys.executable, "-m", __name__, str(engine_path), "--new-tokens", str(new_tokens), "--threads",
           str(threads), "--prefix", str(prefix), "--suffix", str(suffix)]
    log.info("measuring the memory of %s in a fresh process", engine_path)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise VtrError(f"{engine_path}: the memory measurement did not end in {timeout_s:g} s; run without "
                       "--memory") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1].removeprefix("error: ")
        raise VtrError(f"{engine_path}: the memory measurement failed ({last}); run without --memory")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vtrcompile.engine.resident", description=__doc__.split("\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=35)
    ap.add_argument("--suffix", type=int, default=20)
    a = ap.parse_args(argv)
    try:
        res = probe(a.engine, a.new_tokens, a.threads, a.prefix, a.suffix)
    except VtrError as e:  # one line for measure() to pass on
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
