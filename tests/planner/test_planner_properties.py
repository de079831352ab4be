"""Invariants of `exact` and `frontier` on random instances (hypothesis)."""

from __future__ import annotations

import itertools
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from planner_kit import KINDS, brute_force, pick_limits, random_instance, with_sla

from splitllm.planner.instance import Instance
from splitllm.planner.solvers import frontier, solve

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def instances(draw: st.DrawFn, max_units: int = 12) -> Instance:
    """A random instance with any mix of memory, pins, phase limits, passes and queueing."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    instance = random_instance(
        rng,
        draw(st.sampled_from(range(1, max_units + 1))),  # more even than integers()
        mem=draw(st.booleans()),
        pins=draw(st.booleans()),
        phases=draw(st.integers(0, 2)),
        passes=draw(st.sampled_from([1, 3, 16])),
        server_wait=draw(st.booleans()),
        integer_work=draw(st.booleans()),
    )
    return pick_limits(rng, instance, draw(st.sampled_from(KINDS)))


@PROPERTY
@given(instances(), st.floats(0.0, 2.0))
def test_more_sla_slack_never_increases_the_optimum(instance: Instance, slack: float) -> None:
    tight = solve(instance, "exact")
    loose = solve(with_sla(instance, instance.sla_s * (1 + slack)), "exact")
    if tight is not None:
        assert loose is not None
        assert loose.server_work <= tight.server_work * (1 + 1e-9) + 1e-12


@PROPERTY
@given(instances())
def test_frontier_work_strictly_increases_and_latency_strictly_decreases(
    instance: Instance,
) -> None:
    front = frontier(instance)
    for a, b in itertools.pairwise(front):
        assert a.server_work < b.server_work
        assert a.latency_s > b.latency_s


@PROPERTY
@given(instances())
def test_frontier_plans_respect_memory_pins_and_phase_limits(instance: Instance) -> None:
    for plan in frontier(instance):
        # Only the SLA may be broken: the frontier is for every SLA.
        assert plan.violation is None or plan.violation.startswith("latency"), plan.violation


@PROPERTY
@given(instances(), st.data())
def test_frontier_lookup_matches_exact_at_any_sla(instance: Instance, data: st.DataObject) -> None:
    front = frontier(instance)
    latencies = [p.latency_s for p in front]
    slas = [*latencies, *(math.fsum(pair) / 2 for pair in itertools.pairwise(latencies))]
    slas.append(data.draw(st.floats(1e-6, 2.0)) * (max(latencies) if latencies else 1.0))
    for sla in slas:
        fits = [p for p in front if p.latency_s <= sla * (1 + 1e-9)]
        plan = solve(with_sla(instance, sla), "exact")
        assert (plan is None) == (not fits), sla
        if plan is not None:
            assert math.isclose(plan.server_work, fits[0].server_work, rel_tol=1e-9,
                                abs_tol=1e-12), sla


@PROPERTY
@given(instances())
def test_frontier_equals_the_brute_force_pareto_front(instance: Instance) -> None:
    bf = brute_force(instance)
    ok = np.flatnonzero(bf.limits_ok())
    order = ok[np.lexsort((bf.latency_s[ok], bf.server_work[ok]))]  # by work, then latency
    expected, best = [], math.inf
    for row in order:
        if bf.latency_s[row] < best * (1 - 1e-12):
            expected.append((float(bf.server_work[row]), float(bf.latency_s[row])))
            best = bf.latency_s[row]
    got = [(p.server_work, p.latency_s) for p in frontier(instance)]
    assert len(got) == len(expected)
    for (w, lat), (w_bf, lat_bf) in zip(got, expected, strict=True):
        assert math.isclose(w, w_bf, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(lat, lat_bf, rel_tol=1e-9)
