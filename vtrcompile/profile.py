"""Latency protocol (warm-up discarded, interleaved repetitions, percentiles) and the engine comparison."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import VtrError
from .lower.onnxruntime import OrtEngine, reduction_share
from .models.loading import random_text_ids

log = logging.getLogger(__name__)

DEFAULT_PREFIX = 35  # LLaVA-1.5 system prompt + "USER:" before the image
DEFAULT_SUFFIX = 20  # question + " ASSISTANT:"


@dataclass
class Latency:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    reps: int

    @staticmethod
    def of(samples_ms: list[float]) -> Latency:
        a = np.asarray(samples_ms)
        return Latency(float(np.percentile(a, 50)), float(np.percentile(a, 90)), float(np.percentile(a, 99)),
                       float(a.mean()), float(a.min()), len(a))


def profile_prompt(meta: dict, prefix: int = DEFAULT_PREFIX, suffix: int = DEFAULT_SUFFIX, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """[prefix][N image tokens][suffix] with random text ids and a random image, per the engine metadata."""
    rng = np.random.default_rng(seed)
    b, n, img = meta["batch"], meta["n_image"], meta["image_token_id"]
    ids = np.concatenate([random_text_ids(rng, img, meta["vocab"], (b, prefix)), np.full((b, n), img),
                          random_text_ids(rng, img, meta["vocab"], (b, suffix))], axis=1).astype(np.int64)
    pixels = rng.standard_normal((b, *meta["pixel_shape"])).astype(np.float32)
    return ids, pixels


def flops_at(meta: dict, prompt_len: int) -> float:
    a, b, c = meta["flops_poly"]
    return a + b * prompt_len + c * prompt_len**2


def llm_tokens(meta: dict, prompt_len: int) -> list[int]:
    return [prompt_len - d for d in meta["llm_token_drop"]]


def time_interleaved(fns: list[Callable[[], float]], warmup: int, reps: int) -> list[list[float]]:
    """Run fns (each returns its own run time in ms) round-robin so drift in machine load hits all alike."""
    for _ in range(warmup):
        for f in fns:
            f()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            samples[i].append(f())
    return samples


def open_engine(path: str | Path, threads: int | None = None):
    """An engine file -> its runner, by extension (.onnx, .plan/.engine, .pt2)."""
    ext = Path(path).suffix.lower()
    if ext == ".onnx":
        return OrtEngine(path, threads)
    if ext in (".plan", ".engine"):
        from .lower.tensorrt_runner import TrtEngine

        return TrtEngine(path)
    if ext == ".pt2":
        from .lower.aoti import AotiEngine

        return AotiEngine(path, threads)
    raise VtrError(f"{path}: unknown engine type '{ext}'; expected .onnx, .plan/.engine or .pt2")


def environment(threads: int, engine=None) -> dict:
    import torch

    env = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
           "python": platform.python_version(), "torch": torch.__version__}
    backend = getattr(engine, "backend", "onnxruntime")
    if backend == "onnxruntime":
        import onnxruntime

        env.update(onnxruntime=onnxruntime.__version__, backend="onnxruntime-cpu")
    elif backend == "tensorrt":
        env.update(backend="tensorrt", tensorrt=engine.sidecar["versions"]["tensorrt"],
                   gpu=torch.cuda.get_device_name(), timer="cuda events (GPU compute time)")
    else:
        device = engine.metadata["device"]
        env.update(backend=f"aoti-{device}",
                   timer="cuda events (GPU compute time)" if device == "cuda" else "wall clock")
        if device == "cuda":
            env["gpu"] = torch.cuda.get_device_name()
    return env


def trtexec_summary(samples_ms: list[float]) -> dict:
    """GPU compute time in trtexec's summary terms, so results sit next to `trtexec` output."""
    a = np.asarray(samples_ms)
    return {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()), "median": float(np.median(a)),
            "percentile(90%)": float(np.percentile(a, 90)), "percentile(95%)": float(np.percentile(a, 95)),
            "percentile(99%)": float(np.percentile(a, 99))}


def compare(engine: str | Path, baseline: str | Path, warmup: int = 3, reps: int = 20,
            threads: int | None = None, prefix: int = DEFAULT_PREFIX, suffix: int = DEFAULT_SUFFIX,
            selector_reps: int = 5) -> dict:
    """Both engines, same backend, same inputs: latency, ratio, tokens, FLOPs, selector cost."""
    threads = threads or os.cpu_count() or 1
    red, base = open_engine(engine, threads), open_engine(baseline, threads)
    if red.backend != base.backend:
        raise VtrError(f"{engine} is a {red.backend} engine and {baseline} a {base.backend} one; compare engines "
                       "built for the same backend")
    if red.metadata["model_id"] != base.metadata["model_id"]:
        log.warning("engines come from different models: %s vs %s", red.metadata["model"], base.metadata["model"])
    ids, pixels = profile_prompt(red.metadata, prefix, suffix)
    s = ids.shape[1]
    log.info("profiling %s vs %s on a %d-token prompt (%d warm-up, %d reps)", engine, baseline, s, warmup, reps)
    red(ids, pixels)  # input check once; the timed calls skip it
    red.bind(ids, pixels)
    base.bind(ids, pixels)
    t_red, t_base = time_interleaved([red.time_ms, base.time_ms], warmup, reps)
    lr, lb = Latency.of(t_red), Latency.of(t_base)
    # Per-node timing exists for ONNX Runtime only; other backends fuse the selector into kernels.
    share = reduction_share(engine, ids, pixels, 1, selector_reps, threads) if red.backend == "onnxruntime" else None
    out = {
        "prompt_tokens": s,
        "environment": environment(threads, red),
        "engines": {},
        "speedup_p50": lb.p50_ms / lr.p50_ms,
        "speedup_mean": lb.mean_ms / lr.mean_ms,
    }
    for name, eng, lat in (("reduced", red, lr), ("baseline", base, lb)):
        m = eng.metadata
        out["engines"][name] = {
            "path": str(eng.path), "method": m["method"], "options": m["options"],
            "latency": asdict(lat), "llm_tokens_per_layer": llm_tokens(m, s),
            "image_tokens_in": m["n_image"], "flops": flops_at(m, s),
        }
        if red.backend != "onnxruntime":
            out["engines"][name]["trtexec"] = {"gpuComputeTime": trtexec_summary(
                t_red if name == "reduced" else t_base)}
    out["flops_ratio"] = out["engines"]["baseline"]["flops"] / out["engines"]["reduced"]["flops"]
    out["selector"] = None if share is None else {
        "share": share["selector"], "ms": share["selector"] * lr.p50_ms,
        "gather_share": share["gather"], "gather_ms": share["gather"] * lr.p50_ms,
    }
    return out


def format_report(r: dict) -> str:
    e = r["engines"]
    rows = [("", "baseline", "reduced")]
    for key, label in (("method", "method"),):
        rows.append((label, e["baseline"][key], e["reduced"][key]))
    for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms"):
        rows.append((f"prefill {k.replace('_ms', '')} (ms)", f"{e['baseline']['latency'][k]:.1f}",
                     f"{e['reduced']['latency'][k]:.1f}"))
    rows.append(("tokens into LLM layer 0", str(e["baseline"]["llm_tokens_per_layer"][0]),
                 str(e["reduced"]["llm_tokens_per_layer"][0])))
    rows.append(("tokens into last LLM layer", str(e["baseline"]["llm_tokens_per_layer"][-1]),
                 str(e["reduced"]["llm_tokens_per_layer"][-1])))
    rows.append(("GFLOP per prefill", f"{e['baseline']['flops'] / 1e9:.2f}", f"{e['reduced']['flops'] / 1e9:.2f}"))
    w = [max(len(str(row[i])) for row in rows) for i in range(3)]
    lines = ["  ".join(str(c).ljust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    sel = r["selector"]
    lines += [
        "",
        f"prompt: {r['prompt_tokens']} tokens, {r['engines']['reduced']['latency']['reps']} timed runs each "
        f"(interleaved), {r['environment']['threads']} threads, {r['environment']['backend']}",
        f"prefill speedup (p50): {r['speedup_p50']:.2f}x   FLOPs-ideal: {r['flops_ratio']:.2f}x   "
        f"measured/ideal: {r['speedup_p50'] / r['flops_ratio']:.2f}",
        (f"selector cost: {sel['ms']:.2f} ms ({100 * sel['share']:.1f}% of the reduced engine); "
         f"sequence gathers: {sel['gather_ms']:.2f} ms ({100 * sel['gather_share']:.1f}%)") if sel else
        "selector cost: not measured on this backend (no per-node timing; see the ONNX Runtime profile)",
    ]
    return "\n".join(lines)
