"""The one crossing formula: scalars and arrays agree, and a path pays each switch once."""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pytest

from splitllm.planner.network import (
    Link,
    carried_bytes,
    crossing_s,
    path_network_s,
    session_open_s,
    switch_costs,
)

LINK = Link(uplink_bytes_per_s=1000.0, downlink_bytes_per_s=4000.0, rtt_s=0.2)


def test_a_crossing_is_passes_half_rtts_plus_bytes_over_bandwidth() -> None:
    assert crossing_s(LINK, True, 500.0, passes=3) == pytest.approx(3 * 0.1 + 0.5)
    assert crossing_s(LINK, False, 500.0, passes=3) == pytest.approx(3 * 0.1 + 0.125)
    assert crossing_s(LINK, True, 0.0, passes=2, server_wait_s=0.05) == pytest.approx(0.3)
    assert crossing_s(LINK, False, 0.0, passes=2, server_wait_s=0.05) == pytest.approx(0.2)


def test_arrays_cross_elementwise() -> None:
    nbytes = np.array([0.0, 100.0, 2500.0])
    for up in (True, False):
        together = crossing_s(LINK, up, nbytes, passes=2, server_wait_s=0.01)
        one_by_one = [crossing_s(LINK, up, float(b), passes=2, server_wait_s=0.01)
                      for b in nbytes]
        assert together.tolist() == one_by_one


def test_a_path_pays_every_switch_and_the_way_back() -> None:
    carried = carried_bytes(10.0, [100.0, 200.0, 300.0], 4.0)  # [input, out0, out1, result]
    assert carried.tolist() == [10.0, 100.0, 200.0, 4.0]
    up, down = partial(crossing_s, LINK, True, passes=2), partial(crossing_s, LINK, False, passes=2)
    cases = {
        "CCC": 0.0,
        "SSS": up(10.0) + down(4.0),
        "CSC": up(100.0) + down(200.0),
        "SCS": up(10.0) + down(100.0) + up(200.0) + down(4.0),
    }
    for sides, expected in cases.items():
        on_server = np.array([s == "S" for s in sides])
        edges = switch_costs(LINK, carried, passes=2)
        assert path_network_s(on_server, edges) == pytest.approx(expected)


def test_a_link_is_equal_to_another_of_the_same_costs_whatever_its_name() -> None:
    assert Link(name="4g", uplink_bytes_per_s=1000.0, downlink_bytes_per_s=4000.0,
                rtt_s=0.2) == LINK


def test_the_server_is_charged_its_own_cost_once_per_visit_and_pass() -> None:
    """Each visit (switch up) costs passes x job_s more latency and passes x job_work_s more
    server work: exactly, on costs that add up without rounding (powers of two)."""
    from splitllm.placement import Placement
    from splitllm.planner.instance import Instance, Unit, evaluate

    units = tuple(Unit(name=f"u{i}", client_s=1.0, server_s=0.25, server_work=0.5, out_bytes=0.0)
                  for i in range(5))
    link = Link(uplink_bytes_per_s=1.0, downlink_bytes_per_s=1.0, rtt_s=0.0)
    free = Instance(units=units, link=link, sla_s=100.0, input_bytes=0.0, output_bytes=0.0,
                    passes=4)
    costly = Instance(units=units, link=link, sla_s=100.0, input_bytes=0.0, output_bytes=0.0,
                      passes=4, job_s=0.125, job_work_s=0.0625)
    for sides, visits in (("CCCCC", 0), ("SSSSS", 1), ("CSSSC", 1), ("SCSCS", 3), ("CSCSC", 2)):
        before, after = evaluate(free, Placement(sides)), evaluate(costly, Placement(sides))
        assert after.server_work - before.server_work == visits * 4 * 0.0625, sides
        assert after.latency_s - before.latency_s == visits * 4 * 0.125, sides
        assert after.network_s - before.network_s == visits * 4 * 0.125, sides
    # with the same units on the server, the plan of more visits costs more work
    assert (evaluate(costly, Placement("SCSCS")).server_work
            - evaluate(costly, Placement("SSSCC")).server_work) == 2 * 4 * 0.0625


def test_a_servers_cost_per_visit_makes_the_planner_visit_less() -> None:
    """Units 1 and 3 must run on the server to meet the SLA: two visits do the least unit work
    without a per-visit cost; with it one visit over units 1-3 costs less. The exact solver,
    the MILP and the grid DP agree."""
    from splitllm.placement import Placement
    from splitllm.planner.instance import Instance, Unit
    from splitllm.planner.solvers import solve

    units = tuple(Unit(name=f"u{i}", client_s=c, server_s=0.25, server_work=1.0, out_bytes=0.0)
                  for i, c in enumerate((1.0, 4.0, 1.0, 4.0, 1.0)))
    link = Link(uplink_bytes_per_s=1.0, downlink_bytes_per_s=1.0, rtt_s=0.0)
    base = Instance(units=units, link=link, sla_s=3.5, input_bytes=0.0, output_bytes=0.0)
    costly = Instance(units=units, link=link, sla_s=3.5, input_bytes=0.0, output_bytes=0.0,
                      job_work_s=2.0)
    for solver in ("exact", "milp", "dp-grid"):
        plan = solve(base, solver)
        assert plan is not None and plan.placement == Placement("CSCSC"), solver
        assert plan.server_work == 2.0
        plan = solve(costly, solver)
        assert plan is not None and plan.placement == Placement("CSSSC"), solver
        assert plan.server_work == 3.0 + 2.0  # against 2.0 + 2 x 2.0 for CSCSC


def test_opening_the_session_is_one_round_trip_with_its_bytes_and_no_visit_cost() -> None:
    visited = Link(uplink_bytes_per_s=1000.0, downlink_bytes_per_s=4000.0, rtt_s=0.2,
                   visit_s=0.5)
    assert session_open_s(visited) == 0.2
    assert session_open_s(visited, 250.0, 1000.0) == pytest.approx(0.2 + 0.25 + 0.25)


def test_a_plan_on_the_server_pays_the_sessions_opening_once() -> None:
    """latency = before + session_open_s for every placement with a server unit (whatever its
    visits and passes), nothing for the client-only one; network seconds hold it, server work
    does not: exactly, on costs that add up without rounding (powers of two)."""
    from splitllm.placement import Placement
    from splitllm.planner.instance import Instance, Unit, evaluate

    units = tuple(Unit(name=f"u{i}", client_s=1.0, server_s=0.25, server_work=0.5, out_bytes=0.0)
                  for i in range(5))
    link = Link(uplink_bytes_per_s=1.0, downlink_bytes_per_s=1.0, rtt_s=0.25)
    free = Instance(units=units, link=link, sla_s=100.0, input_bytes=0.0, output_bytes=0.0,
                    passes=4, job_s=0.125, job_work_s=0.0625)
    opening = dataclasses.replace(free, session_open_s=0.375)
    for sides, opened in (("CCCCC", 0), ("SSSSS", 1), ("CSSSC", 1), ("SCSCS", 1), ("CCCCS", 1)):
        before, after = evaluate(free, Placement(sides)), evaluate(opening, Placement(sides))
        assert after.latency_s - before.latency_s == opened * 0.375, sides
        assert after.network_s - before.network_s == opened * 0.375, sides
        assert after.server_work == before.server_work, sides


def test_a_plan_that_fits_its_sla_only_without_the_opening_is_not_chosen() -> None:
    """CCSSC (server work 2, 4.5 s) fits an SLA of 4.75 s alone, not with an opening of 0.5 s:
    then CSSSC (work 3, 2.75 + 0.5 s) is the least work that fits. Under an SLA of 9 s an
    opening of 4 s rules out CCCSC (work 1, 7.25 + 4 s), and under 11 s leaves the client-only
    plan (11 s, no session) as the only one that fits. The exact solver, the MILP, the grid DP,
    the best single cut and the frontier agree with the brute-force spec."""
    from planner_kit import brute_force

    from splitllm.placement import Placement
    from splitllm.planner.instance import Instance, Unit, evaluate
    from splitllm.planner.solvers import frontier, solve

    units = tuple(Unit(name=f"u{i}", client_s=c, server_s=0.25, server_work=1.0, out_bytes=0.0)
                  for i, c in enumerate((1.0, 2.0, 3.0, 4.0, 1.0)))
    link = Link(uplink_bytes_per_s=1.0, downlink_bytes_per_s=1.0, rtt_s=0.0)
    base = Instance(units=units, link=link, sla_s=4.75, input_bytes=0.0, output_bytes=0.0)
    cases = {(4.75, 0.0): "CCSSC", (4.75, 0.5): "CSSSC", (9.0, 0.0): "CCCSC",
             (9.0, 4.0): "CCSSC", (11.0, 4.0): "CCCCC"}
    for (sla_s, open_s), expected in cases.items():
        instance = dataclasses.replace(base, sla_s=sla_s, session_open_s=open_s)
        optimum = brute_force(instance).optimum()
        assert optimum is not None
        best = evaluate(instance, Placement(expected))
        assert (best.server_work, best.latency_s) == optimum
        for solver in ("exact", "milp", "dp-grid", "best-single-cut"):
            plan = solve(instance, solver)
            assert plan is not None and plan.placement == Placement(expected), (solver, sla_s)
        front = frontier(instance)
        assert next(p for p in front if p.feasible).placement == Placement(expected)
        assert front.latency_s.tolist() == [p.latency_s for p in front]
    # what rules CCSSC out under 4.75 s is the opening alone
    opened = dataclasses.replace(base, session_open_s=0.5)
    assert evaluate(opened, Placement("CCSSC")).latency_s == 4.5 + 0.5


def test_a_plan_whose_ttft_fits_only_without_the_opening_is_not_chosen() -> None:
    """The TTFT phase (the prefill) waits for the session's opening like the whole latency: a
    TTFT limit of 2 s takes CCCSC (work 1, TTFT 1.8125 s) without an opening, but with an
    opening of 0.5 s (2.3125 s) it takes CCSSC (work 2, 1.125 + 0.5 s); under a limit of
    2.75 s the client-only plan (2.75 s, no session) fits as it is. The SLA is loose. The
    exact solver, the MILP, the best single cut and the frontier agree with the brute-force
    spec (the grid DP has no phase dimension: it drops the plan that breaks the phase, as
    documented); a TPOT phase (no first token) does not pay the opening."""
    from planner_kit import brute_force

    from splitllm.placement import Placement
    from splitllm.planner.instance import Instance, PhaseLimit, Unit, evaluate
    from splitllm.planner.solvers import frontier, solve

    client = (1.0, 2.0, 3.0, 4.0, 1.0)
    units = tuple(Unit(name=f"u{i}", client_s=c, server_s=0.25, server_work=1.0, out_bytes=0.0)
                  for i, c in enumerate(client))
    link = Link(uplink_bytes_per_s=1.0, downlink_bytes_per_s=1.0, rtt_s=0.0)

    def phase(limit_s: float, first_token: bool) -> PhaseLimit:
        return PhaseLimit(name="ttft" if first_token else "tpot", limit_s=limit_s,
                          client_s=tuple(c / 4 for c in client), server_s=(0.0625,) * 5,
                          out_bytes=(0.0,) * 5, input_bytes=0.0, output_bytes=0.0,
                          pays_session_open=first_token)

    base = Instance(units=units, link=link, sla_s=100.0, input_bytes=0.0, output_bytes=0.0)
    cases = {(2.0, 0.0, True): "CCCSC", (2.0, 0.5, True): "CCSSC", (2.75, 0.5, True): "CCCCC",
             (2.0, 0.5, False): "CCCSC"}
    for (limit_s, open_s, first_token), expected in cases.items():
        instance = dataclasses.replace(base, session_open_s=open_s,
                                       phase_limits=(phase(limit_s, first_token),))
        optimum = brute_force(instance).optimum()
        assert optimum is not None
        best = evaluate(instance, Placement(expected))
        assert (best.server_work, best.latency_s) == optimum
        for solver in ("exact", "milp", "best-single-cut"):
            plan = solve(instance, solver)
            assert plan is not None and plan.placement == Placement(expected), (solver, limit_s)
        assert next(p for p in frontier(instance) if p.feasible).placement == Placement(expected)
        grid = solve(instance, "dp-grid")  # its least work under the SLA alone breaks the phase
        assert grid is None or grid.placement == Placement(expected)
    ttft = dataclasses.replace(base, session_open_s=0.5, phase_limits=(phase(2.0, True),))
    assert evaluate(ttft, Placement("CCCSC")).phase_latency_s == (1.8125 + 0.5,)
    assert evaluate(ttft, Placement("CCCCC")).phase_latency_s == (2.75,)  # opens nothing
