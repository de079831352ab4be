"""Baselines: feasible whenever they answer, never better than `exact`, each as documented."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from planner_kit import brute_force, brute_force_case

from splitllm.placement import Placement
from splitllm.planner.instance import Instance, Plan, evaluate
from splitllm.planner.solvers import BASELINES, solve

CASES = range(0, 500, 3)  # a third of the brute-force cases: every size, limit and pin


@pytest.mark.parametrize("baseline", BASELINES)
def test_baseline_plans_are_feasible(baseline: str) -> None:
    for seed in CASES:
        plan = solve(brute_force_case(seed), baseline)
        assert plan is None or plan.feasible, (seed, plan.violation)


@pytest.mark.parametrize("baseline", BASELINES)
def test_baselines_never_have_less_server_work_than_exact(baseline: str) -> None:
    for seed in CASES:
        instance = brute_force_case(seed)
        plan = solve(instance, baseline)
        best = solve(instance, "exact")
        if plan is not None:
            assert best is not None, seed
            assert plan.server_work >= best.server_work * (1 - 1e-9) - 1e-12, seed


@pytest.mark.parametrize(("baseline", "side"), [("server-only", "S"), ("client-only", "C")])
def test_uniform_baseline_answers_exactly_when_its_placement_is_feasible(
    baseline: str, side: str
) -> None:
    for seed in CASES:
        instance = brute_force_case(seed)
        bf = brute_force(instance)
        row = bf.row_of(side * len(instance))
        plan = solve(instance, baseline)
        assert (plan is not None) == bool(bf.feasible()[row]), seed
        if plan is not None:
            assert plan.placement.sides == side * len(instance)


def single_cut_rows(on_server: np.ndarray) -> np.ndarray:
    """[N] bool: placements C^a S^b C^c (the server units are contiguous, maybe none)."""
    padded = np.pad(on_server, ((0, 0), (1, 0)))  # the input starts on the client
    ups = np.sum(padded[:, 1:] & ~padded[:, :-1], axis=1)
    return ups <= 1


def test_best_single_cut_matches_brute_force_over_the_single_cut_family() -> None:
    for seed in CASES:
        instance = brute_force_case(seed)
        bf = brute_force(instance)
        ok = bf.feasible() & single_cut_rows(bf.on_server)
        plan = solve(instance, "best-single-cut")
        assert (plan is not None) == bool(ok.any()), seed
        if plan is None:
            continue
        assert plan.placement.switches <= 2
        work = bf.server_work[ok].min()
        assert math.isclose(plan.server_work, work, rel_tol=1e-9, abs_tol=1e-12), seed
        ties = ok & (bf.server_work <= work * (1 + 1e-9))
        assert math.isclose(plan.latency_s, bf.latency_s[ties].min(), rel_tol=1e-9), seed


def documented_greedy(instance: Instance) -> Plan | None:
    """_greedy's docstring, step by step (ties: larger saving, then the earlier unit)."""
    sides = ["S" if u.server_ok else "C" for u in instance.units]  # all on the server
    current = evaluate(instance, Placement("".join(sides)))
    while True:
        moves = []
        for i, unit in enumerate(instance.units):
            if sides[i] == "C" or not unit.client_ok:
                continue
            trial = evaluate(instance, Placement("".join([*sides[:i], "C", *sides[i + 1:]])))
            if trial.client_mem_bytes > instance.client_mem_limit_bytes:
                continue
            if trial.latency_s > max(instance.sla_s, current.latency_s) * (1 + 1e-9):
                continue
            added_s = trial.latency_s - current.latency_s
            rate = math.inf if added_s <= 0 else unit.server_work / added_s
            moves.append(((rate, unit.server_work, -i), trial))
        if not moves:
            return current if current.feasible else None
        current = max(moves, key=lambda move: move[0])[1]
        sides = list(current.placement.sides)


def test_greedy_follows_its_documented_definition() -> None:
    checked = 0
    for seed in CASES:
        instance = brute_force_case(seed)
        # Every unit saves some work (as in model instances): a zero-work move is skipped by
        # _greedy but not mentioned in its docstring.
        if any(u.server_work <= 0 for u in instance.units):
            continue
        expected = documented_greedy(instance)
        plan = solve(instance, "greedy")
        assert (plan is None) == (expected is None), seed
        if plan is not None and expected is not None:
            assert plan.placement == expected.placement, seed
        checked += 1
    assert checked >= 60


def test_greedy_never_moves_a_unit_pinned_to_the_server() -> None:
    instance = brute_force_case(7)
    units = tuple(dataclasses.replace(u, client_ok=i % 2 == 0)
                  for i, u in enumerate(instance.units))
    free = dataclasses.replace(instance, units=units, sla_s=math.inf, phase_limits=())
    plan = solve(free, "greedy")
    assert plan is not None
    assert all(side == "S" for side, u in zip(plan.placement.sides, units, strict=True)
               if not u.client_ok)
