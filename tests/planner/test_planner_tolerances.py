"""Solvers and `evaluate` must agree on what fits: a returned plan is feasible per `evaluate`."""

from __future__ import annotations

import pytest
from planner_kit import hand_instance

from splitllm.planner.solvers import solve

# Client-only needs 500 + 500.0000001 B on a 1000 B client: over by 1e-10 relative, within the
# one tolerance (REL_TOL = 1e-9) that `evaluate` and every solver apply to every limit.
OVER_BY_A_HAIR = hand_instance([(1.0, 0.1, 1.0, 0.0), (1.0, 0.1, 1.0, 0.0)], sla_s=100.0,
                               mem=[500.0, 500.0000001], mem_limit=1000.0)


@pytest.mark.parametrize(
    "solver", ["exact", "best-single-cut", "milp", "greedy", "client-only", "dp-grid"]
)
def test_solvers_and_evaluate_agree_on_a_limit_met_within_rounding(solver: str) -> None:
    plan = solve(OVER_BY_A_HAIR, solver)
    assert plan is not None
    assert plan.feasible, plan.violation
    assert plan.server_work == 0.0  # all on the client: it fits within the tolerance
