"""Rewritten program -> AOTInductor package (`.pt2`, torch._inductor.aoti_compile_and_package), and its runner.

The package is compiled for one device (CPU or CUDA); vtrcompile's metadata rides inside the compiled
model (`aot_inductor.metadata`), so `profile` and `eval` read it back with `get_metadata()`.
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.host_inputs import prefill_feeds
from ..engine.kv_cache import float_input_dtypes
from ..engine.protocol import check_prompt, feed_arrays
from ..errors import VtrError
from ..memory import check_engine_fits
from .atomic import write_atomically

log = logging.getLogger(__name__)

METADATA_KEY = "vtrcompile"


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise VtrError("--device cuda: no CUDA GPU is visible to PyTorch; compile with --device cpu or run on a "
                       "machine with a GPU and a CUDA build of torch")
    if device not in ("cpu", "cuda"):
        raise VtrError(f"--device {device}: AOTInductor packages are compiled for 'cpu' or 'cuda'")


def export_aoti(ep: torch.export.ExportedProgram, out: Path, metadata: dict[str, Any], device: str) -> list[Path]:
    """Compile the program for `device` into a .pt2 package, written atomically."""
    check_device(device)
    t0 = time.perf_counter()
    if device == "cuda":
        ep = _move_program(ep, "cuda")
    configs = {**compile_configs(device),
               "aot_inductor.metadata": {METADATA_KEY: json.dumps({**metadata, "device": device}, sort_keys=True)}}

    def save(tmp: Path) -> None:
        with torch.no_grad():  # Inductor freezes (and so packs) the weights only when no gradient is recorded
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp), inductor_configs=configs)

    files = write_atomically(Path(out), save)
    log.info("compiled %s for %s in %.1fs", out, device, time.perf_counter() - t0)
    return files


def compile_configs(device: str) -> dict[str, Any]:
    """Inductor settings for a package compiled for `device`.

    CPU: `freezing` makes the weights compile-time constants, so Inductor rewrites every linear layer into
    oneDNN's kernel on a weight packed once at compile time (`mkldnn._linear_pointwise`, bias and residual
    adds fused) instead of an `aten::mm` through the BLAS that torch ships. Measured on an AMD EPYC with
    AVX-512 (2 threads, f32): a [631, 768] x [768, 2048] product ran at 206 GFLOP/s through `aten::mm` and
    490 GFLOP/s through the packed kernel; the 32064-wide lm_head on one row took 5.9 ms and 2.1 ms. CUDA
    packages keep Inductor's defaults (not measured: no GPU here)."""
    return {"freezing": True} if device == "cpu" else {}


def _move_program(ep: torch.export.ExportedProgram, device: str) -> torch.export.ExportedProgram:
    """Re-export the program with its weights on `device` (inputs follow at run time), same prompt range."""
    from ..build import prompt_range, reexport

    module = ep.module()
    module.to(device)
    return reexport(module, [t.to(device) for t in ep.example_inputs[0]], *prompt_range(ep))


def check_archive(path: Path) -> None:
    """Refuse a package whose zip archive is damaged, before any of its native code is loaded.

    A package holds a compiled shared library (and, frozen, the weights inside it); a flipped bit there can make
    the process crash while loading it, where no error can be reported. Every entry of the archive carries a
    CRC-32, so reading each entry once (zipfile checks the CRC at the end) finds such damage first."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # BadZipFile, OSError, and for damaged header flags RuntimeError, NotImplementedError
        why = " ".join(f"{type(e).__name__}: {e}".split())
        raise VtrError(f"{path}: not a readable AOTInductor package ({why}); rebuild it with "
                       "`vtrcompile optimize --out x.pt2`") from None
    if bad is not None:
        raise VtrError(f"{path}: damaged AOTInductor package ({bad!r} fails its checksum); rebuild it with "
                       "`vtrcompile optimize --out x.pt2`")


class AotiEngine:
    """Runs a vtrcompile .pt2 package; inputs numpy, output numpy logits [B, vocab]."""

    backend = "aoti"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise VtrError(f"engine not found: {self.path}")
        if threads:
            torch.set_num_threads(threads)
        check_archive(self.path)
        # the package holds the weights (frozen into the compiled library or beside it); its metadata is read only
        # once it is loaded, so the role and dtype are not known yet
        check_engine_fits(self.path, self.path.stat().st_size)
        try:
            self.runner = torch._inductor.aoti_load_package(str(self.path))
        except Exception as e:
            raise VtrError(f"{self.path}: not a loadable AOTInductor package ({type(e).__name__}); build it "
                           "with `vtrcompile optimize --out x.pt2` using the same torch version") from None
        raw = self.runner.get_metadata().get(METADATA_KEY)
        if raw is None:
            raise VtrError(f"{self.path}: no vtrcompile metadata; build engines with `vtrcompile optimize`")
        try:
            self.metadata: dict[str, Any] = json.loads(raw)
        except ValueError:
            raise VtrError(f"{self.path}: its vtrcompile metadata is damaged; rebuild it with "
                           "`vtrcompile optimize`") from None
        self.device = self.metadata.get("device", "cpu")
        if self.device == "cuda":
            check_device("cuda")
        self._bound: list[torch.Tensor] | None = None
        self._last_outputs: Any = None  # the previous timed run's outputs (time_ms)

    def bind(self, feeds: dict[str, Any]) -> None:
        """Named inputs -> tensors on the package's device, in the order of the metadata's `io`. Tensors handed
        back from an earlier run (bfloat16 caches, which numpy cannot hold) pass through without numpy, made
        contiguous: a package reads its inputs with the strides of its example inputs, and the caches a prefill
        package returns are views with another layout. So do float tensors in the dtype the package declares (the
        generation loop's cache buffers), read in place when they are contiguous and on the package's device."""
        declared = float_input_dtypes(self.metadata["io"])
        kept = {k: v for k, v in feeds.items() if isinstance(v, torch.Tensor) and v.dtype == declared.get(k)}
        arrays = feed_arrays(self.metadata["io"], {k: v for k, v in feeds.items() if k not in kept}, set(kept))
        self._bound = [kept[t["name"]].to(self.device).contiguous() if t["name"] in kept else
                       torch.from_numpy(arrays[t["name"]]).to(self.device) for t in self.metadata["io"]["inputs"]]

    def _outputs(self) -> list[torch.Tensor]:
        assert self._bound is not None
        with torch.no_grad():
            out = self.runner(*self._bound)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def run(self, feeds: dict[str, Any] | None = None, shared: bool = False) -> dict[str, Any] | list[torch.Tensor]:
        """With feeds: every output by name, as numpy. Without: a launch of the bound inputs (for timing). Each
        run returns new tensors, never copied nor overwritten later; `shared` leaves float outputs but the logits
        as tensors on the package's device (bfloat16 ones always are)."""
        if feeds is None:
            return self._outputs()
        self.bind(feeds)
        names = [t["name"] for t in self.metadata["io"]["outputs"]]
        # shared (the generation loop): float outputs stay tensors where they are, for its cache buffers
        return {n: t if t.dtype == torch.bfloat16 or (shared and t.is_floating_point() and n != "logits")
                else t.cpu().numpy() for n, t in zip(names, self._outputs(), strict=True)}

    def time_ms(self) -> float:
        """One run: CUDA events on the current stream on a GPU, wall clock on a CPU. The outputs of a run are freed
        after the next one returns, as in a generation loop (the previous step's cache is alive while the next
        step runs). Freed at once, the large cache outputs went back to the OS between runs and were faulted in
        again: an isolated decode step at 631 cached tokens measured 63.6 ms against 16.6 ms per step inside
        `generate` (llava15-geometry, CPU)."""
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            outputs = self.run()
            end.record()
            end.synchronize()
            self._last_outputs = outputs
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        outputs = self.run()
        ms = (time.perf_counter() - t0) * 1e3
        self._last_outputs = outputs
        return ms

    def __call__(self, input_ids: np.ndarray, pixel_values: np.ndarray, check: bool = True) -> np.ndarray:
        if check:
            check_prompt(input_ids, self.metadata["image_token_id"], self.metadata["n_image"])
        self.bind(prefill_feeds(self.metadata, input_ids, pixel_values))
        return self._outputs()[0].float().cpu().numpy()
