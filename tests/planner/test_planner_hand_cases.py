"""Three-unit instances worked out by hand (every number below is in the comments)."""

from __future__ import annotations

import dataclasses

import pytest
from planner_kit import brute_force, hand_instance

from splitllm.placement import Placement
from splitllm.planner.instance import Instance, evaluate
from splitllm.planner.solvers import solve

SOLVERS = ("exact", "milp", "dp-grid", "greedy", "best-single-cut", "server-only", "client-only")


def two_switch_case() -> Instance:
    """Units (client_s, server_s, work): u0 (10, 1, 1), u1 (1, 1, 10), u2 (10, 1, 1).

    No bytes cross, rtt 0.2 s: every crossing costs 0.1 s. SLA 3.5 s.
      CCC 21.0   CCS 12.2   CSC 21.2   CSS 12.2   SCC 12.2   SSC 12.2
      SSS  1+1+1 + 2 crossings          = 3.2 s, work 1+10+1 = 12
      SCS  1+1+1 + 4 crossings (C>S>C>S>C) = 3.4 s, work 1+1 = 2   <- the optimum
    Every single-cut plan (C^a S^b C^c) within 3.5 s is SSS: work 12.
    """
    return hand_instance([(10, 1, 1, 0), (1, 1, 10, 0), (10, 1, 1, 0)], sla_s=3.5, rtt_s=0.2)


def test_two_switches_each_way_beat_every_single_cut() -> None:
    plan = solve(two_switch_case(), "exact")
    assert plan is not None
    assert plan.placement.sides == "SCS"
    assert plan.server_work == pytest.approx(2.0)
    assert plan.network_s == pytest.approx(4 * 0.1)
    assert plan.latency_s == pytest.approx(3.4)


def test_best_single_cut_is_all_server_on_the_two_switch_case() -> None:
    plan = solve(two_switch_case(), "best-single-cut")
    assert plan is not None
    assert plan.placement.sides == "SSS"
    assert plan.server_work == pytest.approx(12.0)
    assert plan.latency_s == pytest.approx(3.2)




def memory_case(sla_s: float) -> Instance:
    """Units (client_s, server_s, work, out_bytes, client memory):
    u0 (1.0, 0.1, 0.1, 100, 1), u1 (2.0, 0.2, 0.2, 100, 5), u2 (1.0, 0.1, 0.1, 10, 1).

    Input 10 B, output 4 B, uplink 1000 B/s, downlink 2000 B/s, rtt 0.1 s, memory limit 3:
    u1 (5) can never run on the client. A crossing costs 0.05 s + bytes / bandwidth:
      up into u0 (input, 10 B) 0.06     up into u1 (u0's 100 B) 0.15
      down after u1 (100 B) 0.10        down at the end (output, 4 B) 0.052
    Plans with u1 on the server:
      CSC  1.0 + 1.0 + 0.2 + 0.15 + 0.10  = 2.45 s,  work 0.2
      SSC  1.0 + 0.3 + 0.06 + 0.10        = 1.46 s,  work 0.3
      CSS  1.0 + 0.3 + 0.15 + 0.052       = 1.502 s, work 0.3
      SSS  0.4 + 0.06 + 0.052             = 0.512 s, work 0.4
    Without the limit CCC (4.0 s, work 0) would win at SLA 5.
    """
    return hand_instance(
        [(1.0, 0.1, 0.1, 100), (2.0, 0.2, 0.2, 100), (1.0, 0.1, 0.1, 10)], sla_s=sla_s,
        input_bytes=10, output_bytes=4, up_bytes_per_s=1000, down_bytes_per_s=2000, rtt_s=0.1,
        mem=[1, 5, 1], mem_limit=3,
    )


def test_memory_limit_forces_the_big_unit_to_the_server() -> None:
    plan = solve(memory_case(sla_s=5.0), "exact")
    assert plan is not None
    assert plan.placement.sides == "CSC"
    assert plan.server_work == pytest.approx(0.2)
    assert plan.latency_s == pytest.approx(2.45)
    assert plan.client_mem_bytes == 2


def test_without_the_memory_limit_everything_runs_on_the_client() -> None:
    instance = dataclasses.replace(memory_case(sla_s=5.0), client_mem_limit_bytes=float("inf"))
    plan = solve(instance, "exact")
    assert plan is not None
    assert plan.placement.sides == "CCC"
    assert plan.latency_s == pytest.approx(4.0)


def test_equal_work_ties_go_to_the_lower_latency() -> None:
    # At SLA 2.0 CSC (2.45 s) is out; SSC (1.46 s) and CSS (1.502 s) both cost 0.3.
    plan = solve(memory_case(sla_s=2.0), "exact")
    assert plan is not None
    assert plan.placement.sides == "SSC"
    assert plan.latency_s == pytest.approx(1.46)


@pytest.mark.parametrize("solver", SOLVERS)
def test_sla_below_the_fastest_plan_is_infeasible_for_every_solver(solver: str) -> None:
    # The fastest plan is SSS at 0.512 s (any client unit alone takes >= 1 s).
    assert solve(memory_case(sla_s=0.5), solver) is None


@pytest.mark.parametrize("solver", SOLVERS)
def test_unit_pinned_to_the_client_over_the_memory_limit_is_infeasible(solver: str) -> None:
    instance = memory_case(sla_s=100.0)
    units = list(instance.units)
    units[1] = dataclasses.replace(units[1], server_ok=False)  # 5 bytes on a 3-byte client
    assert solve(dataclasses.replace(instance, units=tuple(units)), solver) is None


def test_unit_pinned_to_both_sides_is_infeasible() -> None:
    instance = memory_case(sla_s=100.0)
    units = list(instance.units)
    units[0] = dataclasses.replace(units[0], server_ok=False, client_ok=False)
    assert solve(dataclasses.replace(instance, units=tuple(units)), "exact") is None


def greedy_trap() -> Instance:
    """Crossings are free (no bytes, rtt 0); the server runs everything in 0 s. SLA 10.5 s.

    Units (client_s, work): u0 (2, 3) saves 1.5 work/s, u1 (10, 10) 1.0/s, u2 (9, 1) 0.11/s.
    Greedy from SSS (0 s, work 14) moves u0 first (best rate): CSS, 2 s, work 11. Then u1 would
    take 12 s and u2 11 s, both past 10.5: greedy stops at work 11. The optimum moves u1 alone:
    SCS, 10 s, work 4 ({u0, u2} would take 11 s).
    """
    return hand_instance([(2, 0, 3, 0), (10, 0, 10, 0), (9, 0, 1, 0)], sla_s=10.5)


def test_greedy_stops_after_the_best_rate_move() -> None:
    plan = solve(greedy_trap(), "greedy")
    assert plan is not None
    assert plan.placement.sides == "CSS"
    assert plan.server_work == pytest.approx(11.0)


def test_exact_is_strictly_better_than_greedy_on_the_trap() -> None:
    plan = solve(greedy_trap(), "exact")
    assert plan is not None
    assert plan.placement.sides == "SCS"
    assert plan.server_work == pytest.approx(4.0)


def zero_work_embedding() -> Instance:
    """u0 is embedding-like: no server work, a small output; the input is 100 B at 10 B/s.

    Units (client_s, server_s, work, out_bytes): u0 (0.1, 0.01, 0, 10), u1 (10, 1, 1, 10).
    No rtt, output 0 B, SLA 5 s:
      SS  1.01 + input up 10 s         = 11.01 s      CS  0.1 + 1 + u0's 10 B up 1 s = 2.1 s
      CC  10.1 s                                      SC  0.01 + 10 + 10 + 1        = 21.01 s
    Greedy as documented: from SS, moving u0 cuts latency (ranks first) -> CS, work 1; u1 can
    then not move (CC 10.1 s > 5 s). The optimum is CS too.
    """
    return hand_instance([(0.1, 0.01, 0.0, 10), (10.0, 1.0, 1.0, 10)], sla_s=5.0,
                         input_bytes=100, up_bytes_per_s=10, down_bytes_per_s=10)


def test_exact_keeps_the_zero_work_embedding_on_the_client() -> None:
    plan = solve(zero_work_embedding(), "exact")
    assert plan is not None
    assert plan.placement.sides == "CS"
    assert plan.latency_s == pytest.approx(2.1)


def test_greedy_moves_a_zero_work_unit_that_cuts_latency() -> None:
    plan = solve(zero_work_embedding(), "greedy")
    assert plan is not None
    assert plan.placement.sides == "CS"


HAND_LATENCIES = {
    "two_switch": {"CCC": 21.0, "CCS": 12.2, "CSC": 21.2, "CSS": 12.2, "SCC": 12.2, "SSC": 12.2,
                   "SSS": 3.2, "SCS": 3.4},
    "memory": {"CSC": 2.45, "SSC": 1.46, "CSS": 1.502, "SSS": 0.512, "CCC": 4.0},
    "greedy_trap": {"SSS": 0.0, "CSS": 2.0, "SCS": 10.0, "CCS": 12.0, "CSC": 11.0},
    "zero_work": {"SS": 11.01, "CS": 2.1, "CC": 10.1, "SC": 21.01},
}


@pytest.mark.parametrize("case", HAND_LATENCIES)
def test_hand_computed_latencies_match_the_spec_and_evaluate(case: str) -> None:
    instance = {"two_switch": two_switch_case(), "memory": memory_case(5.0),
                "greedy_trap": greedy_trap(), "zero_work": zero_work_embedding()}[case]
    bf = brute_force(instance)
    expected = HAND_LATENCIES[case]
    assert {p: float(bf.latency_s[bf.row_of(p)]) for p in expected} == pytest.approx(expected)
    assert {p: evaluate(instance, Placement(p)).latency_s for p in expected} == pytest.approx(
        expected)


def test_a_placement_counts_its_server_visits_and_switches() -> None:
    for sides, visits, switches in (("CCCC", 0, 0), ("SSSS", 1, 0), ("CSSC", 1, 2),
                                    ("SCSC", 2, 3), ("CSCSCS", 3, 5)):
        placement = Placement(sides)
        assert (placement.server_visits, placement.switches) == (visits, switches), sides
