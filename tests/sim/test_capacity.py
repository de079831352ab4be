"""Goodput capacity search: finds the known answer of an M/M/1 queue; parallel = sequential."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from sim_kit import synthetic_world

from splitllm.sim.capacity import Bracket, bracket_of, find_capacity, first_guess_rate
from splitllm.sim.dists import Dist
from splitllm.sim.study import run_sim_study
from splitllm.sim.sweep import Backend
from splitllm.sim.world import SweepSpec

SERVICE_S = 0.01
SLA_S = 0.1


def _mm1_world(rel_tol: float = 0.02):
    world = synthetic_world(Dist("exponential", mean_value=SERVICE_S, integer=False), 50.0,
                            300.0, "fcfs", warmup_s=10.0, sla_s=SLA_S)
    return replace(world, sweep=SweepSpec(rel_tol=rel_tol, min_requests=1))


def test_capacity_of_mm1_is_where_the_sla_quantile_hits_the_target() -> None:
    # FCFS M/M/1 response time ~ Exp(mu - lambda): P(T <= x) >= 0.9 iff lambda <= mu - ln 10 / x
    expected = 1 / SERVICE_S - math.log(10) / SLA_S
    cap = find_capacity(_mm1_world(), "server-only")
    assert cap.rate_per_s == pytest.approx(expected, rel=0.05)
    ok = [p for p in cap.probes if p.sla_attainment >= 0.9]
    bad = [p for p in cap.probes if p.sla_attainment < 0.9]
    assert max(p.rate_per_s for p in ok) == cap.rate_per_s
    assert min(p.rate_per_s for p in bad) <= cap.rate_per_s * 1.02 + 1e-9  # bracket closed


def test_first_guess_is_half_the_saturation_rate() -> None:
    assert first_guess_rate(_mm1_world(), "server-only") == pytest.approx(
        0.5 / SERVICE_S, rel=0.1)


def test_nothing_meets_an_impossible_sla() -> None:
    world = replace(_mm1_world(), types=(replace(_mm1_world().types[0], sla_s=1e-4),))
    cap = find_capacity(replace(world, duration_s=5.0), "server-only")
    assert cap.rate_per_s == 0.0
    assert all(not p.sla_attainment >= 0.9 for p in cap.probes)  # nan: no request came


def test_parallel_study_equals_sequential() -> None:
    world = replace(_mm1_world(rel_tol=0.2), duration_s=20.0, policies=("server-only",))
    world = replace(world, sweep=replace(world.sweep, rates_per_s=(20.0, 60.0)))
    one = run_sim_study(world, Backend(jobs=1))
    two = run_sim_study(replace(world, policies=("server-only", "exact")), Backend(jobs=2))
    # repr: metrics hold nan (no TPOT for single-pass jobs), which never compares equal
    assert repr(two.capacities[0]) == repr(one.capacities[0])
    assert repr([two.at(i)[0] for i in (0, 1)]) == repr([one.at(i)[0] for i in (0, 1)])


def test_the_crossing_interpolates_geometrically_in_rate_linearly_in_attainment() -> None:
    # 95% at 10 req/s, 85% at 20: the target is halfway in attainment, so sqrt(10 * 20)
    assert Bracket(10.0, 0.95, 20.0, 0.85).crossing_per_s(0.9) == pytest.approx(
        math.sqrt(200.0))
    assert Bracket(10.0, 0.90, 20.0, 0.50).crossing_per_s(0.9) == 10.0  # on the target
    assert Bracket(10.0, 1.0, 20.0, 0.8).crossing_per_s(0.9) == pytest.approx(10 * 2**0.5)
    assert Bracket(10.0, 1.0, 20.0, math.nan).crossing_per_s(0.9) == pytest.approx(
        10 * 2**0.1)  # no request came at the bad rate: none met the SLA there
    assert Bracket(10.0, 1.0, math.inf, math.nan).crossing_per_s(0.9) == 10.0  # none failed
    assert Bracket(0.0, math.nan, 5.0, 0.2).crossing_per_s(0.9) == 0.0  # none met it


def test_the_bracket_pools_a_rate_probed_again_and_skips_failures_below_the_best() -> None:
    points = [(4.0, 1.0, 100), (8.0, 0.95, 100), (8.0, 0.83, 100), (6.0, 0.97, 50),
              (5.0, 0.5, 10), (16.0, 0.2, 100)]
    # 8 req/s pooled: 178 of 200 = 89%, a failure; 5 failed below the best good rate (6)
    assert bracket_of(points, 0.9) == Bracket(6.0, 0.97, 8.0, 0.89)
    none_good = bracket_of([(3.0, 0.5, 10)], 0.9)
    assert (none_good.good_per_s, none_good.bad_per_s, none_good.bad_attainment) == (
        0.0, 3.0, 0.5) and math.isnan(none_good.good_attainment)


def test_the_simulated_capacity_is_reported_as_the_crossing_in_its_bracket() -> None:
    cap = find_capacity(_mm1_world(rel_tol=0.1), "server-only")
    b = cap.bracket
    assert b.good_per_s == cap.rate_per_s and b.bad_per_s / b.good_per_s - 1 <= 0.1
    assert b.good_attainment >= 0.9 > b.bad_attainment
    assert b.good_per_s <= cap.crossing_per_s <= b.bad_per_s
    assert cap.crossing_per_s == b.crossing_per_s(0.9)
