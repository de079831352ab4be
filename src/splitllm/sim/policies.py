"""Placement policies: one function each, from a request's zero-load instance and the load.

A policy gets the planner's instance of one request (zero load, the full latency limits) and
what the server's recent history says (`Load`, measured by `sim.load.LoadMeter`), and returns a
placement and whether it is a feasible plan. `PlanPolicy` calls it per request and caches its
decisions by request kind, token bucket and the (bucketed) load it reads.

Zero-load policies plan for an idle server against (1 - plan_headroom) x each limit:
`server-only`, `client-only`, `greedy`, `best-single-cut`, `dp-grid`, `exact`. With no
feasible plan they take the fastest placement (the request's best chance; server-only: all on
the server). Load-aware policies add a measured delay to every visit to the server
(`Instance.server_wait_s`); without a plan inside their margin they `rescue` the request:
- `exact-load-aware`: the recent mean job delay, the scenario's fixed headroom;
- `exact-quantile`: a high quantile of recent job delays (the margin), decaying while idle;
- `exact-tuned`: the quantile delay and a headroom that tunes itself toward the target
  attainment;
- `frontier-priced`: the quantile delay and tuned headroom, choosing on the request's latency /
  server-work frontier by least `server work + lambda x latency`, lambda falling with load.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import numpy as np

from splitllm.errors import UserError
from splitllm.placement import CLIENT, SERVER, Placement
from splitllm.planner.instance import REL_TOL, Instance, Request, build_instance, evaluate
from splitllm.planner.solvers import frontier, solve
from splitllm.sim import memo
from splitllm.sim.batching import BatchCost, measured_unit_s
from splitllm.sim.world import ClientClass, RequestType, World
from splitllm.stepmodel import queue_wait_bucket, wait_grid_s

FIXED_PREFIX = "fixed:"  # fixed:CSSSC runs one given placement for every request
LOAD_STEP = 0.05  # utilization is planned in steps of 5%
HEADROOM_STEP = 0.02  # tuned headroom in steps of 2% of the limits
IDLE_LATENCY_PRICE = 4.0  # frontier-priced, idle server: 5% of the SLA is worth 20% of the
# fastest plan's work (1 before 2026-12-02: the real splits spent their SLA from a third of load)
PLAN_CACHE_LIMIT = 100_000
INSTANCE_CACHE_LIMIT = 20_000  # zero-load instances (each ~ units x 10 floats)


@dataclass(frozen=True)
class Load:
    """What the server's recent history says when a request arrives."""

    wait_mean_s: float = 0.0  # mean queue wait per job (`stepmodel.queue_wait_s`), time-decayed
    wait_quantile_s: float = 0.0  # the world's wait_quantile of recent job delays
    utilization: float = 0.0  # recent busy share of the server
    batch_rows: float = 1.0  # jobs per step of a batched server (1: not batched), time-decayed
    headroom: float = 0.0  # the scenario's fixed plan_headroom
    tuned_headroom: float = 0.0  # headroom steered toward the target attainment


Choice = tuple[Placement, bool]  # the placement, and whether it is a feasible plan
PolicyFn = Callable[[Instance, Load], Choice]


def shrink(instance: Instance, headroom: float) -> Instance:
    """The instance with every latency limit (SLA, phase limits) times (1 - headroom)."""
    if headroom <= 0:
        return instance
    keep = 1.0 - headroom
    return replace(instance, sla_s=instance.sla_s * keep, phase_limits=tuple(
        replace(p, limit_s=p.limit_s * keep) for p in instance.phase_limits))


def fallback(instance: Instance, least_work: bool) -> Placement:
    """The fastest placement, or the one with least server work, ignoring the SLA (memory and
    pins respected; phase limits too if they can hold)."""
    plans = frontier(instance) or frontier(replace(instance, phase_limits=()))
    if not plans:
        raise UserError(f"no placement fits the client's {instance.client_mem_limit_bytes:.3g} B "
                        "of memory with the units kept on it")
    return plans[0 if least_work else -1].placement


def _zero_load(solver: str) -> PolicyFn:
    def policy(instance: Instance, load: Load) -> Choice:
        plan = solve(shrink(instance, load.headroom), solver)
        if plan is not None:
            return plan.placement, True
        if solver == "server-only":
            sides = "".join(SERVER if u.server_ok else CLIENT for u in instance.units)
            return Placement(sides), False
        return fallback(instance, least_work=False), False

    policy.__doc__ = f"The planner's `{solver}` solver for an idle server."
    return policy


def rescue(instance: Instance, load: Load) -> Choice:
    """No plan meets the limits with the margin: the fastest placement if it meets them with
    the mean wait at every server visit (the request's best chance: the margin, a high
    quantile of the wait and the headroom, is what a plan keeps in reserve, not what a request
    meets), else the least server work (the request misses anyway; the fastest placement would
    load a busy server further). Judged at the margin's wait instead, `frontier-priced` lost
    2-15 points of attainment on `mixed` at the load test's rates, simulated, and on the real
    server rescued 39-46% of its requests (docs/measurements.md)."""
    loaded = replace(instance, server_wait_s=load.wait_mean_s)
    fastest = evaluate(loaded, fallback(loaded, least_work=False))
    if fastest.feasible:
        return fastest.placement, False
    return fallback(loaded, least_work=True), False


def _exact_under(instance: Instance, load: Load, wait_s: float, headroom: float) -> Choice:
    """Exact with `wait_s` added to every server visit, against the limits less `headroom`."""
    plan = solve(replace(shrink(instance, headroom), server_wait_s=wait_s), "exact")
    if plan is not None:
        return plan.placement, True
    return rescue(instance, load)


def visit_wait_s(load: Load, passes: int) -> float:
    """The delay to plan at every server visit of a request of `passes` forward passes, so
    that the sum over its visits stays within a high quantile of what it will meet.

    On a queueing server (FCFS, PS) every visit of a request meets the same backlog, so its
    delays move together: each visit keeps the whole quantile. On a batched server (its
    steps serve several rows) a visit's delay is the step in progress and its own step's
    share, much the same at every step and independent from one step to the next: the sum of
    n such delays spreads as sqrt(n), so each visit plans the mean plus the quantile's excess
    over it shrunk by sqrt(passes) (a long generation plans near the mean)."""
    if load.batch_rows <= 1.0:
        return load.wait_quantile_s
    excess = max(load.wait_quantile_s - load.wait_mean_s, 0.0)
    return load.wait_mean_s + excess / math.sqrt(max(passes, 1))


def exact_load_aware(instance: Instance, load: Load) -> Choice:
    """Least server work with the recent mean job delay at every visit (fixed headroom)."""
    return _exact_under(instance, load, load.wait_mean_s, load.headroom)


def exact_quantile(instance: Instance, load: Load) -> Choice:
    """Least server work with a high quantile of the recent job delays summed over the
    request's visits (`visit_wait_s`): a margin against their spread, not just their mean
    (fixed headroom)."""
    return _exact_under(instance, load, visit_wait_s(load, instance.passes), load.headroom)


def exact_tuned(instance: Instance, load: Load) -> Choice:
    """Like `exact_quantile`, against a headroom that tunes itself toward the target
    attainment (more reserve after misses, less while requests meet their SLA)."""
    return _exact_under(instance, load, visit_wait_s(load, instance.passes),
                        load.tuned_headroom)


def latency_price(instance: Instance, utilization: float) -> float:
    """Server-seconds one second of latency is worth: `IDLE_LATENCY_PRICE` x the fastest
    plan's work per second of SLA on an idle server, times (1 - utilization) ** 2, falling to
    0 as the server fills up (the marginal cost of server work grows with the load: by
    1 / (1 - rho) ** 2 in an M/M/1 queue). A request spends latency on a saving only where the
    server is busy enough to need it: latency spent at half load leaves the plan no slack for
    the queues that come with more."""
    fastest = frontier(instance)[-1].server_work
    return IDLE_LATENCY_PRICE * max(0.0, 1.0 - utilization) ** 2 * fastest / instance.sla_s


def frontier_priced(instance: Instance, load: Load) -> Choice:
    """Among the plans on the request's latency / server-work frontier that meet the limits
    (quantile delay, tuned headroom), the least `server work + lambda x latency`, lambda from
    `latency_price`: an idle server spends no latency on small savings, a busy one offloads
    everything the SLA allows."""
    wait_s = visit_wait_s(load, instance.passes)
    loaded = replace(shrink(instance, load.tuned_headroom), server_wait_s=wait_s)
    plans = frontier(loaded)
    fits = plans.latency_s <= loaded.sla_s * (1 + REL_TOL)
    if not fits.any():
        return rescue(instance, load)
    cost = plans.server_work + latency_price(instance, load.utilization) * plans.latency_s
    best = int(np.argmin(np.where(fits, cost, math.inf)))
    return plans[best].placement, True


@dataclass(frozen=True)
class Policy:
    """A policy function and the fields of `Load` it reads (the rest do not key its cache)."""

    choose: PolicyFn
    reads: frozenset[str] = frozenset({"headroom"})


# every load-reading policy prices a batched server's work at its current batch (batch_rows)
_QUANTILE = frozenset({"wait_mean_s", "wait_quantile_s", "headroom", "batch_rows"})
_TUNED = frozenset({"wait_mean_s", "wait_quantile_s", "tuned_headroom", "batch_rows"})
POLICIES: dict[str, Policy] = {
    **{name: Policy(_zero_load(name)) for name in
       ("server-only", "client-only", "greedy", "best-single-cut", "dp-grid", "exact")},
    "exact-load-aware": Policy(exact_load_aware,
                               frozenset({"wait_mean_s", "headroom", "batch_rows"})),
    "exact-quantile": Policy(exact_quantile, _QUANTILE),
    "exact-tuned": Policy(exact_tuned, _TUNED),
    "frontier-priced": Policy(frontier_priced, _TUNED | {"utilization"}),
}
LOAD_FIELDS = frozenset(f.name for f in fields(Load))


def check_policy(name: str) -> None:
    """Raise a UserError unless `name` is a policy."""
    if name.startswith(FIXED_PREFIX):
        Placement(name[len(FIXED_PREFIX):].upper())
        return
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}: use one of {', '.join(POLICIES)} "
                        f"or {FIXED_PREFIX}<placement>")


def reads_load(policy: str) -> bool:
    """True when the policy's choice depends on the server's measured load."""
    reads = POLICIES[policy].reads if policy in POLICIES else frozenset()
    return bool(reads - {"headroom"})


def wait_bucket(wait_s: float) -> float:
    """The delay a plan is made for: the grid point of the queue waits' bucket that holds it
    (0 up to `stepmodel.WAIT_FLOOR_S`, else the nearest point of the log grid)."""
    return wait_grid_s(queue_wait_bucket(wait_s))


def _step(value: float, step: float) -> float:
    return round(round(value / step) * step, 6)


def rows_bucket(rows: float) -> float:
    """The batch a plan is priced at: the nearest point of a grid of steps of sqrt(2)."""
    return float(2.0 ** (round(2 * math.log2(max(rows, 1.0))) / 2))


def bucketed(load: Load, reads: frozenset[str]) -> Load:
    """The load a plan is made for: fields the policy does not read at their idle value, the
    rest on grids."""
    idle = Load()
    keep = {name: getattr(load if name in reads else idle, name) for name in LOAD_FIELDS}
    return Load(wait_mean_s=wait_bucket(keep["wait_mean_s"]),
                wait_quantile_s=wait_bucket(keep["wait_quantile_s"]),
                utilization=min(_step(keep["utilization"], LOAD_STEP), 1.0),
                batch_rows=rows_bucket(keep["batch_rows"]),
                headroom=keep["headroom"],
                tuned_headroom=_step(keep["tuned_headroom"], HEADROOM_STEP))


def marginal(instance: Instance, work_s: np.ndarray) -> Instance:
    """The instance with each unit's server work replaced by `work_s` (a batched server's
    marginal seconds; its latency is unchanged: the measured delay covers the shared steps)."""
    return replace(instance, units=tuple(replace(u, server_work=float(w))
                                         for u, w in zip(instance.units, work_s, strict=True)))


@dataclass(frozen=True)
class Decision:
    """What a policy chose for one kind of request and what it costs at zero load."""

    placement: Placement
    planned: bool  # False: the policy found no feasible plan and this is its fallback
    latency_s: float  # at zero load
    server_work_s: float


def request_instance(rtype: RequestType, client: ClientClass, world: World, prompt: int,
                     output: int, headroom: float = 0.0) -> Instance:
    """The planner's instance for a request of `rtype` from `client` (zero load), its latency
    limits shrunk by `headroom` (a fraction kept in reserve for queueing)."""
    assert rtype.model is not None
    request = Request(prompt_tokens=prompt, output_tokens=output, sla_s=rtype.sla_s,
                      ttft_s=rtype.ttft_s, tpot_s=rtype.tpot_s, speculation=rtype.speculation)
    instance = build_instance(rtype.model, client.device, world.server.device, client.link,
                              request, rtype.keep_on_client, rtype.keep_on_server)
    measured = world.server.step_model
    if (world.server.scheduler == "batched" and measured is not None
            and measured.n_blocks == len(rtype.model.units) - 2):
        # the server measured its steps: plan with what the simulated (and real) server takes
        # for this request alone, not the roofline (which misses each unit's fixed seconds),
        # and its seconds per job (a visit's pass) as its batched server charges them
        solo_s = measured_unit_s(measured, rtype, prompt, output)
        instance = replace(instance, units=tuple(
            replace(u, server_s=float(s), server_work=float(s))
            for u, s in zip(instance.units, solo_s, strict=True)),
            job_s=measured.job_s, job_work_s=measured.job_s)
    return shrink(instance, headroom)


def choose(policy: str, instance: Instance, load: Load) -> Choice:
    """The policy's placement for an instance under a load, and whether it is a feasible plan."""
    if policy.startswith(FIXED_PREFIX):
        placement = Placement.parse(policy[len(FIXED_PREFIX):], len(instance))
        return placement, evaluate(shrink(instance, load.headroom), placement).feasible
    return POLICIES[policy].choose(instance, load)


class PlanPolicy:
    """One policy's decisions for one world, cached by request kind, token bucket and load."""

    def __init__(self, world: World, policy: str) -> None:
        check_policy(policy)
        self.world = world
        self.policy = policy
        self.reads = POLICIES[policy].reads if policy in POLICIES else frozenset({"headroom"})
        self.sees_load = reads_load(policy)
        # shared by every run of this world and policy in the process (decisions depend on
        # the load, not on the arrival rate)
        self.cache: dict[tuple[int, int, int, int, Load], Decision] = memo.table(
            "plans", policy, memo.planning_key(world))
        # zero-load instances do not depend on the policy or the load: shared by all of them
        self.instances: dict[tuple[int, int, int, int], Instance] = memo.table(
            "instances", memo.planning_key(world))
        batched = world.server.scheduler == "batched" and "batch_rows" in self.reads
        self.batch = BatchCost(world, world.server.step_model) if batched else None

    def decide(self, type_index: int, class_index: int, prompt: int, output: int,
               load: Load | None = None) -> Decision:
        """The placement for one request, given what the server measured recently."""
        rtype = self.world.types[type_index]
        prompt_plan = rtype.prompt_tokens.plan_value(prompt)
        output_plan = rtype.output_tokens.plan_value(output) if rtype.decoder else 1
        seen = bucketed(replace(load or Load(), headroom=self.world.plan_headroom), self.reads)
        key = (type_index, class_index, prompt_plan, output_plan, seen)
        decision = self.cache.get(key)
        if decision is None:
            decision = self._plan(type_index, class_index, prompt_plan, output_plan, seen)
            memo.bounded_put(self.cache, key, decision, PLAN_CACHE_LIMIT)
        return decision

    def _plan(self, type_index: int, class_index: int, prompt: int, output: int,
              load: Load) -> Decision:
        rtype, client = self.world.types[type_index], self.world.clients[class_index]
        if rtype.model is None:  # synthetic: one server job, nothing to place
            return Decision(Placement(SERVER), True, rtype.sla_s, 0.0)
        key = (type_index, class_index, prompt, output)
        base = self.instances.get(key)
        if base is None:
            base = request_instance(rtype, client, self.world, prompt, output)
            memo.bounded_put(self.instances, key, base, INSTANCE_CACHE_LIMIT)
        priced = base
        if self.batch is not None:  # the server's marginal work at the current batch
            priced = marginal(base, self.batch.unit_work_s(type_index, prompt, output,
                                                           load.batch_rows))
        try:
            placement, planned = choose(self.policy, priced, load)
        except UserError as exc:
            raise UserError(f"request type {rtype.name!r} from client {client.name!r}, "
                            f"{prompt} prompt tokens: {exc}") from None
        at_zero = evaluate(base, placement)
        return Decision(placement, planned, at_zero.latency_s, at_zero.server_work)
