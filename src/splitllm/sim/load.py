"""The server's recent history as load-aware policies see it: job delays, utilization, headroom.

Every server job that completes reports its delay (its queue wait before the step that runs it,
`stepmodel.queue_wait_s`: what the real engine reports on /metrics) and the server-seconds it
took; every request that finishes reports whether it met its limits. The
meter keeps time-decayed statistics over `wait_tau_s` (weights `exp(-(now - t) / tau)`):
- the mean and the `wait_quantile` quantile of job delays (a histogram on the planning
  grid of delays, in the real engine's buckets: `stepmodel.QUEUE_WAIT_BOUNDS_S`), both
  shrinking by `exp(-idle / tau)` while no job completes, so a burst long gone does not keep
  the server looking busy;
- utilization: decayed busy server-seconds per second;
- batch rows: the decayed mean of the jobs served by each job's step (1 unless batched), the
  concurrency a batched server's marginal cost is priced at;
- the tuned headroom: a stochastic-approximation step per finished request, up after a miss
  and down after a hit, resting where the miss rate is 1 - `headroom_target`.
"""

from __future__ import annotations

import math

from splitllm.sim.policies import Load
from splitllm.sim.world import RequestType, World
from splitllm.stepmodel import QUEUE_WAIT_BOUNDS_S, queue_wait_bucket, wait_quantile_s

RESCALE_AT = 50.0  # weights grow as exp(t / tau); rescale before they overflow
HEADROOM_GAIN = 0.01  # headroom moved per miss (a hit moves it (1 - target) / target as much)
MAX_HEADROOM = 0.8


def met_limits(rtype: RequestType, latency_s: float, ttft_s: float, tpot_s: float) -> bool:
    """True when one request met its type's SLA (and TTFT / TPOT limits where set)."""
    slack = 1 + 1e-9
    return (latency_s <= rtype.sla_s * slack
            and (rtype.ttft_s is None or ttft_s <= rtype.ttft_s * slack)
            and (rtype.tpot_s is None or not tpot_s > rtype.tpot_s * slack))


def finished_met(rtype: RequestType, ttft_s: float, latency_s: float, output_tokens: int) -> bool:
    """Whether a request that finished (times after its arrival) met its type's limits."""
    steps = output_tokens - 1
    tpot_s = (latency_s - ttft_s) / steps if steps > 0 else math.nan
    return met_limits(rtype, latency_s, ttft_s, tpot_s)


def steered_headroom(headroom: float, met: bool, target: float) -> float:
    """The tuned headroom after one finished request: a stochastic-approximation step, up
    after a miss and down after a hit, resting where the miss rate is 1 - `target`."""
    step = HEADROOM_GAIN * ((0.0 if met else 1.0) - (1 - target)) / target
    return min(max(headroom + step, 0.0), MAX_HEADROOM)


class LoadMeter:
    """Time-decayed job delays, utilization and the self-tuned headroom of one run."""

    def __init__(self, world: World) -> None:
        self.tau_s = world.wait_tau_s
        self.quantile = world.wait_quantile
        self.target = world.headroom_target
        self.fixed_headroom = world.plan_headroom
        self.tuned_headroom = world.plan_headroom
        self.origin_s = 0.0  # weights below are scaled by exp((t - origin_s) / tau_s)
        self.histogram = [0.0] * (len(QUEUE_WAIT_BOUNDS_S) + 1)  # the engine's buckets
        self.delay_sum = 0.0
        self.weight = 0.0
        self.busy_s = 0.0
        self.rows_sum = 0.0
        self.last_job_s = 0.0

    def _scale(self, now_s: float) -> float:
        x = (now_s - self.origin_s) / self.tau_s
        if x > RESCALE_AT:
            shrink = math.exp(-x)
            self.histogram = [h * shrink for h in self.histogram]
            self.delay_sum *= shrink
            self.weight *= shrink
            self.busy_s *= shrink
            self.rows_sum *= shrink
            self.origin_s, x = now_s, 0.0
        return math.exp(x)

    def job_done(self, now_s: float, delay_s: float, busy_s: float, rows: int = 1) -> None:
        """One server job completed after `delay_s` of delay, using `busy_s` server-seconds, in
        a step that served `rows` jobs."""
        w = self._scale(now_s)
        self.histogram[queue_wait_bucket(delay_s)] += w
        self.delay_sum += w * delay_s
        self.weight += w
        self.busy_s += w * busy_s
        self.rows_sum += w * rows
        self.last_job_s = now_s

    def request_done(self, met: bool) -> None:
        """One request finished, within its limits or not: steer the tuned headroom."""
        self.tuned_headroom = steered_headroom(self.tuned_headroom, met, self.target)

    def load(self, now_s: float) -> Load:
        """What a request arriving now sees."""
        now_weight = self._scale(now_s)  # may rescale (to 0 after a long idle spell)
        if not self.weight:
            return Load(headroom=self.fixed_headroom, tuned_headroom=self.tuned_headroom)
        idle = math.exp(-max(now_s - self.last_job_s, 0.0) / self.tau_s)
        return Load(
            wait_mean_s=idle * self.delay_sum / self.weight,
            wait_quantile_s=idle * wait_quantile_s(self.histogram, self.quantile),
            utilization=self.busy_s / now_weight / self.tau_s,
            batch_rows=self.rows_sum / self.weight,
            headroom=self.fixed_headroom,
            tuned_headroom=self.tuned_headroom,
        )
