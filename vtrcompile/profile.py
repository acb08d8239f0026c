"""Latency protocol (warm-up discarded, interleaved repetitions, percentiles) and the engine comparison."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .lower.onnxruntime import OrtEngine, reduction_share

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
    def of(samples_s: list[float]) -> Latency:
        a = np.asarray(samples_s) * 1e3
        return Latency(float(np.percentile(a, 50)), float(np.percentile(a, 90)), float(np.percentile(a, 99)),
                       float(a.mean()), float(a.min()), len(a))


def profile_prompt(meta: dict, prefix: int = DEFAULT_PREFIX, suffix: int = DEFAULT_SUFFIX, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """[prefix][N image tokens][suffix] with random text ids and a random image, per the engine metadata."""
    rng = np.random.default_rng(seed)
    b, n, img = meta["batch"], meta["n_image"], meta["image_token_id"]
    text = lambda k: (img + 1 + rng.integers(0, meta["vocab"] - 1, (b, k))) % meta["vocab"]  # noqa: E731
    ids = np.concatenate([text(prefix), np.full((b, n), img), text(suffix)], axis=1).astype(np.int64)
    pixels = rng.standard_normal((b, *meta["pixel_shape"])).astype(np.float32)
    return ids, pixels


def flops_at(meta: dict, prompt_len: int) -> float:
    a, b, c = meta["flops_poly"]
    return a + b * prompt_len + c * prompt_len**2


def llm_tokens(meta: dict, prompt_len: int) -> list[int]:
    return [prompt_len - d for d in meta["llm_token_drop"]]


def time_interleaved(fns: list[Callable[[], object]], warmup: int, reps: int) -> list[list[float]]:
    """Run fns round-robin so that drift in machine load hits all engines alike."""
    for _ in range(warmup):
        for f in fns:
            f()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            samples[i].append(time.perf_counter() - t0)
    return samples


def environment(threads: int) -> dict:
    import onnxruntime
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "backend": "onnxruntime-cpu"}


def compare(engine: str | Path, baseline: str | Path, warmup: int = 3, reps: int = 20,
            threads: int | None = None, prefix: int = DEFAULT_PREFIX, suffix: int = DEFAULT_SUFFIX,
            selector_reps: int = 5) -> dict:
    """Both engines, same backend, same inputs: latency, ratio, tokens, FLOPs, selector cost."""
    threads = threads or os.cpu_count() or 1
    red, base = OrtEngine(engine, threads), OrtEngine(baseline, threads)
    if red.metadata["model_id"] != base.metadata["model_id"]:
        log.warning("engines come from different models: %s vs %s", red.metadata["model"], base.metadata["model"])
    ids, pixels = profile_prompt(red.metadata, prefix, suffix)
    s = ids.shape[1]
    log.info("profiling %s vs %s on a %d-token prompt (%d warm-up, %d reps)", engine, baseline, s, warmup, reps)
    red(ids, pixels)  # input check once; the timed calls skip it
    t_red, t_base = time_interleaved([lambda: red(ids, pixels, check=False),
                                      lambda: base(ids, pixels, check=False)], warmup, reps)
    lr, lb = Latency.of(t_red), Latency.of(t_base)
    share = reduction_share(engine, ids, pixels, 1, selector_reps, threads)
    out = {
        "prompt_tokens": s,
        "environment": environment(threads),
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
    out["flops_ratio"] = out["engines"]["baseline"]["flops"] / out["engines"]["reduced"]["flops"]
    out["selector"] = {
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
        f"selector cost: {sel['ms']:.2f} ms ({100 * sel['share']:.1f}% of the reduced engine); "
        f"sequence gathers: {sel['gather_ms']:.2f} ms ({100 * sel['gather_share']:.1f}%)",
    ]
    return "\n".join(lines)
