"""The server's step model refitted from the steps its engine ran, not only timed at start.

A step model timed once when the server starts carries the load of that moment: on this
machine a process reading memory on the other core slowed the start-up steps 1.2-2.7x in wall
and in CPU seconds alike (memory bandwidth is shared; the CPU clock does not see it), and the
server kept that model for its life. The engine times every unit of every step it runs; this
keeps the recent ones, per unit kind (embed, block, head) and token count, and refits the one
step model (`stepmodel.StepModel`) from them:

- a token count with at least `min_samples` recent samples gets its own point: their mean
  (a step's expected seconds, what latency sums and a server's capacity see);
- recent: of a kind's last `window` samples per token count, those of the `horizon_s` before
  the kind's newest sample. Prefill counts are rare: a window of 200 of them spans many
  minutes (a fidelity grid's whole run), and a minute of load at its start stayed in them: the
  later conditions' server-only TTFTs at 128 tokens were predicted 1.15-2.2x what they
  measured. The decode counts, a sample per step, turn over in seconds anyway;
- the start-up curve's other points are kept, scaled by the median ratio of every recent
  sample to the start-up curve at its token count (the machine's speed now against then),
  so a kind's curve keeps its shape where the engine has not run yet;
- `fit_unit` makes the curve non-decreasing (a count's samples weigh by their number);
- the server's seconds per job beyond its units' share (`StepModel.job_s`, per visit): the
  mean of one row's decode steps' seconds outside their units (`job_s`; each at most
  `PAUSE_FACTOR` times their median), measured in every such step, wall and CPU. It is where
  a visit's fixed cost lies: one row's decode through the same 16 blocks of SmolLM2 in 1 to 8
  segments took the same CPU per block in its units (0.69-0.82 ms, whatever the segment's
  length) and 0.12-0.27 ms per step outside them, once each server segment kept its decode
  lane (runtime/lane.py; rebuilt at every visit, 0.36-0.69 ms). An intercept of the steps'
  seconds against their blocks, fitted before, read 0 to 12 ms from run to run: the blocks'
  speed drifts between the moments their counts are timed.

Torch-free: the engine hands over `StepTimes`-like per-unit dicts.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from splitllm.runtime.metrics import Lap
from splitllm.stepmodel import StepModel, UnitFit, fit_unit

WINDOW_STEPS = 200  # recent samples kept per unit kind and token count
HORIZON_S = 120.0  # a kind's samples older than this before its newest one are left out
MIN_SAMPLES = 5  # a token count's own point needs this many samples
# A step's seconds outside its units count at most this many times their median in a visit's
# cost: a lane built anew costs ~4x the median (kept); a rare pause of the engine's thread, a
# one-off, costs hundreds of times it (a quick fidelity run's first 86 steps read 4.4 ms a visit,
# 10x what the full grids' conditions read)
PAUSE_FACTOR = 10.0
KINDS = ("embed", "block", "head")
START_UP, LIVE = "start-up", "live"

Samples = dict[int, list[float]]  # tokens -> seconds of the recent steps
Sample = tuple[float, float, float]  # (when, wall s, cpu s) of a unit kind in a step
Visit = tuple[float, float]  # one row's decode step: its (wall, cpu) seconds outside its units


@dataclass(frozen=True)
class StepModels:
    """The server's step model in wall and in CPU seconds, and what it was fitted on."""

    wall: StepModel
    cpu: StepModel
    source: str  # START_UP: timed when the server started; LIVE: refitted from its steps
    steps: int  # engine steps the live refit saw (0: start-up)
    # the blocks' recent seconds over their start-up seconds (`slowdown`), wall and CPU: the
    # server's unit profile, timed at start too, is announced at this speed
    block_slowdown: tuple[float, float] = (1.0, 1.0)

    def fit_json(self) -> dict[str, Any]:
        """/v1/info's `step_model_fit`: which model the server announces."""
        return {"source": self.source, "steps": self.steps,
                "block_slowdown": list(self.block_slowdown),
                "job_s": [self.wall.job_s, self.cpu.job_s]}


def slowdown(start: UnitFit, samples: Samples) -> float:
    """The median ratio of recent samples to the start-up curve at their token counts (1: as
    at start; none: 1)."""
    ratios = [s / start.seconds(t) for t, seconds in samples.items() for s in seconds
              if start.seconds(t) > 0]
    return statistics.median(ratios) if ratios else 1.0


def refit_unit(start: UnitFit, samples: Samples, min_samples: int = MIN_SAMPLES) -> UnitFit:
    """A unit kind's curve from its recent samples, the start-up curve filling in the token
    counts they do not cover (scaled by `slowdown`)."""
    if not samples:
        return start
    speed = slowdown(start, samples)
    own = {t: seconds for t, seconds in samples.items() if len(seconds) >= min_samples}
    points = [(float(t), s) for t, seconds in own.items() for s in seconds]
    points += [(t, s * speed) for t, s in start.points if t not in {float(k) for k in own}]
    return fit_unit(points)


def job_s(visits: Sequence[Visit], min_samples: int = MIN_SAMPLES) -> tuple[float, float] | None:
    """A visit's (wall, cpu) seconds beyond its units: the mean over one row's decode steps of
    their seconds outside their units (a step's expected seconds, as a token count's point),
    each at most `PAUSE_FACTOR` times their median; None with fewer than `min_samples` of
    them."""
    if len(visits) < min_samples:
        return None
    walls, cpus = zip(*visits, strict=True)
    return capped_mean(walls), capped_mean(cpus)


def capped_mean(seconds: Sequence[float]) -> float:
    """The mean of the seconds, each at most `PAUSE_FACTOR` times their median."""
    cap = PAUSE_FACTOR * statistics.median(seconds)
    return statistics.fmean(min(s, cap) for s in seconds)


def refit(start: StepModel, samples: tuple[Samples, Samples, Samples],
          min_samples: int = MIN_SAMPLES, job_s: float | None = None) -> StepModel:
    """The step model with each kind (embed, block, head) refitted on its samples, and its
    seconds per job (`job_s`; None: the start-up model's)."""
    embed, block, head = (refit_unit(getattr(start, kind), kind_samples, min_samples)
                          for kind, kind_samples in zip(KINDS, samples, strict=True))
    return StepModel(embed, block, head, start.n_blocks,
                     job_s=start.job_s if job_s is None else job_s)


class LiveStepModel:
    """Recent engine steps, per unit kind and token count, and the step models refitted on them
    (thread-safe: the engine thread records, the event loop reads)."""

    def __init__(self, start: StepModels, n_units: int, *, window: int = WINDOW_STEPS,
                 min_samples: int = MIN_SAMPLES, horizon_s: float = HORIZON_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.start = start
        self.n_units = n_units
        self.window = window
        self.min_samples = min_samples
        self.horizon_s = horizon_s
        self._clock = clock
        # [kind] tokens -> recent samples per unit; the token counts are bounded by the
        # engine's token budget per step
        self._samples: tuple[dict[int, deque[Sample]], ...] = ({}, {}, {})
        self._visits: deque[Visit] = deque(maxlen=window)  # one row's decode steps (`_visit`)
        self._steps = 0
        self._lock = threading.Lock()
        self._fitted: StepModels = start

    def _kinds(self, units: range) -> tuple[int, int, int]:
        """How many of `units` are the embedding, blocks and the head."""
        embed, head = int(0 in units), int(self.n_units - 1 in units)
        return embed, len(units) - embed - head, head

    def record(self, laps: Sequence[Lap], cpu: bool, step_s: tuple[float, float] | None = None,
               rows: int = 1) -> None:
        """Take one step's laps (units that ran together, equal shares of a lap's seconds; CPU:
        wall where `cpu` is False): one sample per kind and token count (the mean of its blocks
        in this step); with the whole step's (wall, cpu) seconds and its rows, what a visit
        costs beyond its units."""
        step: tuple[dict[int, list[tuple[float, float]]], ...] = ({}, {}, {})
        for lap in laps:
            n = len(lap.units)
            share = (lap.wall_s / n, (lap.cpu_s if cpu else lap.wall_s) / n)
            for kind, count in enumerate(self._kinds(lap.units)):
                if count:
                    step[kind].setdefault(lap.tokens, []).extend([share] * count)
        visit = self._visit(step, step_s) if rows == 1 else None
        now = self._clock()
        with self._lock:
            self._steps += 1
            for kind, by_tokens in enumerate(step):
                for tokens, seconds in by_tokens.items():
                    recent = self._samples[kind].setdefault(tokens, deque(maxlen=self.window))
                    recent.append((now, statistics.fmean(w for w, _ in seconds),
                                   statistics.fmean(c for _, c in seconds)))
            if visit is not None:
                self._visits.append(visit)

    @staticmethod
    def _visit(step: tuple[dict[int, list[tuple[float, float]]], ...],
               step_s: tuple[float, float] | None) -> Visit | None:
        """A decode step of one row through blocks as a `Visit` (None: another step)."""
        if step_s is None or list(step[1]) != [1]:
            return None
        units = [pair for by_tokens in step for pairs in by_tokens.values() for pair in pairs]
        wall_s, cpu_s = (step_s[i] - sum(pair[i] for pair in units) for i in (0, 1))
        return wall_s, cpu_s

    def _recent(self, kind: dict[int, deque[Sample]]) -> dict[int, list[Sample]]:
        """A kind's samples of the `horizon_s` before its newest one, per token count."""
        newest = max((recent[-1][0] for recent in kind.values()), default=0.0)
        within = {t: [s for s in recent if s[0] >= newest - self.horizon_s]
                  for t, recent in kind.items()}
        return {t: samples for t, samples in within.items() if samples}

    @property
    def steps(self) -> int:
        """Engine steps recorded so far."""
        with self._lock:
            return self._steps

    def models(self) -> StepModels:
        """The step models refitted on the recent steps (the start-up ones before any)."""
        with self._lock:
            steps = self._steps
            if steps == self._fitted.steps or steps == 0:
                return self._fitted
            snapshot = tuple(self._recent(kind) for kind in self._samples)
            visits = list(self._visits)

        def clock(index: int) -> tuple[Samples, Samples, Samples]:
            """Samples on one clock (0: wall, 1: CPU)."""
            return tuple({t: [sample[1 + index] for sample in samples]
                          for t, samples in kind.items()}
                         for kind in snapshot)  # type: ignore[return-value]

        visit = job_s(visits, self.min_samples)
        wall, cpu = clock(0), clock(1)
        fitted = StepModels(refit(self.start.wall, wall, self.min_samples,
                                  None if visit is None else visit[0]),
                            refit(self.start.cpu, cpu, self.min_samples,
                                  None if visit is None else visit[1]), LIVE,
                            steps, (slowdown(self.start.wall.block, wall[1]),
                                    slowdown(self.start.cpu.block, cpu[1])))
        with self._lock:
            if fitted.steps > self._fitted.steps:
                self._fitted = fitted
        return fitted
