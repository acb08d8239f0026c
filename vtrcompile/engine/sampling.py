"""How `Engine.generate` chooses each token from the logits the engines return: greedy, or sampled.

Sampling follows Hugging Face's order: the logits are divided by the temperature, then cut to the top_k
largest, then to the nucleus (the fewest most likely tokens whose probability, renormalised over what top_k
left, reaches top_p; the token that crosses top_p is kept), and one token is drawn from what is left,
renormalised. Nothing here runs in the engines: the decode step is the same whatever chooses its input.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import VtrError

# the nucleus is searched among this many most likely tokens first, then 4x more, so a peaked distribution
# never sorts the whole vocabulary
NUCLEUS_FIRST_TRY = 64


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax; ties: the lower id); top_k 0 and top_p 1 keep every token."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise VtrError(f"temperature {t!r}: give a number >= 0 (0 is greedy)")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise VtrError(f"top_k {k!r}: give an integer >= 0 (0 keeps every token)")
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise VtrError(f"top_p {p!r}: give a number in (0, 1] (1 keeps every token)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or self.seed < 0):
            raise VtrError(f"seed {self.seed!r}: give an integer >= 0")
        if t == 0 and (k != 0 or p != 1):
            raise VtrError("top_k and top_p shape sampling: give a temperature above 0 as well (0 is greedy)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


GREEDY = Sampling()


def choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator | None = None) -> np.ndarray:
    """logits [B, vocab] -> one token id per row, int64 [B]."""
    if sampling.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    rng = rng if rng is not None else sampling.rng()
    return np.array([_draw(row, sampling, rng) for row in logits], dtype=np.int64)


def kept_tokens(row: np.ndarray, sampling: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """The tokens one row may draw after temperature, top_k and top_p, and their probabilities renormalised over
    them (most likely first where top_p cuts; in no particular order otherwise, which needs no sort)."""
    # float32 throughout: float64 copies of a 32k-token row cost more in fresh pages than the arithmetic. The max
    # is taken off first, so a tiny temperature sends the others to -inf (weight 0), never inf - inf.
    z = row.astype(np.float32)
    z = (z - z.max()) / np.float32(sampling.temperature)
    vocab = z.shape[0]
    k = sampling.top_k if 0 < sampling.top_k < vocab else vocab
    ids = np.argpartition(-z, k - 1)[:k] if k < vocab else np.arange(vocab)
    weights = np.exp(z[ids])
    if sampling.top_p == 1:
        return ids, weights / weights.sum()
    total = weights.sum(dtype=np.float64)  # the normaliser of what top_k left
    n = min(k, NUCLEUS_FIRST_TRY)
    while True:  # the n most likely of the k, most likely first, until they hold top_p
        first = np.argpartition(-weights, n - 1)[:n] if n < k else np.arange(k)
        first = first[np.argsort(-weights[first], kind="stable")]
        mass = np.cumsum(weights[first], dtype=np.float64) / total
        if n == k or mass[-1] >= sampling.top_p:
            break
        n = min(k, 4 * n)
    last = int(np.searchsorted(mass, sampling.top_p))  # the first index whose cumulative mass reaches top_p
    first = first[:last + 1]
    return ids[first], weights[first] / weights[first].sum()


def _draw(row: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    ids, probs = kept_tokens(row, sampling)
    cdf = np.cumsum(probs)
    return int(ids[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(ids) - 1)])
