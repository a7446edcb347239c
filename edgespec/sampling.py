"""Sampling: temperature, top-k and top-p warping of a logits row, and drawing from the result.

Greedy (temperature 0) never builds a distribution: it is one ``argmax`` over the row.
Randomness comes per output position (``PositionRng``): the token at position k is drawn from the stream
seeded by (seed, k), so sampled text does not depend on how many numbers earlier steps drew (how deep
the controller drafted, whether a request was preempted).
``probs`` returns the exact warped distribution that ``sample`` draws from, so that speculative
acceptance can compare the target's and the drafter's distributions as they would be sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


_NUCLEUS_CANDIDATES = 4096


def probs(logits: np.ndarray, sp: SamplingParams) -> np.ndarray:
    """The warped next-token distribution (float64, sums to 1) for one logits row."""
    if sp.greedy:
        p = np.zeros(logits.shape[-1])
        p[int(np.argmax(logits))] = 1.0
        return p
    z = logits.astype(np.float64) / sp.temperature
    V = z.shape[-1]
    if 0 < sp.top_k < V:
        kth = np.partition(z, V - sp.top_k)[V - sp.top_k]
        z = np.where(z >= kth, z, -np.inf)
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if sp.top_p < 1.0:
        p = _nucleus(p, sp.top_p)
    return p


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (exact, mostly without a full sort)."""
    V = p.shape[-1]
    k = min(_NUCLEUS_CANDIDATES, V)
    cand = np.argpartition(p, V - k)[V - k:] if k < V else np.arange(V)
    if p[cand].sum() < top_p:  # the nucleus is wider than the candidates: sort everything
        cand = np.arange(V)
    order = cand[np.argsort(-p[cand], kind="stable")]
    cum = np.cumsum(p[order])
    n_keep = int(np.searchsorted(cum, top_p)) + 1
    out = np.zeros_like(p)
    keep = order[:n_keep]
    out[keep] = p[keep]
    return out / out.sum()


def sample(logits: np.ndarray, sp: SamplingParams, rng: np.random.Generator) -> int:
    if sp.greedy:
        return int(np.argmax(logits))
    return sample_from(probs(logits, sp), rng)


def sample_from(p: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token from a distribution (inverse CDF; robust to rounding at the tail)."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


class PositionRng:
    """A random stream per output position, all derived from one seed (a random one when ``seed`` is None)."""

    def __init__(self, seed: int | None):
        self.seed = int(np.random.SeedSequence().entropy % (1 << 63)) if seed is None else int(seed)

    def at(self, pos: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & ((1 << 63) - 1), pos])
