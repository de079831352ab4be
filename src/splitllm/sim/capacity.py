"""Goodput capacity: the highest arrival rate at which a policy keeps enough requests in SLA.

Found by bracketing (doubling or halving from a first guess) and then bisection on a log scale
until the bracket is within `rel_tol`. Every probe runs the same request sequence (common
random numbers), only faster or slower, so attainment falls almost monotonically with the rate.
The highest passing rate sits up to one `rel_tol` step below the crossing, wherever the
search's grid happens to fall; `Bracket.crossing_per_s` interpolates within the last bracket,
the one estimator the load test reports for its measured and its simulated searches alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitllm.sim.metrics import RunMetrics, summarize
from splitllm.sim.policies import PlanPolicy
from splitllm.sim.run import run_policy
from splitllm.sim.workload import sample_workload
from splitllm.sim.world import World

MAX_PROBES = 40
MIN_FRACTION = 2.0**-12  # give up when even this fraction of the first guess fails
PLANNING_SAMPLE = 400  # requests whose zero-load server work gives the first guess


@dataclass(frozen=True)
class Bracket:
    """A capacity search's last bracket: the highest rate that met the target and the lowest
    above it that did not, with their attainments (a rate probed again: pooled)."""

    good_per_s: float  # 0: no rate met the target
    good_attainment: float  # nan: none did
    bad_per_s: float  # inf: no rate above it failed
    bad_attainment: float  # nan: none did (or no request came)

    def crossing_per_s(self, target: float) -> float:
        """Where the attainment crosses `target`: interpolated between the bracket's rates,
        geometrically in rate and linearly in attainment (the good rate where nothing failed
        above it; 0 where nothing met the target)."""
        if not (0 < self.good_per_s < self.bad_per_s < math.inf):
            return self.good_per_s
        bad = self.bad_attainment if math.isfinite(self.bad_attainment) else 0.0
        drop = self.good_attainment - bad
        share = min(max((self.good_attainment - target) / drop, 0.0), 1.0) if drop > 0 else 0.0
        return self.good_per_s * (self.bad_per_s / self.good_per_s) ** share

    def to_json(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {"good_req_s": self.good_per_s, "good_attainment": num(self.good_attainment),
                "bad_req_s": num(self.bad_per_s), "bad_attainment": num(self.bad_attainment)}


def bracket_of(points: Iterable[tuple[float, float, int]], target: float) -> Bracket:
    """The bracket of probes given as (rate, attainment, requests): a rate probed more than
    once is judged on its requests pooled."""
    pooled: dict[float, tuple[float, int]] = {}
    for rate, attainment, requests in points:
        met, n = pooled.get(rate, (0.0, 0))
        pooled[rate] = (met + (attainment if math.isfinite(attainment) else 0.0) * requests,
                        n + requests)
    judged = {rate: met / n if n else math.nan for rate, (met, n) in pooled.items()}
    good = max((r for r, a in judged.items() if a >= target), default=0.0)
    bad = min((r for r, a in judged.items() if not a >= target and r > good),
              default=math.inf)
    return Bracket(good, judged.get(good, math.nan), bad, judged.get(bad, math.nan))


@dataclass(frozen=True)
class Capacity:
    """A policy's goodput capacity and every run the search made."""

    policy: str
    rate_per_s: float  # highest rate probed with attainment >= target (0: none; inf: no
    # request of this policy used the server, so no arrival rate saturates it)
    target_attainment: float
    probes: tuple[RunMetrics, ...]
    cut_short: bool = False  # `stop` ended the search before its bracket was narrow enough

    @property
    def bracket(self) -> Bracket:
        """The search's last bracket."""
        return bracket_of(((p.rate_per_s, p.sla_attainment, p.requests) for p in self.probes),
                          self.target_attainment)

    @property
    def crossing_per_s(self) -> float:
        """The capacity interpolated within the last bracket (`Bracket.crossing_per_s`)."""
        if math.isinf(self.rate_per_s):
            return self.rate_per_s
        return self.bracket.crossing_per_s(self.target_attainment)


def run_point(world: World, policy: str, rate_per_s: float) -> RunMetrics:
    """Simulate one policy at one arrival rate and summarize it."""
    at_rate = world.with_rate(rate_per_s)
    return summarize(at_rate, run_policy(at_rate, policy))


def first_guess_rate(world: World, policy: str) -> float:
    """Half the rate the server could sustain if every request cost its zero-load plan's work."""
    load = sample_workload(world)
    policy_plans = PlanPolicy(world, policy)
    works = []
    for r in range(min(len(load), PLANNING_SAMPLE)):
        decision = policy_plans.decide(int(load.type_index[r]), int(load.class_index[r]),
                                  int(load.prompt_tokens[r]), int(load.output_tokens[r]))
        works.append(load.service_s[r] if world.types[load.type_index[r]].model is None
                     else decision.server_work_s)
    mean_work = float(np.mean(works)) if works else 0.0
    rate = 0.5 * world.server.workers / mean_work if mean_work > 0 else 1.0
    return min(rate, world.sweep.max_rate_per_s)


def find_capacity(world: World, policy: str,
                  on_probe: Callable[[RunMetrics], None] | None = None,
                  stop: Callable[[], bool] | None = None) -> Capacity:
    """Bracket, then bisect, the highest rate with SLA attainment >= the target; no probe
    after the first starts once `stop()` says so (a time budget)."""
    sweep = world.sweep
    probes: list[RunMetrics] = []
    stopped = [False]

    def more() -> bool:
        stopped[0] = stopped[0] or (stop is not None and stop())
        return len(probes) < MAX_PROBES and not stopped[0]

    def ok(rate: float) -> bool:
        metrics = run_point(world, policy, rate)
        probes.append(metrics)
        if on_probe is not None:
            on_probe(metrics)
        return metrics.sla_attainment >= sweep.target_attainment

    guess = first_guess_rate(world, policy)
    lo, hi = 0.0, math.inf
    if ok(guess):
        if probes[-1].utilization == 0.0:
            # every request ran on its own client: no arrival rate saturates the server
            return Capacity(policy, math.inf, sweep.target_attainment, tuple(probes))
        lo = guess  # double until a rate fails
        while math.isinf(hi) and lo < sweep.max_rate_per_s and more():
            rate = min(2 * lo, sweep.max_rate_per_s)
            lo, hi = (rate, hi) if ok(rate) else (lo, rate)
    else:  # halve until a rate works
        hi = guess
        while lo == 0.0 and hi > guess * MIN_FRACTION and more():
            rate = hi / 2
            lo, hi = (rate, hi) if ok(rate) else (lo, rate)
    while lo > 0 and math.isfinite(hi) and hi / lo - 1 > sweep.rel_tol and more():
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return Capacity(policy, lo, sweep.target_attainment, tuple(probes), cut_short=stopped[0])
