"""Latency protocol (warm-up discarded, interleaved repetitions, percentiles) and the engine comparison."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .engine.host_inputs import prefill_feeds
from .engine.metadata import is_one_file
from .engine.protocol import check_prompt_range
from .engine.runners import open_prefill
from .errors import VtrError
from .lower.onnxruntime import reduction_share
from .models.prompt import random_prompt

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
    ids = random_prompt(rng, meta, prefix, suffix, meta["batch"])
    rows = meta["batch"] * meta.get("pixel_rows", meta.get("tiles", 1))
    pixels = rng.standard_normal((rows, *meta["pixel_shape"])).astype(np.float32)
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


def cpu_facts() -> dict:
    """The CPU's model name and the matrix/vector extensions that decide which kernels run (Linux)."""
    try:
        info = open("/proc/cpuinfo", errors="replace").read()
    except OSError:
        return {}
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), None)
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_fp16")
    return {"cpu_model": model, "cpu_flags": [f for f in wanted if f in flags]}


def environment(threads: int, engine=None) -> dict:
    import torch

    env = {"cpu": platform.processor() or platform.machine(), **cpu_facts(), "cores": os.cpu_count(),
           "threads": threads, "python": platform.python_version(), "torch": torch.__version__}
    backend = getattr(engine, "backend", "onnxruntime")
    if backend == "onnxruntime":
        import onnxruntime

        env.update(onnxruntime=onnxruntime.__version__, backend="onnxruntime-cpu")
    elif backend == "openvino":
        import openvino

        env.update(openvino=openvino.__version__, backend="openvino-cpu",
                   precision=str(engine.compiled.get_property("INFERENCE_PRECISION_HINT")))
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


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def kv_bytes(meta: dict, cached_tokens: list[int]) -> int:
    """Bytes of one sequence's KV cache (one row of a batch): keys and values of every layer, in the engine's
    dtype."""
    per_token = 2 * meta["kv_heads"] * meta["head_dim"] * _DTYPE_BYTES[meta.get("dtype", "float32")]
    return per_token * sum(cached_tokens)


def generation_profile(red: Any, base: Any, ids: np.ndarray, pixels: np.ndarray, new_tokens: int, warmup: int,
                       reps: int, threads: int, kv_budget_gb: float | None) -> dict:
    """TTFT, time per output token at the prompt's context, end to end for `new_tokens`, KV-cache bytes; `red` and
    `base` are the prefill runners compare() opened, each given its decode engine (opening them again would hold
    two more copies of the weights)."""
    from .engine.generate import Engine, decode_dtype, decode_feeds
    from .engine.kv_cache import KvCache

    engines = [Engine(red.path, threads, prefill=red), Engine(base.path, threads, prefill=base)]
    feeds = prefill_feeds(engines[0].metadata, ids, pixels)
    n = engines[0].metadata["llm_layers"]
    steps = []
    for e in engines:  # the first decode step, its buffers sized for new_tokens as in generate, re-run as is
        out = e.prefill.run(feeds)
        kv = KvCache(out, n, decode_dtype(e.decode.metadata), max(new_tokens - 1, 1))
        e.decode.bind(decode_feeds(out, out["logits"].argmax(-1), kv, feeds.get("attention_mask")))
        steps.append(list(kv.lengths))
    t_dec = time_interleaved([e.decode.time_ms for e in engines], warmup, reps)

    def e2e(e):
        def run() -> float:
            import time as _t

            t0 = _t.perf_counter()
            e.generate(max_new_tokens=new_tokens, eos_token_id=[], **feeds)
            return (_t.perf_counter() - t0) * 1e3
        return run
    e2e_reps = max(3, reps // 4)
    t_e2e = time_interleaved([e2e(e) for e in engines], 1, e2e_reps)
    res: dict = {"new_tokens": new_tokens, "engines": {}}
    for name, e, dec, total, cached in zip(("reduced", "baseline"), engines, t_dec, t_e2e, steps, strict=True):
        m = e.metadata
        final = [c + new_tokens - 1 for c in cached]  # the last new token is produced, never cached
        res["engines"][name] = {
            "decode_step": asdict(Latency.of(dec)), "end_to_end": asdict(Latency.of(total)),
            # every sequence of the batch generates new_tokens in one end-to-end run
            "tokens_per_s": m["batch"] * new_tokens / (float(np.median(total)) / 1e3),
            "cached_tokens_per_layer": cached, "kv_bytes_after_prefill": kv_bytes(m, cached),
            # what the engine's outputs hold vs what its metadata's schedule says each layer processes
            "cache_matches_schedule": cached == llm_tokens(m, int(ids.shape[1])),
            "kv_bytes_at_end": kv_bytes(m, final),
        }
    r, b = res["engines"]["reduced"], res["engines"]["baseline"]
    res["decode_speedup_p50"] = b["decode_step"]["p50_ms"] / r["decode_step"]["p50_ms"]
    res["end_to_end_speedup_p50"] = b["end_to_end"]["p50_ms"] / r["end_to_end"]["p50_ms"]
    res["kv_ratio"] = r["kv_bytes_after_prefill"] / b["kv_bytes_after_prefill"]
    if kv_budget_gb:
        budget = kv_budget_gb * 1e9
        res["kv_budget"] = {"gb": kv_budget_gb, "computed_not_measured": True,
                            "sequences_reduced": int(budget // r["kv_bytes_at_end"]),
                            "sequences_baseline": int(budget // b["kv_bytes_at_end"])}
    return res


def layout(meta: dict) -> str:
    """How an engine's phases are stored: "one file" (a one-file engine, ONNX Runtime or OpenVINO), "two files" (a
    prefill engine and its decode engine), or "prefill only" (no decode engine)."""
    return "one file" if is_one_file(meta) else "two files" if meta.get("decode") else "prefill only"


def compare(engine: str | Path, baseline: str | Path, warmup: int = 3, reps: int = 20,
            threads: int | None = None, prefix: int = DEFAULT_PREFIX, suffix: int = DEFAULT_SUFFIX,
            selector_reps: int = 5, new_tokens: int = 0, kv_budget_gb: float | None = None,
            memory: bool = False, runners: tuple[Any, Any] | None = None) -> dict:
    """Both engines, same backend, same inputs: latency, ratio, tokens, FLOPs, selector cost; with
    new_tokens > 0 also generation (TTFT = the prefill above, decode step, end to end, KV-cache bytes); with memory,
    each engine's resident memory once loaded and its peaks serving, measured in a fresh process after the timing
    (engine/resident.py). `runners`: the two prefill engines where the caller has them open already (opening them
    again would hold another copy of their weights)."""
    threads = threads or os.cpu_count() or 1
    if memory:
        from .engine.resident import check_available

        check_available()  # refused before any work where it cannot be measured
    red, base = runners or (open_prefill(engine, threads), open_prefill(baseline, threads))
    if red.backend != base.backend:
        raise VtrError(f"{engine} is a {red.backend} engine and {baseline} a {base.backend} one; compare engines "
                       "built for the same backend")
    if red.metadata["batch"] != base.metadata["batch"]:
        raise VtrError(f"{engine} takes batch {red.metadata['batch']} and {baseline} batch {base.metadata['batch']}; "
                       "compare engines built with the same --batch")
    if red.metadata["model_id"] != base.metadata["model_id"]:
        log.warning("engines come from different models: %s vs %s", red.metadata["model"], base.metadata["model"])
    weights = [m.get("weights", "none") for m in (red.metadata, base.metadata)]
    if weights[0] != weights[1]:  # int8 weights change both the prefill's and the decode step's speed
        log.warning("%s has %s weights and %s %s weights: the ratios include the weights' difference (build both "
                    "with the same --weights)", engine, weights[0], baseline, weights[1])
    if layout(red.metadata) != layout(base.metadata):  # the one file's If costs a small model a few percent
        log.warning("%s is %s and %s %s: the ratios include the layouts' difference (optimize --one-file / "
                    "--two-files builds both alike)", engine, layout(red.metadata), baseline, layout(base.metadata))
    for meta, path in ((red.metadata, engine), (base.metadata, baseline)):
        try:
            check_prompt_range(meta, prefix + meta["n_image"] + suffix, new_tokens)
        except VtrError as e:
            raise VtrError(f"{path}: --prefix {prefix} / --suffix {suffix}: {e}") from None
    ids, pixels = profile_prompt(red.metadata, prefix, suffix)
    s = ids.shape[1]
    log.info("profiling %s vs %s on a %d-token prompt (%d warm-up, %d reps)", engine, baseline, s, warmup, reps)
    red(ids, pixels)  # input check once; the timed calls skip it
    red.bind(prefill_feeds(red.metadata, ids, pixels))
    base.bind(prefill_feeds(base.metadata, ids, pixels))
    t_red, t_base = time_interleaved([red.time_ms, base.time_ms], warmup, reps)
    lr, lb = Latency.of(t_red), Latency.of(t_base)
    # Per-node timing exists for ONNX Runtime only; other backends fuse the selector into kernels.
    share = reduction_share(engine, ids, pixels, 1, selector_reps, threads) if red.backend == "onnxruntime" else None
    out = {
        "prompt_tokens": s,
        "batch": red.metadata["batch"],
        "environment": environment(threads, red),
        "engines": {},
        "speedup_p50": lb.p50_ms / lr.p50_ms,
        "speedup_mean": lb.mean_ms / lr.mean_ms,
    }
    for name, eng, lat in (("reduced", red, lr), ("baseline", base, lb)):
        m = eng.metadata
        out["engines"][name] = {
            "path": str(eng.path), "method": m["method"], "options": m["options"], "layout": layout(m),
            "latency": asdict(lat), "llm_tokens_per_layer": llm_tokens(m, s),
            "image_tokens_in": m["n_image"], "flops": flops_at(m, s),
        }
        if red.backend != "onnxruntime":
            out["engines"][name]["trtexec"] = {"gpuComputeTime": trtexec_summary(
                t_red if name == "reduced" else t_base)}
    out["flops_ratio"] = out["engines"]["baseline"]["flops"] / out["engines"]["reduced"]["flops"]
    out["generation"] = None
    if new_tokens > 0:
        if not (red.metadata.get("decode") and base.metadata.get("decode")):
            out["generation"] = {"skipped": "an engine has no decode engine (built from an exported program or "
                                            "for TensorRT)"}
        else:
            out["generation"] = generation_profile(red, base, ids, pixels, new_tokens, warmup, reps, threads,
                                                   kv_budget_gb)
    out["memory"] = None
    if memory:
        from .engine.resident import measure

        generated = new_tokens if out["generation"] and "skipped" not in out["generation"] else 0
        out["memory"] = {name: measure(path, generated, threads, prefix, suffix)
                         for name, path in (("reduced", engine), ("baseline", baseline))}
    out["selector"] = None if share is None else {
        "share": share["selector"], "ms": share["selector"] * lr.p50_ms,
        "gather_share": share["gather"], "gather_ms": share["gather"] * lr.p50_ms,
    }
    return out


def text_table(rows: list[tuple]) -> list[str]:
    """Rows as left-aligned columns two spaces apart, a rule of dashes under the first (the header)."""
    w = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


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
    lines = text_table(rows)
    sel = r["selector"]
    b = r.get("batch", 1)
    batch = f" x {b} prompts per run" if b > 1 else ""
    lines += [
        "",
        f"prompt: {r['prompt_tokens']} tokens{batch}, {r['engines']['reduced']['latency']['reps']} timed runs each "
        f"(interleaved), {r['environment']['threads']} threads, {r['environment']['backend']}",
        f"prefill speedup (p50): {r['speedup_p50']:.2f}x   FLOPs-ideal: {r['flops_ratio']:.2f}x   "
        f"measured/ideal: {r['speedup_p50'] / r['flops_ratio']:.2f}",
        (f"selector cost: {sel['ms']:.2f} ms ({100 * sel['share']:.1f}% of the reduced engine); "
         f"sequence gathers: {sel['gather_ms']:.2f} ms ({100 * sel['gather_share']:.1f}%)") if sel else
        "selector cost: not measured on this backend (no per-node timing; see the ONNX Runtime profile)",
    ]
    g = r.get("generation")
    if g and "skipped" in g:
        lines.append(f"generation: not profiled ({g['skipped']})")
    elif g:
        gr, gb = g["engines"]["reduced"], g["engines"]["baseline"]
        rows = [("", "baseline", "reduced", "ratio")]
        ttft_b, ttft_r = e["baseline"]["latency"]["p50_ms"], e["reduced"]["latency"]["p50_ms"]
        rows.append(("time to first token p50 (ms)", f"{ttft_b:.1f}", f"{ttft_r:.1f}", f"{ttft_b / ttft_r:.2f}x"))
        for key, label in (("decode_step", "time per output token p50 (ms)"),
                           ("end_to_end", f"end to end, {g['new_tokens']} tokens p50 (ms)")):
            vb, vr = gb[key]["p50_ms"], gr[key]["p50_ms"]
            rows.append((label, f"{vb:.2f}", f"{vr:.2f}", f"{vb / vr:.2f}x"))
        rows.append(("tokens/s", f"{gb['tokens_per_s']:.1f}", f"{gr['tokens_per_s']:.1f}",
                     f"{gr['tokens_per_s'] / gb['tokens_per_s']:.2f}x"))
        rows.append(("KV cache after prefill (MB)", f"{gb['kv_bytes_after_prefill'] / 1e6:.3f}",
                     f"{gr['kv_bytes_after_prefill'] / 1e6:.3f}", f"{g['kv_ratio']:.3f}"))
        lines += ["", *text_table(rows), f"decode step measured at the prompt's context ({r['prompt_tokens']} tokens: the prefill's "
                  f"cache, in buffers with room for the new tokens); end to end = prefill + {g['new_tokens'] - 1} "
                  "decode steps, greedy"]
        if b > 1:
            lines.append(f"batch {b}: every time is one run of all {b} prompts; tokens/s counts the tokens of all of "
                         "them; KV cache is per sequence")
        if g.get("kv_budget"):
            kb = g["kv_budget"]
            lines.append(f"sequences whose KV cache fits in {kb['gb']:g} GB (computed from shapes, not measured): "
                         f"baseline {kb['sequences_baseline']}, reduced {kb['sequences_reduced']}")
    if r.get("memory"):
        lines += ["", *memory_table(r["memory"])]
    return "\n".join(lines)


def memory_table(mem: dict) -> list[str]:
    """The report's lines for compare(memory=True): MiB per engine and what the reduced one saves."""
    mb, mr = mem["baseline"], mem["reduced"]
    rows = [("resident memory (MiB)", "baseline", "reduced", "saved")]
    for key, label in (("loaded_mib", "engine loaded"), ("peak_after_prefills_mib", "peak, 2 prefills"),
                       ("decode_opened_mib", "decode engine opened (+)"),
                       ("peak_after_generations_mib", "peak, + 2 generations")):
        if key in mb and key in mr:
            rows.append((label, f"{mb[key]:.1f}", f"{mr[key]:.1f}", f"{mb[key] - mr[key]:.1f}"))
    lines = [*text_table(rows), "measured in a fresh process per engine, after the timing: resident once loaded, then the peak "
             "from there (everything the process holds: weights, runtime workspace, cache buffers)"]
    if "decode_opened_mib" in mb:
        lines.append("decode engine opened: what the process grew by when it opened the decode engine, before any step; "
                     "a separate decode engine holds its own copy of the LLM's weights (the decode phase of a "
                     "one-file engine shares the prefill's)")
    return lines
