"""`exact` against the independent MILP (scipy HiGHS) on instances too large to brute-force."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from planner_kit import (
    random_instance,
    random_placement,
    with_job_cost,
    with_phase_limits,
    with_sla,
)

from splitllm.placement import Placement
from splitllm.planner.instance import Instance, Unit, evaluate
from splitllm.planner.network import Link
from splitllm.planner.solvers import frontier, solve

# Memory and phase limits add label dimensions; `exact` is kept to sizes where it stays fast
# with them (see the report: heterogeneous units with a binding memory limit blow up).
MAX_UNITS_WITH_EXTRA_DIMS = 24


def milp_case(seed: int) -> Instance:
    """20..100 units; limits from the costs of one random placement (so some bind), or an SLA
    just below the fastest plan."""
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.integers(20, 101))
    small = n <= MAX_UNITS_WITH_EXTRA_DIMS
    instance = random_instance(
        rng, n,
        mem=small and rng.random() < 0.6,
        pins=rng.random() < 0.5,
        phases=int(rng.integers(0, 3)) if small else 0,
        passes=int(rng.choice([1, 4, 16])),
        server_wait=rng.random() < 0.5,
    )
    visit = np.random.default_rng(2_000_000 + seed)  # apart: the other draws stay as they were
    if visit.random() < 0.5:  # a per-visit cost on the link
        link = dataclasses.replace(instance.link, visit_s=float(visit.uniform(0.001, 0.05)))
        instance = dataclasses.replace(instance, link=link)
    job = np.random.default_rng(4_000_000 + seed)
    if job.random() < 0.5:  # the server's own cost per visit, in latency and in work
        instance = with_job_cost(job, instance)
    reference = evaluate(instance, Placement(random_placement(rng, instance)))
    instance = with_phase_limits(
        instance, [v * rng.uniform(0.9, 1.3) for v in reference.phase_latency_s])
    front = frontier(instance)
    if seed % 6 == 5 and front:  # just below the fastest plan: infeasible
        return with_sla(instance, front[-1].latency_s * (1 - 1e-6))
    return with_sla(instance, reference.latency_s * rng.choice([0.9, 1.0, 1.1]))


def assert_exact_matches_milp(instance: Instance) -> None:
    """Both find a plan or neither does; both plans are feasible and do the same server work."""
    exact = solve(instance, "exact")
    milp = solve(instance, "milp")
    assert (exact is None) == (milp is None)
    if exact is None or milp is None:
        return
    assert exact.feasible, exact.violation
    assert milp.feasible, milp.violation
    assert math.isclose(exact.server_work, milp.server_work, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("seed", range(30))
def test_exact_matches_milp(seed: int) -> None:
    assert_exact_matches_milp(milp_case(seed))


def test_milp_cases_cover_sizes_and_binding_limits() -> None:
    """The 30 cases span 20..100 units, include infeasible ones and ones where limits bind."""
    sizes, infeasible, binding = [], 0, 0
    for seed in range(30):
        instance = milp_case(seed)
        sizes.append(len(instance))
        plan = solve(instance, "exact")
        infeasible += plan is None
        if plan is not None:
            unlimited = solve(with_sla(instance, math.inf), "exact")
            assert unlimited is not None
            binding += unlimited.server_work < plan.server_work
    assert min(sizes) <= 30 and max(sizes) >= 90
    assert infeasible >= 4
    assert binding >= 10


def memory_case(seed: int) -> Instance:
    """6..24 heterogeneous units whose client memory limit binds (60% of cases)."""
    rng = np.random.default_rng(2000 + seed)
    n = int(rng.integers(6, 25))
    instance = random_instance(rng, n, mem=True, pins=rng.random() < 0.3, passes=4)
    reference = evaluate(instance, Placement("".join(rng.choice(["C", "S"], n))))
    return with_sla(instance, reference.latency_s)


@pytest.mark.parametrize("seed", range(40))
def test_exact_matches_milp_with_a_memory_limit(seed: int) -> None:
    assert_exact_matches_milp(memory_case(seed))


# Found by the random cases: HiGHS called a plan of work 0.0211 optimal although 'CCCSSC'
# (work 0.00977, memory 2.833e9 <= 2.878e9, latency 0.395 <= 0.412) satisfies every row of the
# MILP. The memory row in bytes (~1e9) next to rows in seconds misled its presolve.
MEMORY_ROW_CASE = (  # client_s, server_s, server_work, out_bytes, client_mem_bytes
    (0.09342476668180924, 0.01583129885258491, 0.02546030265158643, 2542319.334497897,
     878207195.2614579),
    (0.0795353100432636, 0.0070119795384083515, 0.007476216060482617, 107728.28879438041,
     174509742.60372272),
    (0.03676087113107002, 0.0032107042375939445, 0.005433892100819636, 205472.70019822157,
     977341260.0659693),
    (0.07019554718018718, 0.0036867480417328543, 0.004536186674049256, 28710.67929042447,
     930541270.9448758),
    (0.07456494328766682, 0.003826813000411861, 0.005236370246385463, 67360.81805240586,
     466636322.9258364),
    (0.08334148793796253, 0.0030036610508446457, 0.005892318783202425, 491588.3834881027,
     802691997.204047),
)


def test_milp_is_optimal_when_a_memory_limit_in_bytes_binds() -> None:
    instance = Instance(
        units=tuple(Unit(name=f"u{i}", client_s=c, server_s=s, server_work=w, out_bytes=b,
                         client_mem_bytes=m)
                    for i, (c, s, w, b, m) in enumerate(MEMORY_ROW_CASE)),
        link=Link(uplink_bytes_per_s=19642246.30015804, downlink_bytes_per_s=50642157.46686556,
                  rtt_s=0.08244806881259531),
        sla_s=0.41189798661606736,
        input_bytes=10865.97825439687,
        output_bytes=507.81018743922624,
        client_mem_limit_bytes=2878291535.641543,
    )
    best = evaluate(instance, Placement("CCCSSC"))
    assert best.feasible
    milp = solve(instance, "milp")
    assert milp is not None
    assert milp.server_work == pytest.approx(best.server_work, rel=1e-9)
