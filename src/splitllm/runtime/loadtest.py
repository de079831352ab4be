"""`splitllm loadtest`, the arithmetic: what one probe measured, the load the server reports,
and the goodput-capacity search, all independent of how a probe is run.

A probe runs one policy at one arrival rate (for real: `loadtest_run.RealRunner`; in tests, a
fake runner on a fake clock) and returns the requests' outcomes as the simulator's `RunRecord`,
so throughput, goodput, SLA attainment and the TTFT / TPOT percentiles are computed by
`sim.metrics.summarize`, the same arithmetic as the simulated prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from splitllm.runtime.loadtest_world import Probed, as_probed, speed_factors
from splitllm.runtime.metrics import bucket_counts
from splitllm.sim.capacity import Bracket, find_capacity, first_guess_rate, run_point
from splitllm.sim.capacity import Capacity as SimCapacity
from splitllm.sim.load import steered_headroom
from splitllm.sim.metrics import RunMetrics
from splitllm.sim.policies import Load
from splitllm.sim.run import RunRecord
from splitllm.sim.workload import Workload
from splitllm.sim.world import World
from splitllm.stepmodel import QUEUE_WAIT_BOUNDS_S, wait_quantile_s

QUEUE_WAIT = "splitllm_engine_queue_wait_seconds"
STEP_ROWS = "splitllm_engine_step_rows"
BUSY = "splitllm_server_busy_seconds_total"
PROCESS_CPU = "process_cpu_seconds_total"
RATE_RANGE = 1024.0  # the search stays within 1/1024 to 1024 times its first rate
NOISE_Z = 1.0  # a probe's attainment within this many binomial standard errors of the target
REPEATS = 3  # is undecided: its rate is probed again, up to this many probes, judged pooled
POLL_S = 0.25  # a probe's watcher: load-aware policies' reads of /metrics, the early-stop check
FOREIGN_CORES = 0.25  # other work beyond this many cores of the machine during a probe (the
# machine's CPU less the load test's own processes') disturbed it: a disturbed probe that did
# not pass is run again, up to DISTURBED_REPEATS times at its rate (a pass counts: other work
# only slows a probe)
DISTURBED_REPEATS = 2


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What happened to one request, in seconds after its scheduled arrival (nan: never)."""

    first_token_s: float
    finished_s: float
    server_cpu_s: float  # the compute CPU seconds the server reported for it
    placement: str
    planned: bool
    server_wall_s: float = math.nan  # the wall seconds of the server's steps that were its
    server_visits: int = 0  # its forwards at the server (`Generation.round_trips`)
    started_late_s: float = math.nan  # how late a worker thread of the EMULATED clients'
    # process took it (their process lagging: not the server's doing, not simulated)


@dataclass(frozen=True, kw_only=True)
class Probe:
    """One policy at one arrival rate: its metrics and the server's process CPU per request."""

    metrics: RunMetrics
    process_cpu_s_per_request: float  # whole server process (nan: not measured)
    wall_s: float
    stopped_early: bool = False  # given up once too many requests had missed their SLA
    cut_off: bool = False  # ended by the time budget with requests not yet done: inconclusive
    server_job_s: float = math.nan  # the server's CPU per forward outside its steps (nan: none)
    client_cores_busy: float = math.nan  # the EMULATED clients' process: CPU s per wall s
    server_wall_s_per_request: float = math.nan  # the server's steps' wall seconds a finished
    # request (its share of each step: what the step model's units, in wall seconds, price)
    server_visits_per_request: float = math.nan  # the forwards a finished request sent it
    foreign_cores: float = math.nan  # cores other work on the machine took (nan: not known)
    started_late_p90_s: float = math.nan  # the requests' `Outcome.started_late_s`, p90
    repeated: bool = False  # disturbed and run again: it counts for nothing
    placements: tuple[str, ...] = ()  # the sides each request it released ran with, in order

    @property
    def rate_per_s(self) -> float:
        return self.metrics.rate_per_s

    @property
    def disturbed(self) -> bool:
        """Whether other work on the machine took more than `FOREIGN_CORES` during it."""
        return self.foreign_cores > FOREIGN_CORES

    @property
    def server_s_per_request(self) -> float:
        """The server's seconds a finished request as the simulator charges them: its share of
        the steps' wall seconds and, per forward, the server's CPU outside its steps (the
        world's step model holds both: its `job_s` is the steps' fixed part a visit plus that
        CPU, `loadtest_command.calibrated`). The steps' share alone read 4-6% under it."""
        outside_s = self.server_job_s * self.server_visits_per_request
        return self.server_wall_s_per_request + (outside_s if outside_s == outside_s else 0.0)


def noise_band(requests: int, target: float) -> float:
    """How far chance alone moves an attainment measured on `requests` requests at the target
    (NOISE_Z binomial standard errors): a verdict within it is undecided. Measured: the same
    probe repeated 4 times at a split's capacity (49 requests) read 88-96%."""
    return NOISE_Z * math.sqrt(target * (1 - target) / max(requests, 1))


def certainly_failed(misses: float, requests: int, target: float) -> bool:
    """Whether `misses` of `requests` put a probe's attainment below the target by more than
    chance (`noise_band`): a probe may stop early then; one nearer runs to its end."""
    return misses > (1 - target + noise_band(requests, target)) * requests


def pooled_attainment(probes: Sequence[Probe]) -> tuple[float, int]:
    """The attainment of several probes' requests together, and how many requests."""
    requests = sum(p.metrics.requests for p in probes)
    met = sum(p.metrics.sla_attainment * p.metrics.requests for p in probes)
    return (met / requests if requests else 0.0), requests


def probe_line(policy: str, result: Probe) -> str:
    """One line on a probe: its attainment, how it ended, TTFT p99, the server's and the
    clients' load, its seconds."""
    m = result.metrics
    how = (", cut off by --max-minutes" if result.cut_off else
           ", stopped early" if result.stopped_early else "")
    if result.disturbed:
        how += f", other work on this machine took {result.foreign_cores:.2f} cores"
    return (f"{policy} at {result.rate_per_s:.3g} req/s: {m.sla_attainment:.0%} within SLA "
            f"({m.completed}/{m.requests} done{how}), TTFT p99 {m.ttft_s[2]:.3g} s, "
            f"server busy {m.utilization:.0%}, clients {result.client_cores_busy:.2f} "
            f"cores (requests started {result.started_late_p90_s * 1e3:.0f} ms late at "
            f"p90), {result.wall_s:.0f} s")


def run_record(policy: str, rate_per_s: float, load: Workload, outcomes: Sequence[Outcome],
               *, horizon_s: float, busy_s: float, queue_wait_mean_s: float,
               busy_total_s: float | None = None) -> RunRecord:
    """The outcomes of a real probe as the simulator's record of a run (window [0, horizon)):
    `busy_s` the server's busy seconds within the window, `busy_total_s` over the whole probe
    (default: the same)."""
    placements: dict[str, int] = {}
    index = [placements.setdefault(o.placement, len(placements)) for o in outcomes]
    arrived = np.asarray(load.arrived_at_s, dtype=float)
    return RunRecord(
        policy=policy, rate_per_s=rate_per_s, window_s=(0.0, horizon_s), arrived_at_s=arrived,
        first_token_at_s=arrived + np.array([o.first_token_s for o in outcomes], dtype=float),
        finished_at_s=arrived + np.array([o.finished_s for o in outcomes], dtype=float),
        server_work_s=np.array([o.server_cpu_s for o in outcomes], dtype=float),
        type_index=load.type_index, class_index=load.class_index,
        prompt_tokens=load.prompt_tokens, output_tokens=load.output_tokens,
        placement_index=np.array(index, dtype=np.int64), placements=tuple(placements),
        planned=np.array([o.planned for o in outcomes], dtype=bool),
        busy_window_s=busy_s, busy_total_s=busy_s if busy_total_s is None else busy_total_s,
        job_delay_mean_s=queue_wait_mean_s,
        events=len(outcomes))


def counter_delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    """How much a counter of /metrics grew (0 if the server does not report it)."""
    return after.get(name, 0.0) - before.get(name, 0.0)


def server_job_s(before: dict[str, float], after: dict[str, float]) -> float:
    """The server's CPU seconds per forward outside its engine steps, between two /metrics
    pages: the whole process's CPU less the steps', over the forwards served (framing,
    decoding, sampling, hand-offs, and each request's session opening and closing)."""
    forwards = counter_delta(after, before, "splitllm_forwards_total")
    if forwards < 1:
        return 0.0
    outside = (counter_delta(after, before, "process_cpu_seconds_total")
               - counter_delta(after, before, "splitllm_server_cpu_seconds_total"))
    return max(outside / forwards, 0.0)


class ServerLoad:
    """The load the server reports, as load-aware policies read it, from successive /metrics
    pages decayed over `tau_s` as the simulator's meter (`sim.load.LoadMeter`) decays it: the
    mean and the `quantile` of the queue waits per forward (its histogram is on the meter's
    grid), both shrinking while no forward is served, the busy share and the rows per engine
    step; and the tuned headroom, steered by every request that finishes as the meter steers
    it (toward `target` of requests within their limits)."""

    def __init__(self, *, tau_s: float, quantile: float, headroom: float, target: float) -> None:
        self.tau_s = tau_s
        self.quantile = quantile
        self.headroom = headroom
        self.tuned_headroom = headroom
        self.target = target
        self.last: tuple[float, dict[str, float]] | None = None
        self.wait_sum_s = 0.0
        self.waits = 0.0
        self.wait_counts: list[float] | None = [0.0] * (len(QUEUE_WAIT_BOUNDS_S) + 1)
        self.last_wait_s = 0.0  # when the last page showed forwards served
        self.busy_share = 0.0
        self.rows_sum = 0.0  # forwards in the recent steps (decayed)...
        self.steps = 0.0  # ... and those steps

    def update(self, now_s: float, metrics: dict[str, float]) -> None:
        """Take one /metrics page read at `now_s`."""
        if self.last is not None:
            then_s, before = self.last
            dt = max(now_s - then_s, 1e-9)
            keep = math.exp(-dt / self.tau_s)

            def decayed(total: float, name: str) -> float:
                return keep * total + counter_delta(metrics, before, name)

            if counter_delta(metrics, before, QUEUE_WAIT + "_count") > 0:
                self.last_wait_s = now_s
            self.wait_sum_s = decayed(self.wait_sum_s, QUEUE_WAIT + "_sum")
            self.waits = decayed(self.waits, QUEUE_WAIT + "_count")
            self.wait_counts = _decayed_counts(self.wait_counts, keep, before, metrics)
            self.rows_sum = decayed(self.rows_sum, STEP_ROWS + "_sum")
            self.steps = decayed(self.steps, STEP_ROWS + "_count")
            busy = counter_delta(metrics, before, BUSY) / dt
            self.busy_share = keep * self.busy_share + (1 - keep) * busy
        self.last = (now_s, metrics)

    def request_done(self, met: bool) -> None:
        """One request finished, within its limits or not: steer the tuned headroom."""
        self.tuned_headroom = steered_headroom(self.tuned_headroom, met, self.target)

    def load(self) -> Load:
        """What a request arriving now (at the last page) sees."""
        if self.waits > 1e-9 and self.last is not None:
            idle = math.exp(-max(self.last[0] - self.last_wait_s, 0.0) / self.tau_s)
            mean_s = idle * self.wait_sum_s / self.waits
            # a server without the histogram's buckets: its mean stands for the quantile
            quantile_s = (mean_s if self.wait_counts is None else
                          idle * wait_quantile_s(self.wait_counts, self.quantile))
        else:
            mean_s = quantile_s = 0.0
        # the rows per step a batched server's work is priced at, as the simulator's meter
        # reads them (1 before any step)
        rows = max(self.rows_sum / self.steps, 1.0) if self.steps > 1e-9 else 1.0
        return Load(wait_mean_s=mean_s, wait_quantile_s=quantile_s,
                    utilization=min(self.busy_share, 1.0), batch_rows=rows,
                    headroom=self.headroom, tuned_headroom=self.tuned_headroom)


def _decayed_counts(counts: list[float] | None, keep: float, before: dict[str, float],
                    after: dict[str, float]) -> list[float] | None:
    """The queue waits' decayed counts per bucket, with those served between two pages."""
    was = bucket_counts(before, QUEUE_WAIT, QUEUE_WAIT_BOUNDS_S)
    now = bucket_counts(after, QUEUE_WAIT, QUEUE_WAIT_BOUNDS_S)
    if counts is None or was is None or now is None:
        return None
    return [keep * c + n - w for c, w, n in zip(counts, was, now, strict=True)]


@dataclass(frozen=True)
class Capacity:
    """The highest rate probed with enough requests in SLA, the lowest that failed above it,
    and every probe made."""

    policy: str
    rate_per_s: float  # 0: no rate probed was good enough
    lowest_failed_per_s: float  # inf: no probe failed
    probes: tuple[Probe, ...]
    cut_short: bool  # the time budget ended the search before its bracket was narrow enough
    attainment: float = math.nan  # at `rate_per_s`, its probes pooled (nan: none was good)
    failed_attainment: float = math.nan  # at `lowest_failed_per_s`, pooled (nan: none failed)
    target: float = 0.9  # the attainment searched for

    @property
    def bracket(self) -> Bracket:
        """The search's last bracket."""
        return Bracket(self.rate_per_s, self.attainment, self.lowest_failed_per_s,
                       self.failed_attainment)

    @property
    def crossing_per_s(self) -> float:
        """The capacity interpolated within the last bracket (`Bracket.crossing_per_s`): the
        estimator the simulated searches report too."""
        return self.bracket.crossing_per_s(self.target)


Prober = Callable[[float, float], Probe]  # (rate per s, seconds left) -> the probe
# A capacity search: yields each rate to probe and is sent its probe (None: no time was left
# for it), returns the capacity
Search = Generator[float, Probe | None, "Capacity"]


def capacity_search(policy: str, *, first_rate_per_s: float, target: float, rel_tol: float
                    ) -> Search:
    """Double or halve from the first rate until a good and a failing rate bracket the
    capacity, then bisect (geometrically) until the bracket is within `rel_tol`. A rate whose
    attainment is within the noise of its requests (`noise_band`) is probed again, up to
    `REPEATS` probes, and judged on their requests pooled; a disturbed probe that did not pass
    is run again, up to `DISTURBED_REPEATS` times a rate, and kept as `repeated`. A probe cut
    off by the time budget, or none sent (no time left), counts for nothing and ends the
    search, cut short."""
    probes: list[Probe] = []
    good, bad, good_attainment, bad_attainment = 0.0, math.inf, math.nan, math.nan

    def found(cut_short: bool) -> Capacity:
        return Capacity(policy, good, bad, tuple(probes), cut_short, good_attainment,
                        bad_attainment, target)

    def next_rate() -> float | None:
        if not probes:
            return first_rate_per_s
        if math.isinf(bad):
            return 2 * good if 2 * good <= first_rate_per_s * RATE_RANGE else None
        if good == 0.0:
            return bad / 2 if bad / 2 >= first_rate_per_s / RATE_RANGE else None
        return math.sqrt(good * bad) if bad / good - 1 > rel_tol else None

    rate = next_rate()
    while rate is not None:
        at_rate: list[Probe] = []
        repeats = 0
        while True:  # the rate's probes until its attainment is decided
            result = yield rate
            if result is None:
                return found(cut_short=True)
            if (result.disturbed and not result.cut_off and repeats < DISTURBED_REPEATS
                    and result.metrics.sla_attainment < target):
                repeats += 1
                probes.append(replace(result, repeated=True))
                continue
            probes.append(result)
            at_rate.append(result)
            if result.cut_off:
                return found(cut_short=True)
            attainment, requests = pooled_attainment(at_rate)
            if (result.stopped_early or len(at_rate) >= REPEATS
                    or abs(attainment - target) >= noise_band(requests, target)):
                break
        if attainment >= target and rate > good:
            good, good_attainment = rate, attainment
        elif attainment < target and rate < bad:
            bad, bad_attainment = rate, attainment
        rate = next_rate()
    return found(cut_short=False)


def run_searches(searches: dict[str, Search], probe: Callable[[str, float, float], Probe], *,
                 deadline_s: float, clock: Callable[[], float]) -> dict[str, Capacity]:
    """Drive the policies' searches in turn, one probe each (so every policy's probes span
    the same minutes: the machine's drift, which moves a capacity by more than the policies
    differ, falls on all of them alike) until each has its capacity. No probe starts after
    `deadline_s` on `clock`, and each is told the seconds left."""
    rates = {policy: next(search) for policy, search in searches.items()}
    found: dict[str, Capacity] = {}
    while rates:
        for policy in list(rates):
            left_s = deadline_s - clock()
            result = probe(policy, rates[policy], left_s) if left_s > 0 else None
            try:
                rates[policy] = searches[policy].send(result)
            except StopIteration as done:
                found[policy] = done.value
                del rates[policy]
    return found


def search_capacity(policy: str, probe: Prober, *, first_rate_per_s: float, target: float,
                    rel_tol: float, deadline_s: float, clock: Callable[[], float]) -> Capacity:
    """One policy's `capacity_search` run to its end or to `deadline_s` on `clock`."""
    search = capacity_search(policy, first_rate_per_s=first_rate_per_s, target=target,
                             rel_tol=rel_tol)
    return run_searches({policy: search}, lambda _, rate, left_s: probe(rate, left_s),
                        deadline_s=deadline_s, clock=clock)[policy]


@dataclass(frozen=True)
class PolicyResult:
    """One policy: its measured capacity search and the simulator's prediction beside it. Every
    capacity is the crossing interpolated within its search's last bracket."""

    policy: str
    measured: Capacity
    simulated: SimCapacity  # the prediction: the world as this policy's probes ran it (its
    # server's and clients' speeds, `loadtest_world.speed_factors`), or, where none ran to its
    # end, the start-of-run world
    simulated_start: SimCapacity  # on the start-of-run model (where the measured search began)
    simulated_at_capacity: RunMetrics | None  # `simulated`'s world at the measured capacity
    # the start-of-run world with every client its own device (a real fleet; NaN: the world's
    # clients are that already), and with the clients' cores shared but the server not slowed
    # by them (what each of the two pieces of co-location explains)
    simulated_fleet_per_s: float = math.nan
    simulated_unslowed_per_s: float = math.nan
    server_factor: float = math.nan  # `simulated`'s server: the start's step model x this
    client_factor: float = math.nan  # ... and its clients' CPU x this (nan: not fitted)
    # `simulated`'s world at each measured probe's rate, the same requests: its metrics (one
    # per probe of `measured.probes`; None: repeated, or no time left to simulate it)
    simulated_probes: tuple[RunMetrics | None, ...] = ()

    @property
    def simulated_on_probes(self) -> bool:
        """Whether `simulated` ran at the probes' speeds (else: the start-of-run world)."""
        return not math.isnan(self.server_factor)

    @property
    def measured_per_s(self) -> float:
        """The measured capacity (the crossing within its last bracket)."""
        return self.measured.crossing_per_s

    @property
    def simulated_per_s(self) -> float:
        """The predicted capacity (the crossing within its last bracket)."""
        return self.simulated.crossing_per_s

    @property
    def probes_simulated(self) -> tuple[RunMetrics | None, ...]:
        """The simulated metrics at each probe (None at every one where none ran)."""
        return self.simulated_probes or (None,) * len(self.measured.probes)

    def _compared(self) -> list[tuple[Probe, float]]:
        """Each probe that counts (not repeated, not cut off) with its simulated attainment."""
        return [(p, sim.sla_attainment) for p, sim in zip(self.measured.probes,
                                                           self.probes_simulated, strict=True)
                if not (p.cut_off or p.repeated) and sim is not None]

    def probe_errors(self) -> list[float]:
        """Simulated minus measured attainment at each probe that ran to its end: the
        comparison that holds where the attainment changes slowly with the rate (there a few
        points of attainment move the capacity's crossing by a large share)."""
        return [sim - p.metrics.sla_attainment for p, sim in self._compared()
                if not p.stopped_early]

    def probe_verdicts(self) -> list[tuple[float, bool, bool]]:
        """(rate, measured passed, simulated passed) at each probe: the target met or not,
        where a probe stopped early certainly failed (its attainment counts only what ran)."""
        target = self.measured.target
        return [(p.rate_per_s, p.metrics.sla_attainment >= target and not p.stopped_early,
                 sim >= target) for p, sim in self._compared()]

    @property
    def at_capacity(self) -> Probe | None:
        """The measured probe at the highest good rate (None: no rate was good enough)."""
        good = [p for p in self.measured.probes
                if p.rate_per_s == self.measured.rate_per_s and not p.repeated]
        return good[-1] if good else None


def probed(probes: Sequence[Probe]) -> list[Probed]:
    """What the probes that ran to their end, and count, measured of the machine."""
    return [Probed(rate_per_s=p.rate_per_s, server_s_per_request=p.server_s_per_request,
                   client_cpu_s=p.client_cores_busy * p.wall_s, placements=p.placements)
            for p in probes if not (p.stopped_early or p.cut_off or p.repeated)]


SIMULATED_SHARE = 0.25  # of the study's time: the most the simulated searches on the
# start-of-run world may take (and, after the probes, the predictions at their speeds)


def run_study(world: World, probe: Callable[[str, float, float], Probe], *, budget_s: float,
              clock: Callable[[], float], progress: Callable[[str], None],
              between: Callable[[World], World] | None = None) -> list[PolicyResult]:
    """Per policy of `world`: the simulated capacity on the start-of-run world; then the
    measured ones, searched from them with the policies' probes taken in turn
    (`run_searches`); then each prediction on the machine as the policy's probes ran it
    (`loadtest_world.speed_factors`). Everything ends within `budget_s` on `clock` (probes are
    cut off at it): the simulated searches on the start-of-run world take at most
    `SIMULATED_SHARE` of it, the probes end as long before its end as those took, and each
    prediction after them takes at most its policy's share of `SIMULATED_SHARE` again.
    `between` recalibrates the world after the probes, before those predictions (its time
    counts)."""
    began_s = clock()
    end_s = began_s + budget_s
    simulated_by_s = began_s + SIMULATED_SHARE * budget_s
    starts = {policy: _start_of_run(world, policy, progress,
                                    stop=lambda: clock() >= simulated_by_s)
              for policy in world.policies}
    simulated_s = clock() - began_s  # what the start-of-run predictions took
    searches = {}
    for policy, start in starts.items():
        first = _first_rate(world, start)
        cut = " (its search cut short by --max-minutes)" if start.capacity.cut_short else ""
        progress(f"{policy}: simulated capacity on the start-of-run model "
                 f"{start.capacity.crossing_per_s:.3g} req/s{cut}; measuring from "
                 f"{first:.3g} req/s")
        searches[policy] = capacity_search(policy, first_rate_per_s=first,
                                           target=world.sweep.target_attainment,
                                           rel_tol=world.sweep.rel_tol)

    def measure(policy: str, rate: float, left_s: float) -> Probe:
        result = probe(policy, rate, left_s)
        progress("  " + probe_line(policy, result))
        return result

    measured = run_searches(searches, measure, deadline_s=end_s - simulated_s, clock=clock)
    if between is not None and clock() < end_s:
        world = between(world)
    results = []
    for policy, start in starts.items():
        found = measured[policy]
        progress(f"{policy}: measured capacity {found.crossing_per_s:.3g} req/s (between "
                 f"{found.rate_per_s:.3g} and {found.lowest_failed_per_s:.3g})"
                 f"{' (search cut short by --max-minutes)' if found.cut_short else ''}")
        by_s = min(clock() + SIMULATED_SHARE * budget_s / len(starts), end_s)
        results.append(_predicted(world, start, found, progress, clock=clock, by_s=by_s))
    return results


@dataclass(frozen=True)
class _Start:
    """A policy's predictions on the start-of-run world: its capacity, and (clients on this
    machine) a fleet's and the shared cores' without the server's slowdown."""

    capacity: SimCapacity
    fleet_per_s: float = math.nan
    unslowed_per_s: float = math.nan


def _start_of_run(world: World, policy: str, progress: Callable[[str], None], *,
                  stop: Callable[[], bool]) -> _Start:
    """The policy's simulated searches on the start-of-run world (none starts a probe once
    `stop()` says so)."""
    start = find_capacity(world, policy, stop=stop)
    host = world.client_host
    if host is None:
        return _Start(start)
    fleet = find_capacity(replace(world, client_host=None), policy, stop=stop).crossing_per_s
    unslowed = find_capacity(replace(world, client_host=replace(host, server_slowdown=1.0)),
                             policy, stop=stop).crossing_per_s
    progress(f"{policy}: simulated capacity of a fleet (each client its own device) "
             f"{fleet:.3g} req/s, its clients on this machine's shared cores {unslowed:.3g} "
             f"req/s, and the server slowed while they compute {start.crossing_per_s:.3g} req/s")
    return _Start(start, fleet, unslowed)


def _first_rate(world: World, start: _Start) -> float:
    """Where a policy's measured search starts: its start-of-run capacity (or a guess)."""
    guess = start.capacity.crossing_per_s
    if not 0 < guess < world.sweep.max_rate_per_s:  # no rate the simulator tried failed
        guess = first_guess_rate(world, start.capacity.policy)
    return guess


def _predicted(world: World, start: _Start, measured: Capacity,
               progress: Callable[[str], None], *, clock: Callable[[], float], by_s: float
               ) -> PolicyResult:
    """The policy's result: the prediction at the speeds its probes measured (where any ran
    to its end and there is time before `by_s`), beside what was measured."""
    policy = measured.policy
    seen, simulated, factors = world, start.capacity, (math.nan, math.nan)
    ran = probed(measured.probes)
    if ran and clock() < by_s:
        factors = speed_factors(world, policy, ran)
        seen = as_probed(world, *factors)
        simulated = find_capacity(seen, policy, stop=lambda: clock() >= by_s)
        progress(f"{policy}: under its probes the server took x{factors[0]:.2f} the "
                 f"start-of-run model's seconds per request and the clients x"
                 f"{factors[1]:.2f} its CPU: simulated capacity "
                 f"{simulated.crossing_per_s:.3g} req/s")
    at_rate = (run_point(seen, policy, measured.crossing_per_s)
               if measured.rate_per_s > 0 and clock() < by_s else None)
    on_probes = tuple(run_point(seen, policy, p.rate_per_s)
                      if not p.repeated and clock() < by_s else None
                      for p in measured.probes)
    return PolicyResult(policy, measured, simulated, start.capacity, at_rate, start.fleet_per_s,
                        start.unslowed_per_s, *factors, simulated_probes=on_probes)
