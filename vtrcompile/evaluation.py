"""Engines + a labelled benchmark (or any images/prompts) -> accuracy per question kind, fidelity to the
unmodified engine, and the method/budget sweep (table, JSON, plot)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VtrError

log = logging.getLogger(__name__)

BENCHMARKS = ("vqa-synth",)


@dataclass
class Item:
    """One prompt: ids [1, S] int64, pixels [1, 3, H, W] float32, the answer's token id and the question kind
    (both None for unlabelled prompts)."""

    ids: np.ndarray
    pixels: np.ndarray
    answer: int | None = None
    kind: str | None = None


class VqaSynthItems(Sequence):
    """vqa-synth samples rendered on demand (576 image tokens each; a list of them would hold ~1 GB)."""

    def __init__(self, split: str, count: int, start: int = 0) -> None:
        from .datasets import vqa_synth as vs

        if split not in vs.SPLIT_SEEDS:
            raise VtrError(f"unknown split '{split}' for vqa-synth; use one of {', '.join(vs.SPLIT_SEEDS)}")
        self.vs, self.split, self.count, self.start = vs, split, count, start
        self.vocab = vs.vocabulary()
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if not 0 <= i < self.count:
            raise IndexError(i)
        from .models.prompt import layout_prompt

        s = self.vs.sample(self.split, self.start + i)
        words, img = list(s.prompt), self.vs.IMAGE_TOKEN
        at, n = words.index(img), words.count(img)
        ids = layout_prompt([self.index[w] for w in words[:at]], [self.index[w] for w in words[at + n:]], n,
                            self.index[img])
        px = self.vs.pixel_values(self.vs.render(s.scene)[None])
        return Item(ids, px, self.index[s.answer], s.kind)

    def check_engine(self, meta: dict[str, Any], path: str) -> None:
        """The engine's model must speak the benchmark's vocabulary and image geometry."""
        want = {"vocab": len(self.vocab), "image_token_id": self.index[self.vs.IMAGE_TOKEN],
                "n_image": self.vs.GRID * self.vs.GRID, "pixel_shape": [3, self.vs.SIZE, self.vs.SIZE]}
        bad = [f"{k} {meta.get(k)} (benchmark: {v})" for k, v in want.items() if meta.get(k) != v]
        if bad:
            raise VtrError(f"{path}: its model does not fit vqa-synth ({', '.join(bad)}); evaluate an engine built "
                           "from a model trained on it, such as models/vqa-synth-llava")


def benchmark_items(spec: str, count: int) -> VqaSynthItems:
    """'vqa-synth' or 'vqa-synth:<split>' -> items; the split defaults to test."""
    name, sep, split = spec.partition(":")
    if sep and not split:
        raise VtrError(f"--benchmark/--split '{spec}': the split is empty; use one of train, val, test")
    if name not in BENCHMARKS:
        raise VtrError(f"unknown benchmark '{name}'; available: {', '.join(BENCHMARKS)}")
    return VqaSynthItems(split or "test", count)


def calibration_items(spec: str | Path, facts: dict[str, Any], count: int | None = None, tokenizer: Any = None,
                      for_choices: bool = True, seed: int = 0) -> tuple[list, list[int] | None, str]:
    """The one source of calibration prompts (search, `--keep auto` fidelity, eval --calibration):
    'vqa-synth[:split]' (labelled; split val by default; the test split is refused when the items make
    choices) or a folder of images with an optional prompts.jsonl (unlabelled) -> items, answers (or None),
    a description. `facts`: what a valid prompt is (a family's `prompt_facts` or an engine's metadata).

    A folder's prompt is tokenized with `tokenizer` when there is one and the folder has prompts.jsonl (the
    text before and after `<image>` around the N image tokens); otherwise each image gets random text ids
    (seeded) around it, and fidelity then measures how well the reduction keeps the next-token distribution
    for this image content, not for a particular question."""
    from .calibration import load_calibration
    from .models.prompt import layout_prompt, random_text_ids

    spec = str(spec)
    if spec.startswith("vqa-synth"):
        split = spec.partition(":")[2] or "val"
        if split == "test" and for_choices:
            raise VtrError("the test split is never used for choices; calibrate on vqa-synth:val (or :train)")
        items = VqaSynthItems(split, count if count is not None else 280)
        if facts["vocab"] != len(items.vocab) or facts["image_token_id"] != items.index["<image>"]:
            raise VtrError(f"{spec}: the model's vocabulary is not vqa-synth's; calibrate with a folder of images "
                           "instead")
        got = [items[i] for i in range(len(items))]
        return got, [it.answer for it in got], f"vqa-synth:{split} ({len(got)} prompts, labelled)"
    processing = facts.get("processor") or {}
    calib = load_calibration(spec, processing.get("image_size", int(facts["pixel_shape"][-1])),
                             {**processing, "tiles": facts.get("tiles", 1)})
    n, img, vocab = facts["n_image"], facts["image_token_id"], facts["vocab"]
    rng = np.random.default_rng(seed)
    records = calib.prompts or [{"image": name, "prompt": ""} for name in calib.names]
    items = []
    for rec in records if count is None else records[:count]:
        k = calib.names.index(rec["image"])
        if tokenizer is not None and rec["prompt"]:
            pre, _, suf = rec["prompt"].partition("<image>")
            pre_ids = tokenizer(pre, add_special_tokens=False)["input_ids"] or [0]
            suf_ids = tokenizer(suf, add_special_tokens=False)["input_ids"] or [0]
        else:
            pre_len, suf_len = int(rng.integers(1, 40)), int(rng.integers(4, 24))
            pre_ids = random_text_ids(rng, img, vocab, (1, pre_len))
            suf_ids = random_text_ids(rng, img, vocab, (1, suf_len))
        items.append(Item(layout_prompt(pre_ids, suf_ids, n, img), calib.pixels_of(k).numpy()))
    how = "tokenized prompts" if tokenizer is not None and calib.prompts else "random text ids"
    return items, None, f"{spec} ({len(items)} prompts, unlabelled, {how})"


def _engine_tokenizer(path: str | Path, meta: dict[str, Any]) -> Any:
    """The tokenizer copied beside an engine, or None (a preset or a model directory without one)."""
    from .engine.prompting import load_tokenizer

    try:
        return load_tokenizer(Path(path), meta)
    except VtrError:
        return None


def _progress(label: str, total: int) -> Callable[[int], None]:
    t0, step = time.perf_counter(), max(1, total // 10)

    def tick(done: int) -> None:
        if done % step == 0 or done == total:
            el = time.perf_counter() - t0
            log.info("%s: %d/%d (%.0fs, about %.0fs left)", label, done, total, el, el / done * (total - done))
    return tick


def accuracy(engine, items: Sequence[Item], label: str = "eval", max_new_tokens: int = 1, batch: int = 1
             ) -> dict[str, Any]:
    """Greedy answers scored against the one-word label: with max_new_tokens 1 the argmax of the prefill's
    next-token logits; above 1 the engine generates (prefill + decode, `engine` an Engine from load_engine)
    until EOS or max_new_tokens, and the answer is the first generated token (the benchmark's answers are one
    word, one token). batch > 1: an engine built for that many prompts per run (`engine` a prefill runner or an
    Engine) scores the items in runs of `batch`, left-padded (`runs`)."""
    from .datasets.vqa_synth import KINDS

    right: dict[str, list[int]] = {}
    preds: list[int] = []
    eos = 0
    tick = _progress(label, len(items))
    done = 0
    for run, ids, mask, px in runs(items, batch, _image_token_id(engine)):
        if max_new_tokens > 1:
            padding = {} if mask is None else {"attention_mask": mask}
            gen = engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=max_new_tokens, **padding)
            tokens, ended = gen.tokens[:, 0], gen.ended
        else:
            tokens, ended = np.argmax(next_token_logits(engine, ids, px, mask), axis=-1), [False] * len(ids)
        for r, it in enumerate(run):
            p = int(tokens[r])
            eos += int(max_new_tokens > 1 and ended[r])
            preds.append(p)
            right.setdefault(it.kind or "?", []).append(int(p == it.answer))
            done += 1
            tick(done)
    out: dict[str, Any] = {"n": len(items), "per_kind": {k: float(np.mean(v)) for k, v in sorted(right.items())}}
    for cls in ("coarse", "fine"):
        vals = [x for k, v in right.items() if KINDS.get(k) == cls for x in v]
        out[cls] = float(np.mean(vals)) if vals else None
    out["overall"] = float(np.mean([x for v in right.values() for x in v]))
    if max_new_tokens > 1:
        out["generated"] = {"max_new_tokens": max_new_tokens, "ended_at_eos": eos / max(1, len(items))}
    out["predictions"] = preds
    return out


def runs(items: Sequence[Item], batch: int, image_token_id: int | None = None
         ) -> Iterator[tuple[list[Item], np.ndarray, np.ndarray | None, np.ndarray]]:
    """The items in runs of `batch` prompts: (the run's items, ids [batch, S], attention_mask [batch, S] or None
    for batch 1, pixels of the run's images in order). Prompts of different lengths are left-padded; the last
    run is filled up with copies of its last item, which are not returned among its items (not scored)."""
    from .engine.prompting import left_pad, pad_id

    it = _iter(items)
    while True:
        run = [x for _, x in zip(range(batch), it, strict=False)]
        if not run:
            return
        if batch == 1:
            yield run, run[0].ids, None, run[0].pixels
            continue
        filled = run + [run[-1]] * (batch - len(run))
        ids, mask = left_pad([x.ids[0] for x in filled], pad_id(None, -1 if image_token_id is None else image_token_id))
        yield run, ids, mask, np.concatenate([x.pixels for x in filled])


def _image_token_id(engine) -> int | None:
    meta = getattr(engine, "metadata", None)
    return meta.get("image_token_id") if isinstance(meta, dict) else None


def next_token_logits(runner, ids: np.ndarray, pixels: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Prefill logits [B, vocab] of a runner: its own call for one unpadded prompt, else every input by name
    (the batch's attention_mask included)."""
    if mask is None:
        return runner(ids, pixels, check=False)
    from .engine.host_inputs import prefill_feeds

    return runner.run(prefill_feeds(runner.metadata, ids, pixels, mask))["logits"]


def _iter(items: Sequence[Item]) -> Iterator[Item]:
    for i in range(len(items)):
        yield items[i]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def fidelity(engine, baseline, items: Sequence[Item], label: str = "fidelity", batch: int = 1) -> dict[str, float]:
    """Top-1 agreement and mean KL(baseline || engine) of the next-token distribution (batch: as in accuracy)."""
    agree, kls = [], []
    tick = _progress(label, len(items))
    for run, ids, mask, px in runs(items, batch, _image_token_id(engine)):
        lps = next_token_logits(engine, ids, px, mask)
        lbs = next_token_logits(baseline, ids, px, mask)
        for r in range(len(run)):
            lp, lb = log_softmax(lps[r]), log_softmax(lbs[r])
            agree.append(int(lp.argmax() == lb.argmax()))
            kls.append(float((np.exp(lb) * (lb - lp)).sum()))
            tick(len(agree))
    return {"n": len(items), "top1_agreement": float(np.mean(agree)), "mean_kl": float(np.mean(kls))}


def evaluate(engines: Sequence[str | Path], baseline: str | Path | None, spec: str, count: int, with_fidelity: bool,
             calibration: str | Path | None, speed: bool, max_new_tokens: int = 1, reps: int = 20, warmup: int = 3,
             threads: int | None = None) -> dict[str, Any]:
    """The `eval` job: accuracy per question kind next to the baseline engine, fidelity (top-1, KL) and the
    prefill speedup, for each engine."""
    from .engine.runners import open_prefill
    from .profile import compare

    if (with_fidelity or speed) and baseline is None:
        raise VtrError("--baseline BASELINE (the unmodified engine) is needed for the speedup and --fidelity; "
                       "pass --no-speed to report accuracy alone")
    if calibration is not None and not with_fidelity:
        raise VtrError("--calibration has no labels; use it with --fidelity")
    # each engine opened once: every open runner holds its own copy of the weights
    base = open_prefill(baseline, threads) if baseline is not None else None
    runners = [open_prefill(e, threads) for e in engines]
    every = [*runners, *([base] if base else [])]
    gen: dict[str, Any] = {}
    if max_new_tokens > 1:
        from .engine.generate import Engine

        gen = {id(r): Engine(r.path, threads, prefill=r) for r in every}
    batches = {r.metadata.get("batch", 1) for r in every}
    if len(batches) > 1:
        listing = ", ".join(f"{r.path} {r.metadata.get('batch', 1)}" for r in every)
        raise VtrError(f"the engines take different numbers of prompts per run ({listing}); evaluate engines built "
                       "with the same --batch")
    batch = batches.pop()

    def scored(runner):
        return gen[id(runner)] if max_new_tokens > 1 else runner

    report: dict[str, Any] = {"benchmark": spec, "engines": []}
    if calibration is not None:
        items: Any = calibration_items(calibration, runners[0].metadata, count, _engine_tokenizer(engines[0], runners[0].metadata),
                                       for_choices=False)[0]
    else:
        items = benchmark_items(spec, count)
        for r in every:
            items.check_engine(r.metadata, str(r.path))
        if base is not None:
            report["baseline"] = accuracy(scored(base), items, f"{baseline}", max_new_tokens, batch)
            report["baseline"].pop("predictions")
            report["baseline"]["method"] = base.metadata["method"]
    for path, r in zip(engines, runners, strict=True):
        row: dict[str, Any] = {"path": str(path), "method": r.metadata["method"], "options": r.metadata["options"]}
        if calibration is None:
            row["accuracy"] = accuracy(scored(r), items, str(path), max_new_tokens, batch)
            row["accuracy"].pop("predictions")
        if with_fidelity:
            row["fidelity"] = fidelity(r, base, items, f"{path} fidelity", batch)
        if speed:
            assert baseline is not None
            rep = compare(path, baseline, warmup, reps, threads, runners=(r, base))
            row["speedup_p50"], row["prefill_p50_ms"] = rep["speedup_p50"], rep["engines"]["reduced"]["latency"]["p50_ms"]
            row["baseline_p50_ms"] = rep["engines"]["baseline"]["latency"]["p50_ms"]
        report["engines"].append(row)
    return report
