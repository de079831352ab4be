"""Distributions of token counts and service times, sampled by inverse CDF.

Every draw is `quantile(u)` of one uniform number, so a request's attributes do not depend on
how many requests are drawn or at which arrival rate: runs at different rates see the same
request sequence (common random numbers), which keeps capacity searches nearly monotone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from splitllm.errors import UserError

KINDS = ("fixed", "uniform", "choice", "lognormal", "exponential")
BUCKETS_PER_OCTAVE = 8  # planning buckets: a plan is made for at most ~9% more tokens


@dataclass(frozen=True)
class Dist:
    """A distribution: `fixed(value)`, `uniform(low, high)`, `choice(values, weights)`,
    `lognormal(median, sigma, low, high)` or `exponential(mean)`."""

    kind: str
    values: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()
    low: float = 0.0
    high: float = math.inf
    median: float = 0.0
    sigma: float = 0.0
    mean_value: float = 0.0
    integer: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"unknown distribution {self.kind!r}: use one of {', '.join(KINDS)}")

    def quantile(self, u: np.ndarray) -> np.ndarray:
        """Values at uniform draws `u` in [0, 1)."""
        out = _QUANTILES[self.kind](self, np.asarray(u, dtype=float))
        return np.floor(out + 1e-9).astype(np.int64) if self.integer else out.astype(float)

    @property
    def discrete(self) -> bool:
        """True when it takes few values (plans are then cached per exact value)."""
        return self.kind in ("fixed", "choice")

    @property
    def max_value(self) -> float:
        """The largest value it can take (inf for the exponential)."""
        if self.kind in ("fixed", "choice"):
            return max(self.values)
        return math.inf if self.kind == "exponential" else self.high

    def mean(self) -> float:
        """Mean value (numerically, on a fine quantile grid, for the truncated ones)."""
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            w = np.asarray(self.weights)
            return float(np.dot(self.values, w / w.sum()))
        if self.kind == "exponential":
            return self.mean_value
        u = (np.arange(100_000) + 0.5) / 100_000
        return float(self.quantile(u).mean())

    def plan_value(self, value: int) -> int:
        """The value a plan is made for: the exact value if discrete, else a bucket >= it."""
        if self.discrete:
            return value
        return int(min(bucket_up(value), max(self.max_value, value)))


def bucket_up(n: int) -> int:
    """Smallest value >= n on the grid ceil(2 ** (k / BUCKETS_PER_OCTAVE)), k = 0, 1, ..."""
    if n <= 2 * BUCKETS_PER_OCTAVE:
        return n
    # the first k with 2 ** (k / B) > n - 1, i.e. ceil(2 ** (k / B)) >= n
    k = math.floor(BUCKETS_PER_OCTAVE * math.log2(n - 1)) + 1
    return max(n, math.ceil(2.0 ** (k / BUCKETS_PER_OCTAVE)))


def _fixed(d: Dist, u: np.ndarray) -> np.ndarray:
    return np.full(u.shape, d.values[0], dtype=float)


def _uniform(d: Dist, u: np.ndarray) -> np.ndarray:
    if d.integer:  # every integer in [low, high] equally likely
        return np.minimum(d.low + np.floor(u * (d.high - d.low + 1)), d.high)
    return d.low + u * (d.high - d.low)


def _choice(d: Dist, u: np.ndarray) -> np.ndarray:
    cum = np.cumsum(d.weights) / math.fsum(d.weights)
    index = np.minimum(np.searchsorted(cum, u, side="right"), len(d.values) - 1)
    return np.asarray(d.values, dtype=float)[index]


def _lognormal(d: Dist, u: np.ndarray) -> np.ndarray:
    return np.clip(d.median * np.exp(d.sigma * ndtri(np.clip(u, 1e-12, 1 - 1e-12))),
                   d.low, d.high)


def _exponential(d: Dist, u: np.ndarray) -> np.ndarray:
    return -d.mean_value * np.log1p(-u)


_QUANTILES = {
    "fixed": _fixed,
    "uniform": _uniform,
    "choice": _choice,
    "lognormal": _lognormal,
    "exponential": _exponential,
}
