"""Seeded scenes + questions -> (336x336 image, prompt tokens, one-token answer): the vqa-synth benchmark.

A scene is a background colour, one big shape, a small white box holding a seven-segment digit (2 x 2
patches of 14 pixels) and 1-4 small dots of one colour (one patch each). Coarse questions are answerable from most of the image
(background, big shape); fine-grained ones need the few patches holding the box or the dots.

Every sample is a pure function of (split, index): numpy's PCG64 seeded with [SPLIT_SEED, index], so the
same seed gives the same bytes on any machine. Splits differ only by seed; the test split is never used
for any choice (training uses train, searches and calibration use val).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 336
PATCH = 14
GRID = SIZE // PATCH  # 24 x 24 = 576 image tokens, LLaVA-1.5's geometry
SPLIT_SEEDS = {"train": 1000, "val": 2000, "test": 3000}

RGB = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
    "yellow": (235, 210, 40), "purple": (140, 50, 170), "orange": (245, 140, 20),
    "black": (10, 10, 10), "white": (250, 250, 250), "cyan": (40, 220, 230),
    "pink": (250, 150, 200), "brown": (120, 70, 30), "gray": (128, 128, 128),
}
BIG_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")  # background and the big shape
DOT_COLOURS = ("black", "white", "cyan", "pink", "brown", "gray")  # never an object "red", never the bg
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three", "four")

# Question kinds: (kind, coarse|fine, question words). Answers are single words of ANSWERS.
QUESTIONS = (
    ("background", "coarse", "what is the dominant colour of the image ?"),
    ("shape", "coarse", "which shape is in the image ?"),
    ("red", "coarse", "is there a red object ?"),
    ("shape_colour", "coarse", "what colour is the big shape ?"),
    ("digit", "fine", "what digit is in the small box ?"),
    ("dot_colour", "fine", "what colour is the smallest object ?"),
    ("dot_count", "fine", "how many small dots are there ?"),
)
KINDS = {q[0]: q[1] for q in QUESTIONS}

PREFIX_WORDS = ("please", "look", "at", "this", "picture", "carefully", "and", "answer", "the", "image",
                "shows", "a", "scene", ".")
SPECIAL = ("<pad>", "<unk>", "<s>")
IMAGE_TOKEN = "<image>"
ANSWERS = tuple(BIG_COLOURS) + DOT_COLOURS + SHAPES + ("yes", "no") + tuple("0123456789") + COUNT_WORDS


def vocabulary() -> list[str]:
    """Every word the benchmark uses, in a fixed order; the demo tokenizer is built from it."""
    words: list[str] = list(SPECIAL)
    seen = set(words)

    def add(w: str) -> None:
        if w not in seen:
            seen.add(w)
            words.append(w)

    for w in ("user", ":", "assistant", *PREFIX_WORDS):
        add(w)
    for _, _, q in QUESTIONS:
        for w in q.split():
            add(w)
    for w in ANSWERS:
        add(w)
    add(IMAGE_TOKEN)  # last: the image placeholder id is vocab_size - 1
    return words


@dataclass(frozen=True)
class Scene:
    background: str
    shape: str
    shape_colour: str
    shape_box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels
    digit: int
    digit_cell: tuple[int, int]  # (row, col) of the top-left patch of the 2 x 2 box
    dot_colour: str
    dot_cells: tuple[tuple[int, int], ...]
    box_patches: int = 2  # the benchmark's sizes; training curricula may start larger
    dot_patches: int = 1  # each dot sits in a dot_patches x dot_patches block, radius 7 * dot_patches - 3

    def answer(self, kind: str) -> str:
        return {
            "background": self.background,
            "shape": self.shape,
            "red": "yes" if self.shape_colour == "red" else "no",
            "shape_colour": self.shape_colour,
            "digit": str(self.digit),
            "dot_colour": self.dot_colour,
            "dot_count": COUNT_WORDS[len(self.dot_cells) - 1],
        }[kind]


@dataclass(frozen=True)
class Sample:
    split: str
    index: int
    scene: Scene
    kind: str  # a key of KINDS
    prompt: tuple[str, ...]  # words, with IMAGE_TOKEN repeated GRID*GRID times
    answer: str

    @property
    def coarse(self) -> bool:
        return KINDS[self.kind] == "coarse"


def _rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split '{split}'; use one of {', '.join(SPLIT_SEEDS)}")
    return np.random.default_rng([SPLIT_SEEDS[split], index])


def make_scene(rng: np.random.Generator, box_patches: int = 2, dot_patches: int = 1,
               shape_sides: tuple[int, int] = (112, 169)) -> Scene:
    background = BIG_COLOURS[rng.integers(len(BIG_COLOURS))]
    # Red big shapes half the time (when the background allows), so "is there a red object" is balanced.
    others = [c for c in BIG_COLOURS if c != background]
    if background != "red" and rng.random() < 0.5:
        shape_colour = "red"
    else:
        others_nr = [c for c in others if c != "red"]
        shape_colour = others_nr[rng.integers(len(others_nr))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    side = int(rng.integers(*shape_sides))
    x0, y0 = (int(v) for v in rng.integers(0, SIZE - side, size=2))
    box = (x0, y0, x0 + side, y0 + side)
    # Small things sit in cells clear of the big shape's bounding box (so they are never hidden).
    free = [(r, c) for r in range(GRID) for c in range(GRID)
            if (c + 1) * PATCH <= x0 or c * PATCH >= x0 + side or (r + 1) * PATCH <= y0 or r * PATCH >= y0 + side]
    free_set = set(free)
    k = box_patches
    corners = [(r, c) for r, c in free
               if {(r + i, c + j) for i in range(k) for j in range(k)} <= free_set]
    br, bc = corners[int(rng.integers(len(corners)))]
    taken = {(br + i, bc + j) for i in range(k) for j in range(k)}
    rest = [cell for cell in free if cell not in taken]
    n_dots = int(rng.integers(1, 5))
    if dot_patches == 1:
        dots = tuple(rest[int(i)] for i in rng.choice(len(rest), size=n_dots, replace=False))
    else:  # curriculum only: non-overlapping d x d blocks
        d, placed, used = dot_patches, [], set(taken)
        for i in rng.permutation(len(rest)):
            r, c = rest[int(i)]
            block = {(r + a, c + b) for a in range(d) for b in range(d)}
            if block <= free_set and not block & used:
                placed.append((r, c))
                used |= block
                if len(placed) == n_dots:
                    break
        dots = tuple(placed)
    return Scene(background, shape, shape_colour, box, int(rng.integers(10)), (br, bc),
                 DOT_COLOURS[rng.integers(len(DOT_COLOURS))], dots, box_patches, dot_patches)


# Seven-segment digits: segments a..g (top, top-right, bottom-right, bottom, bottom-left, top-left, middle).
_SEGMENTS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg")


def segment_rects(row: int, col: int, box_patches: int = 2) -> dict[str, tuple[int, int, int, int]]:
    """Pixel rectangles (x0, y0, x1, y1) of the seven segments in the box whose top-left patch is (row, col):
    for the benchmark's 2 x 2-patch box, a 14 x 22 glyph with 3-pixel strokes, inset (7, 3); other box
    sizes scale it."""
    k = box_patches
    x, y = col * PATCH, row * PATCH
    gx, gy, w, h, t = x + 7 * k // 2, y + 3 * k // 2, 7 * k, 11 * k, 3 * k // 2
    half = h // 2
    return {
        "a": (gx, gy, gx + w, gy + t), "d": (gx, gy + h - t, gx + w, gy + h),
        "g": (gx, gy + half - 1, gx + w, gy + half + 2),
        "f": (gx, gy, gx + t, gy + half), "b": (gx + w - t, gy, gx + w, gy + half),
        "e": (gx, gy + half, gx + t, gy + h), "c": (gx + w - t, gy + half, gx + w, gy + h),
    }


def _draw_digit(img: np.ndarray, row: int, col: int, digit: int, box_patches: int = 2) -> None:
    y, x, size = row * PATCH, col * PATCH, box_patches * PATCH
    img[y:y + size, x:x + size] = RGB["white"]
    rects = segment_rects(row, col, box_patches)
    for s in _SEGMENTS[digit]:
        a0, b0, a1, b1 = rects[s]
        img[b0:b1, a0:a1] = RGB["black"]


def render(scene: Scene) -> np.ndarray:
    """Scene -> uint8 image [336, 336, 3]."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    img[:] = RGB[scene.background]
    x0, y0, x1, y1 = scene.shape_box
    yy, xx = np.mgrid[y0:y1, x0:x1]
    side = x1 - x0
    if scene.shape == "square":
        mask = np.ones_like(yy, dtype=bool)
    elif scene.shape == "circle":
        c = (side - 1) / 2
        mask = (yy - y0 - c) ** 2 + (xx - x0 - c) ** 2 <= (side / 2) ** 2
    else:  # triangle, apex up
        rel_y = (yy - y0 + 0.5) / side
        mask = np.abs(xx - x0 + 0.5 - side / 2) <= rel_y * side / 2
    img[y0:y1, x0:x1][mask] = RGB[scene.shape_colour]
    _draw_digit(img, *scene.digit_cell, scene.digit, scene.box_patches)
    d = scene.dot_patches
    for r, c in scene.dot_cells:
        cy, cx = r * PATCH + d * PATCH // 2, c * PATCH + d * PATCH // 2
        r = 7 * d - 3
        dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
        m = dy ** 2 + dx ** 2 <= r * r
        img[cy - r:cy + r + 1, cx - r:cx + r + 1][m] = RGB[scene.dot_colour]
    return img


def _words(rng: np.random.Generator, lo: int, hi: int) -> list[str]:
    k = int(rng.integers(lo, hi + 1))
    return [PREFIX_WORDS[int(i)] for i in rng.integers(len(PREFIX_WORDS), size=k)]


def sample(split: str, index: int, box_patches: int = 2, dot_patches: int = 1,
           shape_sides: tuple[int, int] = (112, 169)) -> Sample:
    """The index-th sample of a split; question kinds cycle so every kind is equally frequent. The size
    arguments exist for training curricula; the benchmark is the defaults."""
    rng = _rng(split, index)
    scene = make_scene(rng, box_patches, dot_patches, shape_sides)
    kind = QUESTIONS[index % len(QUESTIONS)][0]
    question = dict((q[0], q[2]) for q in QUESTIONS)[kind]
    prompt = (["<s>", "user", ":"] + _words(rng, 0, 6) + [IMAGE_TOKEN] * (GRID * GRID)
              + _words(rng, 0, 4) + question.split() + ["assistant", ":"])
    return Sample(split, index, scene, kind, tuple(prompt), scene.answer(kind))


def samples(split: str, count: int, start: int = 0) -> list[Sample]:
    return [sample(split, i) for i in range(start, start + count)]


def pixel_values(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> CLIP-normalised float32 [..., 3, H, W] (LLaVA-1.5's preprocessing)."""
    from ..models.llava import CLIP_MEAN, CLIP_STD

    a = images.astype(np.float32) / 255.0
    a = (a - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(np.moveaxis(a, -1, -3))


def encode(words: tuple[str, ...] | list[str], vocab: list[str] | None = None) -> np.ndarray:
    index = {w: i for i, w in enumerate(vocab or vocabulary())}
    return np.array([index[w] for w in words], dtype=np.int64)
