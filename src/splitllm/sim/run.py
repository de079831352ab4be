"""One simulation run: a world, a policy, an arrival rate -> what happened to every request.

Requests arrive (Poisson or a trace), get a placement from the policy (load-aware policies see
what the server measured recently: `sim.load`), then walk it: delays on their own client and
link, jobs on the shared server. Arrivals stop at the horizon; the run goes on for the longest
SLA after it, so every measured request has either finished or certainly missed its SLA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from splitllm.placement import Placement
from splitllm.sim import engine, memo
from splitllm.sim.batching import BatchCost, JobShape
from splitllm.sim.client_host import POLL, SharedCores
from splitllm.sim.engine import Kind, NewEvent
from splitllm.sim.load import LoadMeter, finished_met
from splitllm.sim.policies import PlanPolicy
from splitllm.sim.server import BatchedServer, BusyMeter, make_server
from splitllm.sim.walk import NO_WALK, Walk, WalkBuilder
from splitllm.sim.workload import Workload, sample_workload
from splitllm.sim.world import World
from splitllm.stepmodel import queue_wait_s

ARRIVE, AT_SERVER, CLIENT_POLL = Kind.ARRIVE, Kind.AT_SERVER, Kind.CLIENT_POLL  # plain
# module names in the hot loop
WALK_CACHE_LIMIT = 4096  # a walk of G tokens holds ~2 floats per job: ~G * segments * 50 B


@dataclass(frozen=True)
class RunRecord:
    """Per-request outcomes of one run (arrays over requests in arrival order)."""

    policy: str
    rate_per_s: float
    window_s: tuple[float, float]  # measurement window [warm-up end, horizon)
    arrived_at_s: np.ndarray
    first_token_at_s: np.ndarray  # nan: not reached before the run ended
    finished_at_s: np.ndarray  # nan: not finished before the run ended
    server_work_s: np.ndarray  # server-seconds charged to the request
    type_index: np.ndarray
    class_index: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    placement_index: np.ndarray  # into `placements`
    placements: tuple[str, ...]
    planned: np.ndarray  # False: the policy found no feasible plan and fell back
    busy_window_s: float  # server busy seconds within the window (all workers)
    busy_total_s: float
    job_delay_mean_s: float  # mean queue wait of the server jobs (`stepmodel.queue_wait_s`)
    events: int
    job_log: tuple[tuple[int, int, float, float], ...] = ()  # (r, j, at server, done) if asked
    client_cores_busy_s: float = 0.0  # core-seconds the shared client cores computed (if any)


class _Run:
    """The state and event handlers of one run."""

    def __init__(self, world: World, policy: str, workload: Workload, log: bool,
                 replayed: Sequence[str] | None = None) -> None:
        self.world = world
        self.policy = PlanPolicy(world, policy)
        self.replayed = replayed
        self.builder = WalkBuilder(world)
        n = len(workload)
        self.arrivals = workload.arrived_at_s.tolist()
        self.types, self.classes = workload.type_index.tolist(), workload.class_index.tolist()
        self.prompts = workload.prompt_tokens.tolist()
        self.outputs = workload.output_tokens.tolist()
        self.services = workload.service_s.tolist()
        self.walks = [NO_WALK] * n  # of requests with server jobs still to do
        self.at_server = [0.0] * n
        self.first_token = [math.nan] * n
        self.finished = [math.nan] * n
        self.work = [0.0] * n
        self.placement = [0] * n
        self.planned = [True] * n
        self.placements: dict[str, int] = {}
        self.walk_cache: dict[tuple[int, int, int, int, str, float], Walk] = memo.table(
            "walks", memo.planning_key(world))
        self.delay_sum, self.delay_n = 0.0, 0
        self.meter = LoadMeter(world) if self.policy.sees_load else None
        self.log: list[tuple[int, int, float, float]] | None = [] if log else None
        self.busy = BusyMeter(world.warmup_s, world.horizon_s)
        batched = world.server.scheduler == "batched"
        cost = BatchCost(world, world.server.step_model) if batched else None
        host = world.client_host
        self.cores = None if host is None else SharedCores(host.cores, self._computed)
        self.gap_started_s = [0.0] * n  # when the request's current gap began (shared cores)
        self.unfinished = n
        self.polling = (self.cores is not None and host is not None and host.polls
                        and self.policy.sees_load)
        slowed = host is not None and host.server_slowdown != 1.0
        self.server = make_server(world.server, self._done, self.busy, self._shape, cost,
                                  self._server_slowdown if slowed else None)

    def _server_slowdown(self) -> float:
        """A server step's time factor now: the shared client cores' share busy."""
        assert self.world.client_host is not None and self.cores is not None
        return self.world.client_host.server_factor(self.cores.busy_fraction())

    def _walk(self, now_s: float, r: int) -> Walk:
        t, c, p, g = self.types[r], self.classes[r], self.prompts[r], self.outputs[r]
        if self.replayed is not None:
            placement = Placement(self.replayed[r])
        else:
            load = self.meter.load(now_s) if self.meter is not None else None
            decision = self.policy.decide(t, c, p, g, load)
            placement, self.planned[r] = decision.placement, decision.planned
        sides = placement.sides
        self.placement[r] = self.placements.setdefault(sides, len(self.placements))
        key = (t, c, p, g, sides, self.services[r])
        walk = self.walk_cache.get(key)
        if walk is None:
            walk = self.builder.walk(t, c, p, g, placement, self.services[r])
            memo.bounded_put(self.walk_cache, key, walk, WALK_CACHE_LIMIT)
        return walk

    def _arrive(self, now_s: float, r: int, _: int) -> list[NewEvent]:
        out: list[NewEvent] = []
        if r + 1 < len(self.arrivals):  # one pending arrival keeps the heap small
            out.append((self.arrivals[r + 1], ARRIVE, r + 1, 0))
        walk = self.walks[r] = self._walk(now_s, r)
        if not walk.jobs:  # runs entirely on its client
            self.first_token[r] = now_s + walk.first_token_tail_s
        nxt = self._gap(now_s, r, 0)
        if nxt is not None:
            out.append(nxt)
        return out

    def _gap(self, now_s: float, r: int, j: int) -> NewEvent | None:
        """Request r's gap j starts: its client compute and crossings, then job j (or, after
        the last job, its end). On shared client cores its real CPU queues there first."""
        walk = self.walks[r]
        host = self.world.client_host
        if self.cores is not None and host is not None:
            units_s = host.cpu_s(self.classes[r], walk.client_s[j], 0)
            if isinstance(self.server, BatchedServer) and self.server.running:
                units_s *= host.server_slowdown  # the server's compute slows theirs alike
            cpu_s = units_s + host.cpu_s(self.classes[r], 0.0, int(j < walk.jobs))
            if cpu_s > 0:
                self.gap_started_s[r] = now_s
                return self.cores.arrive(now_s, r, j, cpu_s, units_s > 0)
        return self._gap_end(now_s + walk.gaps_s[j], r, j)

    def _computed(self, now_s: float, r: int, j: int) -> NewEvent | None:
        """Gap j's CPU is done on the shared cores: its client compute took its device's time
        or, if longer, until now (the client sleeps up to its device's time, never less; a
        visit's transport CPU is in the link's visit cost already). A read of the load: done."""
        if r == POLL:
            return None
        walk, started_s = self.walks[r], self.gap_started_s[r]
        assert self.world.client_host is not None
        visit_cpu_s = self.world.client_host.cpu_per_visit_s if j < walk.jobs else 0.0
        client_s = max(walk.client_s[j], now_s - started_s - visit_cpu_s)
        end_s = started_s + walk.gaps_s[j] - walk.client_s[j] + client_s
        return self._gap_end(max(end_s, now_s), r, j)  # not before its CPU is done

    def _poll(self, now_s: float, _a: int, _b: int) -> list[NewEvent]:
        """The clients' process reads the server's load: its CPU on the shared cores; the next
        read `poll_s` later while requests are yet to finish (the load test's probes read it
        until their last request is done)."""
        host = self.world.client_host
        assert host is not None and self.cores is not None
        read = self.cores.arrive(now_s, POLL, 0, host.cpu_per_poll_s, units=False)
        out = [] if read is None else [read]
        if self.unfinished:
            out.append((now_s + host.poll_s, CLIENT_POLL, 0, 0))
        return out

    def _gap_end(self, at_s: float, r: int, j: int) -> NewEvent | None:
        walk = self.walks[r]
        if j < walk.jobs:
            return (at_s, AT_SERVER, r, j)
        self._finish(r, at_s)
        self.walks[r] = NO_WALK  # done: free its walk
        return None

    def _at_server(self, now_s: float, r: int, j: int) -> list[NewEvent] | None:
        self.at_server[r] = now_s
        return self.server.arrive(now_s, r, j, self.walks[r].service_s[j])

    def _done(self, now_s: float, r: int, j: int, charge: float, rows: int,
              held_s: float | None) -> NewEvent | None:
        walk = self.walks[r]
        service_s = walk.service_s[j]
        self.work[r] += service_s * charge
        # what the real engine reports and load-aware policies read: the wait before the step
        delay_s = queue_wait_s(self.at_server[r], now_s - (service_s if held_s is None
                                                           else held_s))
        self.delay_sum += delay_s
        self.delay_n += 1
        if self.meter is not None:
            self.meter.job_done(now_s, delay_s, service_s * charge, rows)
        if self.log is not None:
            self.log.append((r, j, self.at_server[r], now_s))
        j += 1
        if j == walk.jobs_per_pass:  # the first pass's last job: the first token is on its way
            self.first_token[r] = now_s + walk.first_token_tail_s
        return self._gap(now_s, r, j)

    def _finish(self, r: int, at_s: float) -> None:
        self.finished[r] = at_s
        self.unfinished -= 1
        if self.meter is not None:  # the tuned headroom learns from every finished request
            # (known at its finish time: the feedback reaches later arrivals, never earlier)
            self.meter.request_done(finished_met(
                self.world.types[self.types[r]], self.first_token[r] - self.arrivals[r],
                at_s - self.arrivals[r], int(self.outputs[r])))

    def _shape(self, r: int, j: int) -> JobShape:
        walk = self.walks[r]
        a, b = walk.server_segments[j % walk.jobs_per_pass]
        return (self.types[r], a, b, self.prompts[r], j // walk.jobs_per_pass)

    def run(self) -> int:
        queue = engine.EventQueue()
        if self.arrivals:
            queue.push(self.arrivals[0], ARRIVE, 0, 0)
        if self.polling and self.world.client_host is not None:
            queue.push(self.world.client_host.poll_s, CLIENT_POLL, 0, 0)
        handlers = engine.handler_table({
            ARRIVE: self._arrive, AT_SERVER: self._at_server, Kind.SERVER_WAKE: self.server.wake,
            Kind.CLIENT_WAKE: self.cores.wake if self.cores is not None else _no_cores,
            CLIENT_POLL: self._poll})
        engine.run(queue, handlers, until_s=self.world.horizon_s + self.world.max_sla_s)
        return queue.popped


def _no_cores(_now_s: float, _a: int, _b: int) -> None:
    """No shared client cores in this world: nothing wakes them."""


def run_policy(world: World, policy: str, log: bool = False,
               replayed: Sequence[str] | None = None) -> RunRecord:
    """Run `policy` on `world` at its arrival rate; `log` keeps every server job's times.
    `replayed`: request r takes the placement `replayed[r]` (the sides a real run chose for
    the same workload) instead of the policy's choice, as a planned one."""
    workload = sample_workload(world)
    if replayed is not None and len(replayed) != len(workload):
        raise ValueError(f"{len(replayed)} placements replayed for {len(workload)} requests")
    run = _Run(world, policy, workload, log, replayed)
    events = run.run()
    return RunRecord(
        policy=policy,
        rate_per_s=world.rate_per_s,
        window_s=(world.warmup_s, world.horizon_s),
        arrived_at_s=workload.arrived_at_s,
        first_token_at_s=np.array(run.first_token),
        finished_at_s=np.array(run.finished),
        server_work_s=np.array(run.work),
        type_index=workload.type_index,
        class_index=workload.class_index,
        prompt_tokens=workload.prompt_tokens,
        output_tokens=workload.output_tokens,
        placement_index=np.array(run.placement, dtype=np.int64),
        placements=tuple(run.placements),
        planned=np.array(run.planned, dtype=bool),
        busy_window_s=run.busy.window_s,
        busy_total_s=run.busy.total_s,
        job_delay_mean_s=run.delay_sum / run.delay_n if run.delay_n else 0.0,
        events=events,
        job_log=tuple(run.log or ()),
        client_cores_busy_s=run.cores.busy_s if run.cores is not None else 0.0,
    )
