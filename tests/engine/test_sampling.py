"""Sampled generation: the token chooser against a reference written with full sorts, and the engine loop
feeding each chosen token to the decode engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import REFERENCE_ATOL
from vtrcompile import load_engine
from vtrcompile.engine.prompting import TextStream
from vtrcompile.engine.sampling import GREEDY, Sampling, choose, kept_tokens
from vtrcompile.errors import VtrError


def _reference_kept(row, temperature, top_k=0, top_p=1.0) -> dict[int, float]:
    """Token -> probability after temperature, top_k, top_p, by sorting the whole row (Hugging Face's order)."""
    z = np.asarray(row, dtype=np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    if top_k:
        order = order[:top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    if top_p < 1:
        n = next(i for i, c in enumerate(np.cumsum(p)) if c >= top_p) + 1
        order, p = order[:n], p[:n] / p[:n].sum()
    return dict(zip(order.tolist(), p.tolist(), strict=True))


def _kept(row, **opts) -> dict[int, float]:
    """The tokens with a chance (kept_tokens may list tokens of probability 0 where no top_p sorts them out)."""
    ids, probs = kept_tokens(np.asarray(row, dtype=np.float32), Sampling(**opts))
    return {t: p for t, p in zip(ids.tolist(), probs.tolist(), strict=True) if p > 0}


def test_greedy_is_the_argmax_with_ties_to_the_lower_id():
    logits = np.array([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 2.0, 5.0]], dtype=np.float32)
    assert choose(logits, GREEDY).tolist() == [1, 0]


def test_draws_follow_the_softmax_of_the_scaled_logits():
    row = np.array([2.0, 1.0, 0.5, -1.0, 0.0], dtype=np.float32)
    draws = choose(np.tile(row, (20000, 1)), Sampling(temperature=0.7, seed=1))
    freq = np.bincount(draws, minlength=5) / len(draws)
    want = _reference_kept(row, 0.7)
    assert max(abs(freq[t] - p) for t, p in want.items()) < 0.012, (freq, want)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 7, 1.0), (0.5, 0, 0.9), (2.0, 0, 0.5), (1.0, 40, 0.8), (1.0, 0, 0.999), (0.3, 3, 0.2)])
def test_kept_tokens_equal_a_full_sort_and_hugging_face_s_warpers(temperature, top_k, top_p):
    """On a 5000-token row: flat enough at temperature 2 that the nucleus passes the first 64 tokens tried."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    row = np.random.default_rng(0).normal(0, 3, 5000).astype(np.float32)
    got, want = _kept(row, temperature=temperature, top_k=top_k, top_p=top_p), \
        _reference_kept(row, temperature, top_k, top_p)
    assert got.keys() == want.keys()
    assert max(abs(got[t] - want[t]) for t in want) < 1e-6  # float32 against float64
    warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) + \
        ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
    hf = torch.softmax(LogitsProcessorList(warpers)(torch.zeros(1, 1, dtype=torch.long), torch.tensor(row)[None]),
                       dim=-1)[0].numpy()
    assert set(np.flatnonzero(hf).tolist()) == got.keys()
    assert max(abs(float(hf[t]) - p) for t, p in got.items()) < 1e-6
    if (temperature, top_p) == (2.0, 0.5):
        assert len(want) > 64


def test_top_p_keeps_the_token_that_crosses_it_and_top_k_comes_first():
    row = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert _kept(row, temperature=1.0, top_p=0.6).keys() == {0, 1}
    assert _kept(row, temperature=1.0, top_p=0.5).keys() == {0}
    # top_k 2 leaves 0.5 / 0.8 and 0.3 / 0.8: the nucleus of 0.6 is then the first token alone
    assert _kept(row, temperature=1.0, top_k=2, top_p=0.6) == pytest.approx({0: 1.0})


def test_extreme_temperatures_and_numpy_scalars():
    row = np.array([1.0, 3.0, -np.inf, 2.5], dtype=np.float32)
    assert _kept(row, temperature=1e-30) == {1: 1.0}  # as good as greedy, no NaN
    assert _kept(row, temperature=1e30) == pytest.approx({0: 1 / 3, 1: 1 / 3, 3: 1 / 3})  # flat, -inf still out
    s = Sampling(np.float32(0.5), np.int64(2), np.float64(0.9), np.int32(1))
    assert set(choose(row[None], s).tolist()) <= {1, 3}


def test_a_seed_repeats_its_draws():
    logits = np.random.default_rng(3).normal(0, 1, (4, 50)).astype(np.float32)
    runs = [[choose(logits, s, s.rng()).tolist() for _ in range(3)]
            for s in (Sampling(1.0, seed=5), Sampling(1.0, seed=5), Sampling(1.0, seed=6))]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("opts,words", [
    ({"temperature": -0.5}, "temperature -0.5"),
    ({"temperature": float("nan")}, "temperature nan"),
    ({"temperature": 1.0, "top_k": -1}, "top_k -1"),
    ({"temperature": 1.0, "top_p": 0.0}, "top_p 0.0"),
    ({"temperature": 1.0, "top_p": 1.5}, "top_p 1.5"),
    ({"temperature": 1.0, "seed": -2}, "seed -2"),
    ({"top_k": 5}, "give a temperature above 0"),
    ({"top_p": 0.9}, "give a temperature above 0"),
])
def test_bad_sampling_options(opts, words):
    with pytest.raises(VtrError, match=words):
        Sampling(**opts)


def test_sampled_tokens_are_what_the_decode_engine_gets(tiny, tiny_engines):
    """The unmodified pair sampling at temperature 3: the same seed gives the same tokens, top_k 1 gives the greedy
    ones, each token is one its step's logits allow, and each step's logits are the model's on the prompt
    followed by the tokens sampled before (so the sampled token, not the argmax, went to the decode engine)."""
    engine = load_engine(tiny_engines["none"].files[-1], threads=1)
    ids, px = tiny.example_inputs
    steps = 6
    greedy = engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=steps, eos_token_id=[])
    top1 = engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=steps, eos_token_id=[], temperature=3.0,
                           top_k=1, seed=0)
    assert top1.tokens.tolist() == greedy.tokens.tolist()
    a, b = (engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=steps, eos_token_id=[], temperature=3.0,
                            top_p=0.95, seed=11) for _ in range(2))
    assert a.tokens.tolist() == b.tokens.tolist()
    assert a.tokens.tolist() != greedy.tokens.tolist()  # 320 nearly flat choices a step: it wandered off
    for step in range(steps):
        assert int(a.tokens[0, step]) in _kept(a.logits[0, step], temperature=3.0, top_p=0.95)
        with torch.no_grad():
            ref = tiny.module(torch.cat([ids, torch.as_tensor(a.tokens[:, :step])], dim=1), px).numpy()
        assert float(np.abs(a.logits[0, step] - ref).max()) <= REFERENCE_ATOL


def test_on_token_sees_each_step_and_can_stop(tiny, tiny_engines):
    engine = load_engine(tiny_engines["none"].files[-1], threads=1)
    ids, px = tiny.example_inputs
    seen: list[list[int]] = []
    full = engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=5, eos_token_id=[],
                           on_token=lambda t: seen.append(t.tolist()))
    assert np.array(seen).T.tolist() == full.tokens.tolist() and not full.stopped
    calls: list[list[int]] = []

    def stop_at_the_third(tokens) -> bool:
        calls.append(tokens.tolist())
        return len(calls) == 3

    cut = engine.generate(input_ids=ids, pixel_values=px, max_new_tokens=5, eos_token_id=[], on_token=stop_at_the_third)
    assert calls == seen[:3] and cut.tokens.tolist() == full.tokens[:, :3].tolist()
    assert cut.stopped and len(cut.decode_ms) == 2
    assert cut.lengths == [3] and not cut.eos_reached


class _ByteTokenizer:
    """Each id is a few bytes; decoding joins them and marks a cut character with U+FFFD, as byte-level BPE does."""

    pieces = {1: b"\xc3", 2: b"\xa9", 3: b" ok", 4: b"!"}

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_a_cut_character():
    stream = TextStream(_ByteTokenizer())
    assert [stream.push(t) for t in (3, 1, 2, 4)] == [" ok", "", "\u00e9", "!"]
    assert stream.rest() == ""
    stream = TextStream(_ByteTokenizer())
    assert [stream.push(t) for t in (4, 1)] == ["!", ""]
    assert stream.rest() == "\ufffd"  # generation ended inside a character: what the whole decode shows
