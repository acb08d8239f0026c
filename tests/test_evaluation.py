"""Accuracy and fidelity bookkeeping on engines with known behaviour; the benchmark/engine fit check."""

from __future__ import annotations

import numpy as np
import pytest

from vtrcompile.datasets import vqa_synth as vs
from vtrcompile.errors import VtrError
from vtrcompile.evaluation import accuracy, benchmark_items, fidelity, log_softmax


def _oracle(split: str, wrong: set[str]):
    """An engine that answers sample i of `split` correctly unless its kind is in `wrong` (then: 'yes')."""
    vocab = vs.vocabulary()
    truth = {}
    for i in range(100):
        smp = vs.sample(split, i)
        truth[vs.encode(smp.prompt).tobytes()] = smp

    def run(ids, px, check=True):
        smp = truth[ids.tobytes()]
        out = np.zeros((1, len(vocab)), dtype=np.float32)
        out[0, vocab.index("yes" if smp.kind in wrong else smp.answer)] = 5.0
        return out
    return run


def test_accuracy_per_kind_and_class():
    r = accuracy(_oracle("val", {"digit", "shape"}), benchmark_items("vqa-synth:val", 28))
    assert r["per_kind"]["digit"] == 0.0 and r["per_kind"]["shape"] == 0.0
    assert r["per_kind"]["background"] == 1.0 and r["per_kind"]["dot_count"] == 1.0
    assert r["coarse"] == pytest.approx(3 / 4) and r["fine"] == pytest.approx(2 / 3)
    assert r["n"] == 28 and len(r["predictions"]) == 28


def _hashed(ids, px, check=True):
    """Deterministic pseudo-logits per prompt."""
    seed = int.from_bytes(ids.tobytes()[-64:], "little") % (2**32)
    return np.random.default_rng(seed).standard_normal((1, 72)).astype(np.float32)


def test_fidelity_is_exact_for_the_same_engine_and_drops_for_another():
    items = benchmark_items("vqa-synth:val", 6)
    same = fidelity(_hashed, _hashed, items)
    assert same["top1_agreement"] == 1.0 and same["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    flat = fidelity(lambda ids, px, check=True: np.zeros((1, 72), np.float32), _hashed, items)
    assert flat["mean_kl"] > 0.1 and flat["n"] == 6


def test_log_softmax_normalises():
    x = np.array([[1000.0, 0.0, -5.0]])
    assert np.exp(log_softmax(x)).sum() == pytest.approx(1.0)


def test_engine_that_does_not_speak_the_benchmark_is_refused():
    items = benchmark_items("vqa-synth", 1)
    meta = {"vocab": 320, "image_token_id": 319, "n_image": 36, "pixel_shape": [3, 84, 84]}
    with pytest.raises(VtrError, match="does not fit vqa-synth"):
        items.check_engine(meta, "tiny.onnx")


def test_unknown_benchmark_and_split():
    with pytest.raises(VtrError, match="unknown benchmark"):
        benchmark_items("coco", 1)
    with pytest.raises(VtrError, match="unknown split"):
        benchmark_items("vqa-synth:dev", 1)
