"""vqa-synth: deterministic bytes per (split, index), and answers that agree with what is drawn."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from vtrcompile.datasets import vqa_synth as vs


def _digest(split: str, index: int) -> str:
    s = vs.sample(split, index)
    h = hashlib.sha256(vs.render(s.scene).tobytes())
    h.update(" ".join(s.prompt).encode() + s.answer.encode())
    return h.hexdigest()[:16]


def test_same_seed_same_bytes():
    assert [_digest("test", i) for i in range(5)] == [_digest("test", i) for i in range(5)]
    assert _digest("test", 0) != _digest("val", 0) != _digest("train", 0)
    # Pinned: a change to the generator (or to numpy's PCG64 stream) must be deliberate.
    assert _digest("test", 0) == GOLDEN_TEST_0


GOLDEN_TEST_0 = "30a5a60e1b45faf9"


def test_geometry_and_prompt_layout():
    s = vs.sample("val", 3)
    img = vs.render(s.scene)
    assert img.shape == (336, 336, 3) and img.dtype == np.uint8
    runs = [i for i, w in enumerate(s.prompt) if w == vs.IMAGE_TOKEN]
    assert len(runs) == 576 and runs == list(range(runs[0], runs[0] + 576))  # one contiguous block
    assert s.prompt[-2:] == ("assistant", ":") and runs[0] >= 3
    assert vs.encode(s.prompt).max() == len(vs.vocabulary()) - 1  # the image id is the last word


def test_question_kinds_are_balanced_and_answers_in_vocabulary():
    ss = vs.samples("train", 70)
    kinds = [s.kind for s in ss]
    assert all(kinds.count(k) == 10 for k in vs.KINDS)
    vocab = set(vs.vocabulary())
    assert all(s.answer in vocab for s in ss)
    reds = [s.answer for s in vs.samples("train", 700) if s.kind == "red"]
    assert 0.3 < reds.count("yes") / len(reds) < 0.7


def _colour_of(rgb) -> str:
    return next(k for k, v in vs.RGB.items() if tuple(int(c) for c in rgb) == v)


def _read_digit(img: np.ndarray, row: int, col: int) -> int:
    """Read the drawn digit back: which segments are black at their centre pixel, then which digit that is."""
    dark = img.sum(axis=2) < 100
    rects = vs.segment_rects(row, col)
    on = "".join(sorted(s for s, (x0, y0, x1, y1) in rects.items() if dark[(y0 + y1) // 2, (x0 + x1) // 2]))
    return next(d for d, segs in enumerate(vs._SEGMENTS) if "".join(sorted(segs)) == on)


@pytest.mark.parametrize("index", range(12))
def test_rendered_scene_agrees_with_every_answer(index):
    s = vs.sample("test", index)
    sc, img = s.scene, vs.render(s.scene)
    colours, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
    assert sc.answer("background") == _colour_of(colours[counts.argmax()])  # dominant colour
    x0, y0, x1, y1 = sc.shape_box
    fill = (img[y0:y1, x0:x1] == vs.RGB[sc.shape_colour]).all(axis=2).mean()
    shape = "square" if fill > 0.95 else ("circle" if fill > 0.65 else "triangle")
    assert sc.answer("shape") == shape
    inside = img[y0:y1, x0:x1].reshape(-1, 3)
    inside = inside[(inside != vs.RGB[sc.background]).any(axis=1)]
    cols, cnt = np.unique(inside, axis=0, return_counts=True)
    big = _colour_of(cols[cnt.argmax()])  # the big shape's colour, read from its bounding box
    assert sc.answer("shape_colour") == big and sc.answer("red") == ("yes" if big == "red" else "no")
    assert sc.answer("digit") == str(_read_digit(img, *sc.digit_cell))
    dot_px = (img == vs.RGB[sc.dot_colour]).all(axis=2)
    r, c = sc.digit_cell
    dot_px[r * 14:(r + 2) * 14, c * 14:(c + 2) * 14] = False  # the box is white with black strokes
    per_dot = int(dot_px.sum()) // len(sc.dot_cells)
    assert per_dot * len(sc.dot_cells) == dot_px.sum()  # every dot has the same size: count = pixels / size
    assert sc.answer("dot_count") == vs.COUNT_WORDS[int(dot_px.sum()) // per_dot - 1]
    assert per_dot < 28 * 28 < fill * (x1 - x0) ** 2  # the dots are the smallest objects
    assert sc.answer("dot_colour") == sc.dot_colour


def test_known_scene_by_hand():
    sc = vs.Scene("blue", "square", "red", (100, 100, 220, 220), 7, (0, 0), "pink", ((23, 23), (23, 21)))
    img = vs.render(sc)
    assert _read_digit(img, 0, 0) == 7
    assert tuple(img[160, 160]) == vs.RGB["red"] and tuple(img[50, 300]) == vs.RGB["blue"]
    assert tuple(img[23 * 14 + 7, 23 * 14 + 7]) == vs.RGB["pink"]
    assert [sc.answer(k) for k in ("background", "shape", "red", "digit", "dot_colour", "dot_count")] == [
        "blue", "square", "yes", "7", "pink", "two"]
