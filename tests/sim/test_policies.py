"""Per request, on every scenario: exact <= every baseline <= server-only in server work, and
no policy's plan breaks the SLA at zero load; walks take what the planner predicts."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from splitllm.errors import UserError
from splitllm.placement import Placement
from splitllm.planner.instance import evaluate
from splitllm.sim.builtin import BUILTINS, builtin_world
from splitllm.sim.paper import POLICIES, PaperGrid, solve_length
from splitllm.sim.policies import Load, PlanPolicy, request_instance, wait_bucket
from splitllm.sim.run import run_policy
from splitllm.sim.scenario import load_scenario
from splitllm.sim.walk import WalkBuilder
from splitllm.sim.workload import sample_workload
from splitllm.sim.world import Trace, World

SCENARIOS = Path(__file__).parents[2] / "docs" / "scenarios"
BASELINES = ("greedy", "best-single-cut")
REL = 1e-9
REQUESTS = 150


def _worlds() -> list[World]:
    return [*(builtin_world(name) for name in BUILTINS),
            *(load_scenario(p) for p in sorted(SCENARIOS.glob("*.yaml")))]


@pytest.fixture(scope="module", params=_worlds(), ids=lambda w: w.name)
def world(request: pytest.FixtureRequest) -> World:
    return request.param


def _requests(world: World):
    load = sample_workload(world.with_rate(world.rate_per_s))
    for r in range(min(len(load), REQUESTS)):
        yield (int(load.type_index[r]), int(load.class_index[r]), int(load.prompt_tokens[r]),
               int(load.output_tokens[r]))


def test_exact_beats_baselines_which_beat_server_only(world: World) -> None:
    planners = {p: PlanPolicy(world, p) for p in ("server-only", *BASELINES, "exact")}
    checked = 0
    for t, c, p, g in _requests(world):
        d = {name: planner.decide(t, c, p, g) for name, planner in planners.items()}
        exact = d["exact"]
        for name in BASELINES:
            if d[name].planned:
                assert exact.planned, "exact finds a plan wherever a baseline does"
                assert exact.server_work_s <= d[name].server_work_s * (1 + REL)
                if d["server-only"].planned:
                    assert d[name].server_work_s <= d["server-only"].server_work_s * (1 + REL)
                    checked += 1
    assert checked > 0


def test_no_plan_breaks_the_sla_at_zero_load(world: World) -> None:
    builder = WalkBuilder(world)
    policies = ("server-only", *BASELINES, "exact", "exact-load-aware", "exact-quantile",
                "exact-tuned", "frontier-priced")
    planners = {p: PlanPolicy(world, p) for p in policies}
    for t, c, p, g in _requests(world):
        rtype = world.types[t]
        actual = request_instance(rtype, world.clients[c], world, p, g)
        for name, planner in planners.items():
            decision = planner.decide(t, c, p, g)
            if not decision.planned:
                continue
            walk = builder.walk(t, c, p, g, decision.placement)
            latency_s = sum(walk.gaps_s) + sum(walk.service_s)
            # the walk at zero load takes what the planner's cost model says
            assert latency_s == pytest.approx(evaluate(actual, decision.placement).latency_s,
                                              rel=1e-9)
            assert latency_s <= rtype.sla_s * (1 + REL), (name, rtype.name, p, g)
            plan = evaluate(actual, decision.placement)
            assert plan.feasible, (name, rtype.name, plan.violation)


def test_one_request_alone_meets_its_plan(world: World) -> None:
    """A single simulated request (nothing else on the server) finishes at its plan's latency."""
    if world.trace is None:
        first = sample_workload(world).arrived_at_s[0]
        alone = replace(world, duration_s=first + 1e-9, warmup_s=0.0)
    else:  # keep the trace's first request only
        t = world.trace
        one = Trace(t.arrived_at_s[:1], t.type_index[:1], t.class_index[:1],
                    t.prompt_tokens[:1], t.output_tokens[:1])
        alone = replace(world, trace=one, warmup_s=0.0, duration_s=1e-9)
    rec = run_policy(alone, "exact")
    assert len(rec.arrived_at_s) == 1
    t, c = int(rec.type_index[0]), int(rec.class_index[0])
    p, g = int(rec.prompt_tokens[0]), int(rec.output_tokens[0])
    placement = rec.placements[int(rec.placement_index[0])]
    expected = evaluate(request_instance(world.types[t], world.clients[c], world, p, g),
                        Placement(placement))
    assert rec.finished_at_s[0] - rec.arrived_at_s[0] == pytest.approx(expected.latency_s)
    assert rec.server_work_s[0] == pytest.approx(expected.server_work)


def test_load_aware_plans_like_exact_on_an_idle_server() -> None:
    world = builtin_world("mixed")
    exact, aware = PlanPolicy(world, "exact"), PlanPolicy(world, "exact-load-aware")
    for t, c, p, g in _requests(world):
        assert aware.decide(t, c, p, g, Load()) == exact.decide(t, c, p, g)


def test_load_aware_leaves_room_for_the_expected_waits() -> None:
    """A load-aware plan meets the SLA even after the expected wait at every visit of every
    pass, and pays for that margin with at least as much server work as exact."""
    world = builtin_world("mixed")
    exact, aware = PlanPolicy(world, "exact"), PlanPolicy(world, "exact-load-aware")
    wait_s = wait_bucket(0.02)
    planned = 0
    for t, c, p, g in _requests(world):
        decision = aware.decide(t, c, p, g, Load(wait_mean_s=wait_s))
        if not decision.planned:
            continue
        planned += 1
        visits = sum(s.side == "S" for s in decision.placement.segments())
        passes = g if world.types[t].decoder else 1
        waits_s = visits * passes * wait_s
        assert decision.latency_s + waits_s <= world.types[t].sla_s * (1 + REL)
        assert decision.server_work_s >= exact.decide(t, c, p, g).server_work_s * (1 - REL)
    assert planned > 0


def test_headroom_keeps_part_of_the_sla_for_queueing() -> None:
    world = builtin_world("mixed")
    assert world.plan_headroom == 0.2
    tight = PlanPolicy(world, "exact")
    loose = PlanPolicy(replace(world, plan_headroom=0.0), "exact")
    for t, c, p, g in _requests(world):
        d, free = tight.decide(t, c, p, g), loose.decide(t, c, p, g)
        if d.planned:
            assert d.latency_s <= 0.8 * world.types[t].sla_s * (1 + REL)
            assert d.server_work_s >= free.server_work_s * (1 - REL)


def test_units_kept_on_a_client_too_small_for_them_give_one_line() -> None:
    world = builtin_world("mixed")
    phone = world.clients[0]
    phone = replace(phone, device=replace(phone.device, mem_capacity_bytes=1e3))
    classify = replace(world.types[2], keep_on_client=frozenset({"embed"}))
    world = replace(world, clients=(phone, *world.clients[1:]),
                    types=(*world.types[:2], classify, *world.types[3:]))
    for policy in ("greedy", "exact", "exact-load-aware"):
        with pytest.raises(UserError, match=r"^request type 'classify' from client 'phone-4g', "
                                            r"128 prompt tokens: no placement fits"):
            PlanPolicy(world, policy).decide(2, 0, 128, 1)


def test_wait_buckets_are_a_log_grid() -> None:
    assert wait_bucket(0.0) == 0.0
    assert wait_bucket(5e-5) == 0.0
    assert wait_bucket(0.1) == pytest.approx(0.1)
    assert wait_bucket(0.0105) == pytest.approx(10 ** -2, rel=0.13)
    steps = sorted({wait_bucket(w) for w in np.geomspace(1e-3, 1.0, 500)})
    assert len(steps) == 31  # ten per decade
    assert all(b / a == pytest.approx(10**0.1) for a, b in itertools.pairwise(steps))


def test_paper_grid_points_are_ordered_and_within_sla() -> None:
    grid = PaperGrid().quick()
    so, ex = POLICIES.index("server-only"), POLICIES.index("exact")
    for model in grid.models:
        for point in solve_length(grid, model, grid.lengths(model)[0]):
            work = point.server_work_s
            assert not any(math.isnan(w) for w in work)  # slack >= 1: server-only fits
            for k, policy in enumerate(POLICIES):
                assert work[ex] <= work[k] * (1 + REL) + 1e-15, policy
                assert work[k] <= work[so] * (1 + REL) + 1e-15, policy
                assert point.latency_s[k] <= point.sla_s * (1 + REL)
