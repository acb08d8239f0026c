"""An optional cache of decode engines shared by output folders: `VTRCOMPILE_DECODE_CACHE=<dir>`.

A decode engine depends only on the model, dtype, weight format, device, batch and backend, never on the method,
so building methods into several folders (build/fastv/, build/pdrop/) need not export it again. With the
variable set, `optimize` copies a cached decode engine into the output folder instead of building it, and stores
a copy of each one it builds. Copies, not hard links: a tool that edits an engine file in place (ONNX metadata
editors do) must not change the cache or the other folders' engines. Entries are keyed by the decode file's name
(model identity included) under a folder named by the engine format, torch's version and a hash of vtrcompile's
own source, so a changed vtrcompile or torch never reads an old entry. Not cached: TensorRT plans (built for one GPU and prompt
range) and engines whose weights are streamed into a weight store shared with their prefill.

An entry is a manifest `<decode file>.files.json` (the engine's files, main file first) written after the files,
so a half-written entry is never read; a cache that cannot be read or written only logs a warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from .engine.io import FORMAT_VERSION
from .lower.atomic import write_atomically

log = logging.getLogger(__name__)

ENV = "VTRCOMPILE_DECODE_CACHE"


@functools.cache
def _code_hash() -> str:
    h = hashlib.sha256()
    root = Path(__file__).parent
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def cache_folder() -> Path | None:
    """The folder entries are read from and written to, or None when the cache is off."""
    root = os.environ.get(ENV)
    if not root:
        return None
    import torch

    return Path(root) / f"format{FORMAT_VERSION}-torch{torch.__version__}-code{_code_hash()}"


def restore(name: str, folder: Path) -> Path | None:
    """Copy the cached decode engine `name` into `folder` (atomically: nothing there until every file is);
    returns its path, or None when the cache is off or has no complete entry."""
    cache = cache_folder()
    if cache is None:
        return None
    try:
        files = json.loads((cache / f"{name}.files.json").read_text())
        if not files or files[0] != name or not all((cache / f).is_file() for f in files):
            return None

        def copy(tmp: Path) -> None:
            for f in files:
                shutil.copyfile(cache / f, tmp.parent / f)

        write_atomically(folder / name, copy)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("decode cache %s: cannot read %s (%s); building it", cache, name, e)
        return None
    log.info("decode engine %s copied from the cache %s", name, cache)
    return folder / name


def store(files: list[Path]) -> None:
    """Put a just-built decode engine (its files, main file last as write_atomically returns them) in the cache."""
    cache = cache_folder()
    if cache is None:
        return
    main = files[-1]
    names = [main.name] + [f.name for f in files[:-1]]
    tmp: Path | None = None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for f in files:
            tmp = cache / f".{f.name}.{os.getpid()}.tmp"
            shutil.copyfile(f, tmp)
            os.replace(tmp, cache / f.name)
        tmp = cache / f".{main.name}.files.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(names))
        os.replace(tmp, cache / f"{main.name}.files.json")
    except OSError as e:
        if tmp is not None:  # a half-copied file (a full disk) is not left in the cache folder
            tmp.unlink(missing_ok=True)
        log.warning("decode cache %s: cannot store %s (%s)", cache, main.name, e)
        return
    log.info("decode engine %s stored in the cache %s", main.name, cache)
