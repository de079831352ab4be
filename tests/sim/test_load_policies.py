"""The load-reading policies on a hand-made world where the right answers are known by brute
force, and the load meter they read (delay quantile, idle decay, utilization, tuned headroom)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
from sim_kit import tiny_world

from splitllm.placement import Placement
from splitllm.planner.instance import Instance, Plan, evaluate
from splitllm.sim.load import LoadMeter
from splitllm.sim.policies import (
    IDLE_LATENCY_PRICE,
    Load,
    PlanPolicy,
    request_instance,
    wait_bucket,
)
from splitllm.sim.world import World

PROMPT, OUTPUT = 4, 3
NEW = ("exact-quantile", "exact-tuned", "frontier-priced")


@pytest.fixture(scope="module")
def world() -> World:
    """The tiny model over a slow link, SLA 8 s: running it all on the client (9 s) misses,
    so every plan uses the server, and a 0.5 s delay per visit changes the least-work plan."""
    return tiny_world((0.0,), prompt=PROMPT, output=OUTPUT, sla_s=8.0)


def _plans(world: World, wait_s: float) -> list[Plan]:
    """Every placement of the tiny model, evaluated with `wait_s` at every server visit."""
    base = request_instance(world.types[0], world.clients[0], world, PROMPT, OUTPUT)
    loaded: Instance = replace(base, server_wait_s=wait_s)
    return [evaluate(loaded, Placement("".join(s))) for s in itertools.product("CS", repeat=3)]


def _least_work(plans: list[Plan]) -> float:
    return min(p.server_work for p in plans if p.feasible)


def _decide(world: World, policy: str, load: Load) -> Plan:
    decision = PlanPolicy(world, policy).decide(0, 0, PROMPT, OUTPUT, load)
    assert decision.planned
    base = request_instance(world.types[0], world.clients[0], world, PROMPT, OUTPUT)
    return evaluate(base, decision.placement)


def test_on_an_idle_server_the_margin_policies_plan_like_exact(world: World) -> None:
    exact = _decide(world, "exact", Load())
    assert exact.server_work == pytest.approx(_least_work(_plans(world, 0.0)))
    for policy in ("exact-load-aware", "exact-quantile", "exact-tuned"):
        assert _decide(world, policy, Load()).placement == exact.placement, policy


@pytest.mark.parametrize("policy", ["exact-load-aware", *NEW])
def test_on_a_saturated_server_every_policy_takes_the_least_work_feasible_plan(
        world: World, policy: str) -> None:
    wait_s = wait_bucket(0.5)
    load = Load(wait_mean_s=wait_s, wait_quantile_s=wait_s, utilization=1.0)
    loaded = _plans(world, wait_s)
    chosen = next(p for p in loaded if p.placement == _decide(world, policy, load).placement)
    assert chosen.feasible
    assert chosen.server_work == pytest.approx(_least_work(loaded))
    # the delay matters: on an idle server the least-work plan is cheaper (and now too slow)
    assert _least_work(_plans(world, 0.0)) < _least_work(loaded)


@pytest.mark.parametrize("policy", NEW)
def test_a_request_without_a_plan_in_its_margin_is_rescued_at_the_mean_wait(
        world: World, policy: str) -> None:
    """At a high quantile of the wait (2 s a visit) no plan meets the SLA; at the mean wait
    (1 s) the fastest does: the request gets the fastest, its best chance, not the plan with
    the least work, which certainly misses. Where even the mean wait leaves the fastest too
    slow, the least server work."""
    def rescued(mean_s: float, quantile_s: float) -> Placement:
        load = Load(wait_mean_s=wait_bucket(mean_s), wait_quantile_s=wait_bucket(quantile_s))
        decision = PlanPolicy(world, policy).decide(0, 0, PROMPT, OUTPUT, load)
        assert not decision.planned  # no plan within the margin
        return decision.placement

    assert not any(p.feasible for p in _plans(world, wait_bucket(2.0)))
    fastest = min(_plans(world, wait_bucket(1.0)), key=lambda p: p.latency_s)
    assert fastest.feasible and rescued(1.0, 2.0) == fastest.placement
    least = min(_plans(world, wait_bucket(3.0)), key=lambda p: p.server_work)
    assert not least.feasible and rescued(3.0, 5.0) == least.placement
    assert least.placement != fastest.placement


@pytest.mark.parametrize("utilization", [0.0, 0.3, 0.6, 1.0])
def test_frontier_priced_minimises_work_plus_priced_latency(world: World,
                                                            utilization: float) -> None:
    plans = _plans(world, 0.0)
    fastest = min(plans, key=lambda p: p.latency_s)
    price = (IDLE_LATENCY_PRICE * (1 - utilization) ** 2 * fastest.server_work
             / world.types[0].sla_s)
    best = min(p.server_work + price * p.latency_s for p in plans if p.feasible)
    chosen = _decide(world, "frontier-priced", Load(utilization=utilization))
    assert chosen.server_work + price * chosen.latency_s == pytest.approx(best)


def test_frontier_priced_offloads_less_when_idle_than_when_busy(world: World) -> None:
    idle = _decide(world, "frontier-priced", Load())
    busy = _decide(world, "frontier-priced", Load(utilization=1.0))
    assert idle.latency_s < busy.latency_s
    assert idle.server_work > busy.server_work
    assert busy.server_work == pytest.approx(_decide(world, "exact", Load()).server_work)


def _meter(**fields: float) -> LoadMeter:
    return LoadMeter(replace(tiny_world((0.0,), PROMPT, OUTPUT), **fields))


def test_the_meter_reads_the_delay_quantile_and_mean() -> None:
    meter = _meter(wait_quantile=0.9)
    for k in range(100):
        meter.job_done(1.0, 1.0 if k < 15 else 0.01, 0.0)
    load = meter.load(1.0)
    assert load.wait_quantile_s == pytest.approx(1.0)
    assert load.wait_mean_s == pytest.approx((15 * 1.0 + 85 * 0.01) / 100)
    meter = _meter(wait_quantile=0.8)
    for k in range(100):
        meter.job_done(1.0, 1.0 if k < 15 else 0.01, 0.0)
    assert meter.load(1.0).wait_quantile_s == pytest.approx(0.01)


def test_the_delay_estimates_decay_while_the_server_is_idle() -> None:
    meter = _meter(wait_tau_s=2.0)
    meter.job_done(5.0, 0.1, 0.0)
    busy, idle = meter.load(5.0), meter.load(9.0)  # two time constants without a job
    assert idle.wait_mean_s == pytest.approx(busy.wait_mean_s * math.exp(-2))
    assert idle.wait_quantile_s == pytest.approx(busy.wait_quantile_s * math.exp(-2))


def test_utilization_is_the_decayed_busy_share() -> None:
    meter = _meter(wait_tau_s=2.0)
    for k in range(1, 1001):  # 0.25 busy seconds every 0.5 s, for 250 time constants
        meter.job_done(0.5 * k, 0.0, 0.25)
    over_a_period = [meter.load(500.0 + 0.005 * j).utilization for j in range(100)]
    assert np.mean(over_a_period) == pytest.approx(0.5, rel=0.01)
    assert meter.load(510.0).utilization == pytest.approx(meter.load(500.0).utilization
                                                          * math.exp(-5))


def test_tuned_headroom_converges_to_the_target_attainment_on_a_fixed_workload() -> None:
    """Each request of a fixed workload needs a headroom drawn from U(0, 0.5) to meet its SLA,
    so attainment 99% needs a headroom of 0.495: the tuned headroom settles there."""
    meter = _meter(headroom_target=0.99, plan_headroom=0.0)
    needs = np.random.default_rng(3).uniform(0.0, 0.5, 40_000)
    trail, met = [], []
    for need in needs:
        met.append(meter.tuned_headroom >= need)
        meter.request_done(met[-1])
        trail.append(meter.tuned_headroom)
    assert np.mean(trail[-10_000:]) == pytest.approx(0.495, abs=0.01)
    assert np.mean(met[-20_000:]) == pytest.approx(0.99, abs=0.005)
    assert np.ptp(trail[-10_000:]) < 0.1  # it stays near, not just on average
