"""`dp-grid` (the reference time-grid DP): never breaks the SLA, converges to `exact`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from planner_kit import brute_force_case, random_instance, random_placement, with_sla

from splitllm.errors import UserError
from splitllm.placement import Placement
from splitllm.planner.instance import Instance, evaluate
from splitllm.planner.solvers import solve

STEPS = (0.1, 0.01, 0.001)  # fractions of the SLA, coarse to fine


def grid_case(seed: int) -> Instance:
    """4..20 units, pins, passes, queueing; SLA 1-1.5x the latency of a random placement."""
    rng = np.random.default_rng(3000 + seed)
    instance = random_instance(
        rng, int(rng.integers(4, 21)), pins=rng.random() < 0.3,
        passes=int(rng.choice([1, 4])), server_wait=rng.random() < 0.3,
    )
    reference = evaluate(instance, Placement(random_placement(rng, instance)))
    return with_sla(instance, reference.latency_s * rng.uniform(1.0, 1.5))


@pytest.mark.parametrize("step", STEPS)
def test_dp_grid_plans_meet_every_limit(step: float) -> None:
    # brute_force_case mixes in memory and phase limits, which dp-grid checks only at the end.
    for seed in range(0, 500, 5):
        instance = brute_force_case(seed)
        if not math.isfinite(instance.sla_s):
            continue
        plan = solve(instance, "dp-grid", step_s=step * instance.sla_s)
        assert plan is None or plan.feasible, (seed, plan.violation)


@pytest.mark.parametrize("step", STEPS)
def test_dp_grid_never_has_less_server_work_than_exact(step: float) -> None:
    for seed in range(40):
        instance = grid_case(seed)
        plan = solve(instance, "dp-grid", step_s=step * instance.sla_s)
        best = solve(instance, "exact")
        assert best is not None
        if plan is not None:
            assert plan.server_work >= best.server_work * (1 - 1e-9), seed


def grid_gaps(step: float, n_cases: int = 40) -> list[float]:
    """dp-grid's extra server work over exact, as a share of all work (1.0: no plan found)."""
    gaps = []
    for seed in range(n_cases):
        instance = grid_case(seed)
        best = solve(instance, "exact")
        assert best is not None
        plan = solve(instance, "dp-grid", step_s=step * instance.sla_s)
        total = sum(u.server_work for u in instance.units)
        gaps.append(1.0 if plan is None else (plan.server_work - best.server_work) / total)
    return gaps


def test_dp_grid_average_gap_to_exact_shrinks_with_the_step() -> None:
    means = [float(np.mean(grid_gaps(step))) for step in STEPS]
    assert means[0] > means[1] > means[2], means
    assert means[2] < 0.01, means


def test_dp_grid_at_the_finest_step_matches_exact_on_most_instances() -> None:
    gaps = grid_gaps(STEPS[-1])
    assert sum(abs(g) < 1e-9 for g in gaps) >= 0.7 * len(gaps), gaps


def test_dp_grid_matches_exact_on_the_real_model_instance_at_a_fine_step() -> None:
    from splitllm.planner.configs import MODEL_CONFIGS
    from splitllm.planner.costs import model_costs
    from splitllm.planner.hardware import DEVICE_PRESETS, LINK_PRESETS
    from splitllm.planner.instance import Request, build_instance

    instance = build_instance(
        model_costs(MODEL_CONFIGS["llama-3-8b"]), DEVICE_PRESETS["laptop"],
        DEVICE_PRESETS["datacenter-gpu"], LINK_PRESETS["wifi"],
        Request(prompt_tokens=512, output_tokens=8, sla_s=3.0))
    plan = solve(instance, "dp-grid", step_s=0.0005)
    best = solve(instance, "exact")
    assert plan is not None and best is not None
    assert plan.server_work == pytest.approx(best.server_work, rel=1e-9)


def test_dp_grid_with_too_many_grid_points_is_a_user_error() -> None:
    instance = grid_case(0)
    with pytest.raises(UserError, match="step"):
        solve(instance, "dp-grid", step_s=instance.sla_s * 1e-7)
