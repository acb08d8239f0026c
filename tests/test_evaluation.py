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


class _BatchedOracle:
    """The oracle as a prefill runner of a batch-3 engine: run(feeds) answers each row, its left padding removed
    by the attention_mask (a row that is not exactly a known prompt fails the lookup)."""

    def __init__(self, single):
        self.single = single
        self.metadata = {"image_token_id": vs.vocabulary().index(vs.IMAGE_TOKEN), "batch": 3,
                         "host_inputs": {"attention_mask": {"kind": "padding", "seq_dim": 1}}}
        self.rows_seen = []

    def run(self, feeds):
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        assert ids.shape[0] == 3 and feeds["pixel_values"].shape[0] == 3 and mask.shape == ids.shape
        self.rows_seen.append(int(mask.sum(1).min()))
        return {"logits": np.concatenate([self.single(ids[r][mask[r] == 1][None], None) for r in range(3)])}


def test_a_batch_engine_is_scored_in_left_padded_runs():
    from vtrcompile.evaluation import runs

    items = benchmark_items("vqa-synth:val", 7)
    got = list(runs(items, 3, 3))
    assert [len(r[0]) for r in got] == [3, 3, 1]
    for run, ids, mask, px in got:
        assert ids.shape == mask.shape and ids.shape[0] == 3 and px.shape[0] == 3
        for r, it in enumerate(run + [run[-1]] * (3 - len(run))):  # the last run is filled with its last item
            n = it.ids.shape[1]
            assert mask[r].tolist() == [0] * (ids.shape[1] - n) + [1] * n
            assert np.array_equal(ids[r, -n:], it.ids[0]) and np.array_equal(px[r:r + 1], it.pixels)
    assert len({it.ids.shape[1] for it in items}) > 1  # the runs really pad
    first = next(iter(runs(items, 1)))
    assert first[2] is None and np.array_equal(first[1], items[0].ids)
    many = benchmark_items("vqa-synth:val", 28)
    batched = _BatchedOracle(_oracle("val", {"digit", "shape"}))
    a, b = accuracy(batched, many, batch=3), accuracy(_oracle("val", {"digit", "shape"}), many)
    assert a == b and len(batched.rows_seen) == 10
    f = fidelity(_BatchedOracle(_hashed), _BatchedOracle(_hashed), benchmark_items("vqa-synth:val", 5), batch=3)
    assert f["n"] == 5 and f["top1_agreement"] == 1.0
