"""Placement policies: the planner's solvers called per request, with a plan cache.

A policy is a planner solver plus whether it sees the server's measured delay. A policy that
finds no feasible plan falls back, and the request counts as an SLA miss if it then misses:
- `server-only`: all units on the server (those pinned to the client excepted);
- the zero-load policies: the fastest placement (the last point of the planner's frontier):
  no plan meets the SLA even on an idle server, so the request gets its best chance;
- `exact-load-aware`: the placement with the least server work (the frontier's first point):
  with the delay the server measures, no plan is expected to meet the SLA, so the request is
  expected to miss anyway; taking the least from the server keeps the other requests in SLA
  (the fastest placement would add load to an overloaded server: a runaway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from splitllm.errors import UserError
from splitllm.placement import CLIENT, SERVER, Placement
from splitllm.planner.instance import Instance, Request, build_instance, evaluate
from splitllm.planner.solvers import frontier, solve
from splitllm.sim import memo
from splitllm.sim.world import ClientClass, RequestType, World

# policy name -> (planner solver, sees the server's measured queueing delay)
POLICIES: dict[str, tuple[str, bool]] = {
    "server-only": ("server-only", False),
    "client-only": ("client-only", False),
    "greedy": ("greedy", False),
    "best-single-cut": ("best-single-cut", False),
    "dp-grid": ("dp-grid", False),
    "exact": ("exact", False),
    "exact-load-aware": ("exact", True),
}
FIXED_PREFIX = "fixed:"  # fixed:CSSSC runs one given placement for every request
WAIT_FLOOR_S = 1e-4  # below this the measured delay counts as none
WAIT_STEPS_PER_DECADE = 10  # delays are planned on a log grid (steps of ~26%)
PLAN_CACHE_LIMIT = 100_000


def check_policy(name: str) -> None:
    """Raise a UserError unless `name` is a policy."""
    if name.startswith(FIXED_PREFIX):
        Placement(name[len(FIXED_PREFIX):].upper())
        return
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}: use one of {', '.join(POLICIES)} "
                        f"or {FIXED_PREFIX}<placement>")


def load_aware(policy: str) -> bool:
    """True when the policy plans with the server's measured delay."""
    return POLICIES.get(policy, ("", False))[1]


def wait_bucket(wait_s: float) -> float:
    """The delay a plan is made for: 0 below WAIT_FLOOR_S, else the nearest log-grid point."""
    if wait_s < WAIT_FLOOR_S:
        return 0.0
    step = round(math.log10(wait_s) * WAIT_STEPS_PER_DECADE)
    return float(10.0 ** (step / WAIT_STEPS_PER_DECADE))


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
    keep = 1.0 - headroom
    request = Request(prompt_tokens=prompt, output_tokens=output, sla_s=rtype.sla_s * keep,
                      ttft_s=rtype.ttft_s * keep if rtype.ttft_s is not None else None,
                      tpot_s=rtype.tpot_s * keep if rtype.tpot_s is not None else None)
    return build_instance(rtype.model, client.device, world.server.device, client.link, request,
                          rtype.keep_on_client, rtype.keep_on_server)


def fallback(instance: Instance, least_work: bool) -> Placement:
    """The fastest placement, or the one with least server work, ignoring the SLA (memory and
    pins respected; phase limits too if they can hold)."""
    plans = frontier(instance) or frontier(replace(instance, phase_limits=()))
    if not plans:
        raise UserError(f"no placement fits the client's {instance.client_mem_limit_bytes:.3g} B "
                        "of memory with the units kept on it")
    return plans[0 if least_work else -1].placement


def choose(policy: str, instance: Instance) -> tuple[Placement, bool]:
    """The policy's placement for an instance, and whether it is a feasible plan (no fallback)."""
    if policy.startswith(FIXED_PREFIX):
        placement = Placement.parse(policy[len(FIXED_PREFIX):], len(instance))
        return placement, evaluate(instance, placement).feasible
    plan = solve(instance, POLICIES[policy][0])
    if plan is not None:
        return plan.placement, True
    if policy == "server-only":
        sides = "".join(SERVER if u.server_ok else CLIENT for u in instance.units)
        return Placement(sides), False
    return fallback(instance, least_work=load_aware(policy)), False


class Planner:
    """One policy's decisions for one world, cached by request kind, token bucket and delay."""

    def __init__(self, world: World, policy: str) -> None:
        check_policy(policy)
        self.world = world
        self.policy = policy
        self.sees_wait = load_aware(policy)
        # shared by every run of this world and policy in the process (decisions do not
        # depend on the arrival rate)
        self.cache: dict[tuple[int, int, int, int, float], Decision] = memo.table(
            "plans", policy, memo.planning_key(world))

    def decide(self, type_index: int, class_index: int, prompt: int, output: int,
               wait_s: float = 0.0) -> Decision:
        """The placement for one request, given the server's recently measured delay."""
        rtype = self.world.types[type_index]
        prompt_plan = rtype.prompt_tokens.plan_value(prompt)
        output_plan = rtype.output_tokens.plan_value(output) if rtype.decoder else 1
        wait = wait_bucket(wait_s) if self.sees_wait else 0.0
        key = (type_index, class_index, prompt_plan, output_plan, wait)
        decision = self.cache.get(key)
        if decision is None:
            decision = self._plan(rtype, self.world.clients[class_index], prompt_plan,
                                  output_plan, wait)
            memo.bounded_put(self.cache, key, decision, PLAN_CACHE_LIMIT)
        return decision

    def _plan(self, rtype: RequestType, client: ClientClass, prompt: int, output: int,
              wait_s: float) -> Decision:
        if rtype.model is None:  # synthetic: one server job, nothing to place
            return Decision(Placement(SERVER), True, rtype.sla_s, 0.0)
        base = request_instance(rtype, client, self.world, prompt, output,
                                self.world.plan_headroom)
        instance = replace(base, server_wait_s=wait_s) if wait_s else base
        try:
            placement, planned = choose(self.policy, instance)
        except UserError as exc:
            raise UserError(f"request type {rtype.name!r} from client {client.name!r}, "
                            f"{prompt} prompt tokens: {exc}") from None
        at_zero = evaluate(base, placement)
        return Decision(placement, planned, at_zero.latency_s, at_zero.server_work)
