"""The one model of a batched server step: seconds per unit as a function of tokens in the step.

The engine measures it at start (runtime/profile.py) and announces it in /v1/info; the planner
and the simulator read the same dataclass. A step reads each unit's weights once whatever the
batch, so a unit's time grows slowly with the tokens in the step: a fixed part (weight reads,
per-call costs) shared by every row, and a per-token part that is not. The growth is not one
line: a step of a few rows runs its linear layers by the matrix-vector kernel (runtime/gemv.py),
flat in rows, and more rows by MKL's GEMM, so a unit's time is the piecewise-linear curve
through the measured points (one line through them put one row 11-13% too high). The head runs
on one position per row, so its "tokens" are the step's rows. Torch-free on purpose.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from scipy.optimize import isotonic_regression

Point = tuple[float, float]  # (tokens in the step, seconds)


@dataclass(frozen=True)
class UnitFit:
    """Seconds of one unit in a step of `tokens` tokens: piecewise linear through `points`
    (tokens ascending; `fit_unit` makes the seconds non-decreasing), never below zero; below
    the first point, its segment extended (one point: flat); beyond the last, the secant from
    it back to the last point at or below half its tokens. The last segment alone is noise
    where two counts lie close: a live refit's 127 and 128 tokens, made equal by `fit_unit` or
    0.19 ms a token apart, priced a block's tokens beyond 128 at nothing or at 4.5x the 0.04
    ms of the curve below, and the load test's simulated capacity 15-53% over and 24% under
    the measured (docs/measurements.md)."""

    points: tuple[Point, ...]

    def __post_init__(self) -> None:
        tokens = [t for t, _ in self.points]
        if not tokens or tokens != sorted(set(tokens)) or any(s < 0 for _, s in self.points):
            raise ValueError(f"a unit's step curve needs points of distinct ascending tokens "
                             f"and seconds >= 0, got {self.points}")

    @classmethod
    def line(cls, fixed_s: float, per_token_s: float) -> UnitFit:
        """fixed_s + per_token_s * tokens."""
        return cls(((0.0, fixed_s), (1.0, fixed_s + per_token_s)))

    def seconds(self, tokens: float) -> float:
        fixed_s, per_token_s = self.line_at(tokens)
        return max(fixed_s + per_token_s * tokens, 0.0)

    def line_at(self, tokens: float) -> tuple[float, float]:
        """(fixed_s, per_token_s) of the segment that holds `tokens` (beyond the last point,
        the secant that extends the curve): the curve's local line, whose fixed part a step's
        rows share and whose per-token part each row pays."""
        if len(self.points) == 1:
            return self.points[0][1], 0.0
        if tokens > self.longest_tokens:
            (t0, s0), (t1, s1) = self._beyond
        else:
            k = max(bisect.bisect_left(self._tokens, tokens) - 1, 0)
            (t0, s0), (t1, s1) = self.points[k], self.points[k + 1]
        slope = (s1 - s0) / (t1 - t0)
        return s0 - slope * t0, slope

    @property
    def longest_tokens(self) -> float:
        """The largest token count the curve was measured at (beyond it, extended)."""
        return self.points[-1][0]

    @cached_property
    def _tokens(self) -> tuple[float, ...]:
        return tuple(t for t, _ in self.points)

    @cached_property
    def _beyond(self) -> tuple[Point, Point]:
        """The two points whose secant extends the curve beyond its last (`line_at`)."""
        last = self.points[-1]
        anchor = [p for p in self.points[:-1] if p[0] <= last[0] / 2] or [self.points[0]]
        return anchor[-1], last

    def to_json(self) -> dict[str, Any]:
        return {"points": [list(point) for point in self.points]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UnitFit:
        """`{"points": [[tokens, seconds], ...]}`, or a line `{"fixed_s", "per_token_s"}`."""
        if "points" in data:
            return cls(tuple((float(t), float(s)) for t, s in data["points"]))
        return cls.line(float(data["fixed_s"]), float(data["per_token_s"]))


@dataclass(frozen=True)
class StepModel:
    """Measured step time of one server: embed, every block alike, head (per row), and the
    server's seconds per job (one session segment's forward) beyond its units' per-token
    curves: a step's fixed cost per visit (runtime/live_steps.py) and, where the load test
    measures it, framing, decoding, sampling, the hand-offs between the event loop and the
    engine. Both show only under traffic, 0 where unmeasured."""

    embed: UnitFit
    block: UnitFit
    head: UnitFit
    n_blocks: int
    job_s: float = 0.0

    def step_s(self, tokens: int, rows: int, blocks: int | None = None) -> float:
        """Seconds of a step of `rows` forwards, `tokens` positions, through embed..head."""
        n = self.n_blocks if blocks is None else blocks
        return (self.embed.seconds(tokens) + n * self.block.seconds(tokens)
                + self.head.seconds(rows) + self.job_s * rows)

    def to_json(self) -> dict[str, Any]:
        return {"n_blocks": self.n_blocks, "job_s": self.job_s,
                **{kind: fit.to_json() for kind, fit in (("embed", self.embed),
                                                         ("block", self.block),
                                                         ("head", self.head))}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepModel:
        return cls(n_blocks=int(data["n_blocks"]), job_s=float(data.get("job_s", 0.0)),
                   **{kind: UnitFit.from_json(data[kind]) for kind in ("embed", "block", "head")})


def fit_unit(samples: Sequence[Point]) -> UnitFit:
    """The curve through measured (tokens, seconds) samples: the mean at each token count, made
    non-decreasing in tokens (isotonic regression: noise must not make more work look cheaper)."""
    tokens = sorted({t for t, _ in samples})
    means = [float(np.mean([s for t, s in samples if t == k])) for k in tokens]
    counts = [sum(1 for t, _ in samples if t == k) for k in tokens]
    fitted = isotonic_regression(means, weights=counts, increasing=True).x
    return UnitFit(tuple((float(t), max(float(s), 0.0)) for t, s in zip(tokens, fitted,
                                                                        strict=True)))


def queue_wait_s(arrived_s: float, step_started_s: float) -> float:
    """A server job's queue wait, the one delay load-aware policies read: from its arrival in
    the engine's queue to the start of the step that runs it (its first, if chunked); not the
    step's own seconds, however many rows share it. The real engine reports it
    (`splitllm_engine_queue_wait_seconds`), the simulated servers meter it."""
    return max(step_started_s - arrived_s, 0.0)


WAIT_FLOOR_S = 1e-4  # below this a queue wait counts as none
WAIT_STEPS_PER_DECADE = 10  # waits are kept and planned on a log grid (steps of ~26%)
WAIT_DECADES = 8  # the grid's span above the floor
_FLOOR_STEP = round(math.log10(WAIT_FLOOR_S) * WAIT_STEPS_PER_DECADE)
# The queue waits' histogram, one for the real engine (/metrics) and the simulators' meter:
# bucket 0 holds the waits up to the floor, bucket i >= 1 those nearest the grid's i-th point
# above it (up to the half-way edge below, the last: everything above)
QUEUE_WAIT_BOUNDS_S = (WAIT_FLOOR_S, *(
    10.0 ** ((_FLOOR_STEP + i + 0.5) / WAIT_STEPS_PER_DECADE)
    for i in range(WAIT_DECADES * WAIT_STEPS_PER_DECADE)))


def queue_wait_bucket(wait_s: float) -> int:
    """The bucket of `QUEUE_WAIT_BOUNDS_S` that holds `wait_s` (as /metrics counts it)."""
    return bisect.bisect_left(QUEUE_WAIT_BOUNDS_S, wait_s)


def wait_grid_s(bucket: int) -> float:
    """The queue wait a bucket of `QUEUE_WAIT_BOUNDS_S` stands for: 0, or its grid point."""
    return 0.0 if bucket == 0 else float(10.0 ** ((_FLOOR_STEP + bucket - 1)
                                                   / WAIT_STEPS_PER_DECADE))


def wait_quantile_s(counts: Sequence[float], quantile: float) -> float:
    """The `quantile` of queue waits counted (or weighted) per bucket of `QUEUE_WAIT_BOUNDS_S`
    (+Inf last): the grid point of the first bucket where the cumulative count reaches it."""
    need = quantile * sum(counts)
    total = 0.0
    for bucket, count in enumerate(counts):
        total += count
        if total >= need:
            return wait_grid_s(bucket)
    return wait_grid_s(len(counts) - 1)


def decode_share_s(model: StepModel, concurrency: int, blocks: int | None = None) -> float:
    """A request's share of server seconds per decode token when `concurrency` rows share steps."""
    c = max(concurrency, 1)
    return model.step_s(c, c, blocks) / c


def marginal_decode_s(model: StepModel, concurrency: int, blocks: int | None = None) -> float:
    """Server seconds one more decoding request adds to each step at `concurrency` requests."""
    c = max(concurrency, 1)
    return model.step_s(c, c, blocks) - (model.step_s(c - 1, c - 1, blocks) if c > 1 else 0.0)


def jobs_step_s(model: StepModel, jobs: Sequence[tuple[int, int, int]]) -> float:
    """Seconds of one step serving jobs (start unit, stop unit, tokens): each unit runs once.

    A unit's time counts once per step, over the tokens of every job whose range holds it
    (the head over one position per job), as the engine walks its units; each job adds the
    server's seconds per job outside the units.
    """
    n_units = model.n_blocks + 2
    tokens_at = [0] * n_units
    rows_at_head = 0
    for start, stop, tokens in jobs:
        for unit in range(start, min(stop, n_units - 1)):
            tokens_at[unit] += tokens
        rows_at_head += int(stop == n_units)
    total = model.embed.seconds(tokens_at[0]) if tokens_at[0] else 0.0
    total += sum(model.block.seconds(t) for t in tokens_at[1:-1] if t)
    total += model.head.seconds(rows_at_head) if rows_at_head else 0.0
    return total + model.job_s * len(jobs)
