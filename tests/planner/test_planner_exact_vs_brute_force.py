"""`exact` against a brute force over all 2^n placements, and the oracle against `evaluate`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from planner_kit import KINDS, brute_force, brute_force_case

from splitllm.placement import Placement
from splitllm.planner.instance import evaluate
from splitllm.planner.solvers import solve

N_CASES = 500


@pytest.mark.parametrize("seed", range(0, N_CASES, 25))
def test_oracle_latency_and_feasibility_match_evaluate(seed: int) -> None:
    instance = brute_force_case(seed)
    bf = brute_force(instance)
    feasible = bf.feasible()
    rng = np.random.default_rng(seed)
    for row in rng.integers(0, len(bf.latency_s), 20):
        plan = evaluate(instance, Placement(bf.placement(int(row))))
        assert math.isclose(plan.latency_s, bf.latency_s[row], rel_tol=1e-12)
        assert plan.server_work == pytest.approx(bf.server_work[row], rel=1e-12, abs=1e-15)
        assert plan.client_mem_bytes == pytest.approx(bf.client_mem_bytes[row], rel=1e-12)
        assert plan.phase_latency_s == pytest.approx(tuple(bf.phase_latency_s[:, row]), rel=1e-12)
        assert plan.feasible == bool(feasible[row])


@pytest.mark.parametrize("seed", range(N_CASES))
def test_exact_matches_brute_force(seed: int) -> None:
    instance = brute_force_case(seed)
    best = brute_force(instance).optimum()
    plan = solve(instance, "exact")
    if best is None:
        assert plan is None
        return
    assert plan is not None, f"brute force finds work {best[0]}, exact finds nothing"
    assert plan.feasible, plan.violation
    assert math.isclose(plan.server_work, best[0], rel_tol=1e-9, abs_tol=1e-12)
    # Ties on work go to the least latency.
    assert math.isclose(plan.latency_s, best[1], rel_tol=1e-9)


def test_brute_force_cases_cover_every_kind_of_constraint() -> None:
    """The 500 cases include infeasible ones, binding memory, pins and phase limits, and ties."""
    counts = dict.fromkeys(("infeasible", "memory binds", "phase binds", "pinned", "work ties",
                            "tight sla", "passes > 1", "server wait", "visit cost",
                            "job cost"), 0)
    for seed in range(N_CASES):
        instance = brute_force_case(seed)
        bf = brute_force(instance)
        best = bf.optimum()
        counts["infeasible"] += best is None
        counts["pinned"] += not all(u.client_ok and u.server_ok for u in instance.units)
        counts["passes > 1"] += instance.passes > 1
        counts["server wait"] += instance.server_wait_s > 0
        counts["visit cost"] += instance.link.visit_s > 0
        counts["job cost"] += instance.job_work_s > 0
        counts["tight sla"] += KINDS[seed % len(KINDS)] == "tight" and best is not None
        if best is None:
            continue
        ok = bf.feasible()
        counts["work ties"] += int(np.sum(ok & (bf.server_work == best[0]))) > 1
        sla_ok = bf.pins_ok & (bf.latency_s <= instance.sla_s * (1 + 1e-9))
        mem_ok = bf.client_mem_bytes <= instance.client_mem_limit_bytes * (1 + 1e-12)
        phase_ok = np.all(
            [lat <= p.limit_s * (1 + 1e-9)
             for p, lat in zip(instance.phase_limits, bf.phase_latency_s, strict=True)], axis=0)
        counts["memory binds"] += bf.server_work[sla_ok & phase_ok].min() < best[0]
        counts["phase binds"] += bf.server_work[sla_ok & mem_ok].min() < best[0]
    assert min(counts.values()) >= 20, counts
