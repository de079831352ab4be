"""The one model of a batched server step: seconds per unit as a function of tokens in the step.

The engine measures it at start (runtime/profile.py) and announces it in /v1/info; the planner
and the simulator read the same dataclass. A step reads each unit's weights once whatever the
batch, so a unit's time is close to `fixed_s + per_token_s * tokens`: the fixed part (weight
reads, per-call costs) is shared by every row of the step, the per-token part is not. The head
runs on one position per row, so its "tokens" are the step's rows. Torch-free on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class UnitFit:
    """Seconds of one unit in a step of `tokens` tokens: fixed_s + per_token_s * tokens."""

    fixed_s: float
    per_token_s: float

    def seconds(self, tokens: int) -> float:
        return self.fixed_s + self.per_token_s * tokens


@dataclass(frozen=True)
class StepModel:
    """Measured step time of one server: embed, every block alike, head (per row)."""

    embed: UnitFit
    block: UnitFit
    head: UnitFit
    n_blocks: int

    def step_s(self, tokens: int, rows: int, blocks: int | None = None) -> float:
        """Seconds of a step of `rows` forwards, `tokens` positions, through embed..head."""
        n = self.n_blocks if blocks is None else blocks
        return self.embed.seconds(tokens) + n * self.block.seconds(tokens) + self.head.seconds(rows)

    def to_json(self) -> dict[str, Any]:
        return {"n_blocks": self.n_blocks,
                **{kind: {"fixed_s": fit.fixed_s, "per_token_s": fit.per_token_s}
                   for kind, fit in (("embed", self.embed), ("block", self.block),
                                     ("head", self.head))}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepModel:
        fits = {kind: UnitFit(float(data[kind]["fixed_s"]), float(data[kind]["per_token_s"]))
                for kind in ("embed", "block", "head")}
        return cls(n_blocks=int(data["n_blocks"]), **fits)


def fit_unit(samples: Sequence[tuple[int, float]]) -> UnitFit:
    """fixed_s + per_token_s * tokens over (tokens, seconds), both >= 0, by least squares of
    relative errors (a decode step of a few tokens matters as much as a long prefill)."""
    tokens = np.array([t for t, _ in samples], dtype=float)
    seconds = np.array([s for _, s in samples], dtype=float)
    if len(set(tokens.tolist())) < 2:
        return UnitFit(float(seconds.mean()), 0.0)
    slope, intercept = np.polyfit(tokens, seconds, 1, w=1.0 / np.maximum(seconds, 1e-9))
    slope = max(float(slope), 0.0)
    return UnitFit(max(float(np.mean(seconds - slope * tokens)), 0.0) if intercept < 0
                   else float(intercept), slope)


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
    (the head over one position per job), as the engine walks its units.
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
    return total + (model.head.seconds(rows_at_head) if rows_at_head else 0.0)
