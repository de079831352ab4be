"""Policies on a batched server (a decode step's weight reads are shared by its rows) and the
quantile margin over a request's visits, on hand-made worlds with known answers."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
from sim_kit import NO_LINK, tiny_model, tiny_world

from splitllm.placement import Placement
from splitllm.planner.hardware import DeviceProfile
from splitllm.planner.instance import Plan, evaluate
from splitllm.sim.batching import BatchCost
from splitllm.sim.capacity import Capacity, run_point
from splitllm.sim.load import LoadMeter
from splitllm.sim.policies import Load, PlanPolicy, request_instance, visit_wait_s, wait_bucket
from splitllm.sim.report import verdict_lines
from splitllm.sim.study import SimStudy
from splitllm.sim.world import ServerSpec, World
from splitllm.stepmodel import StepModel, UnitFit

PROMPT, OUTPUT = 4, 3  # a prefill and two decode steps
LOAD_READING = ("exact-load-aware", "exact-quantile", "exact-tuned", "frontier-priced")
# 1000 FLOP/s and 10 kB/s: the block's 2 kB of weights bind a decode step on its own
SERVER = DeviceProfile(name="server", peak_flops_per_s=1000.0, mem_bandwidth_bytes_per_s=1e4,
                       mem_capacity_bytes=1e15, efficiency=1.0)


@pytest.fixture(scope="module")
def batched() -> World:
    """The tiny model with a light block (20 FLOP/token) holding 2 kB of weights, a head of
    50 FLOP/token, a client 10x slower than the server over a free link, SLA 3.8 s: running
    all on the client (4.2 s) misses, so one of the block and the head runs on the server."""
    world = tiny_world((0.0,), prompt=PROMPT, output=OUTPUT, sla_s=3.8)
    embed, block, head = tiny_model().units
    model = replace(tiny_model(), units=(
        embed, replace(block, linear_flops_per_token=20.0, weight_bytes=2000.0), head))
    return replace(world, types=(replace(world.types[0], model=model),),
                   server=ServerSpec(SERVER, "batched"),
                   clients=(replace(world.clients[0], link=NO_LINK),))


def test_a_requests_marginal_work_shares_the_weights_among_the_rows(batched: World) -> None:
    cost = BatchCost(batched)
    solo = request_instance(batched.types[0], batched.clients[0], batched, PROMPT, OUTPUT)
    assert cost.unit_work_s(0, PROMPT, OUTPUT, 1.0) == pytest.approx(
        [u.server_work for u in solo.units])
    # block: prefill max(80 FLOP, 2 kB / 16) = 0.08 s, each decode max(20 FLOP, 125 B) 0.02 s
    assert cost.unit_work_s(0, PROMPT, OUTPUT, 16.0) == pytest.approx([0.0, 0.12, 0.3])


def test_a_measured_step_models_fixed_time_is_shared_among_the_rows(batched: World) -> None:
    measured = StepModel(embed=UnitFit.line(0.001, 0.0001), block=UnitFit.line(0.2, 0.01),
                         head=UnitFit.line(0.05, 0.002), n_blocks=1)
    work = BatchCost(batched, measured).unit_work_s(0, PROMPT, OUTPUT, 4.0)
    passes, tokens = 3, PROMPT + 2  # the head runs one position per pass
    assert work == pytest.approx([0.001 * passes / 4 + 0.0001 * tokens,
                                  0.2 * passes / 4 + 0.01 * tokens,
                                  0.05 * passes / 4 + 0.002 * passes])


def _least_work_feasible(world: World, rows: float) -> Plan:
    """Brute force over every placement, with the server work priced at `rows` per step."""
    base = request_instance(world.types[0], world.clients[0], world, PROMPT, OUTPUT)
    work = BatchCost(world).unit_work_s(0, PROMPT, OUTPUT, rows)
    priced = replace(base, units=tuple(replace(u, server_work=float(w))
                                       for u, w in zip(base.units, work, strict=True)))
    plans = [evaluate(priced, Placement("".join(s))) for s in itertools.product("CS", repeat=3)]
    return min((p for p in plans if p.feasible), key=lambda p: (p.server_work, p.latency_s))


@pytest.mark.parametrize("policy", LOAD_READING)
def test_under_a_big_batch_the_policies_offload_what_saves_marginal_work(
        batched: World, policy: str) -> None:
    """Alone on the server, the block's weight reads are the largest cost: the client takes
    the block. In a batch of 16 the block's weights are shared and its own share is small: the
    client takes the head instead, the plan with least marginal work."""
    plans = PlanPolicy(batched, policy)
    idle = plans.decide(0, 0, PROMPT, OUTPUT, Load(batch_rows=1.0, utilization=1.0))
    busy = plans.decide(0, 0, PROMPT, OUTPUT, Load(batch_rows=16.0, utilization=1.0))
    assert idle.planned and busy.planned
    assert idle.placement.sides[1:] == _least_work_feasible(batched, 1.0).placement.sides[1:]
    assert busy.placement.sides[1:] == _least_work_feasible(batched, 16.0).placement.sides[1:]
    assert (idle.placement.sides[1:], busy.placement.sides[1:]) == ("CS", "SC")


def test_zero_load_planners_keep_the_solo_cost_on_a_batched_server(batched: World) -> None:
    decision = PlanPolicy(batched, "exact").decide(0, 0, PROMPT, OUTPUT,
                                                   Load(batch_rows=16.0))
    assert decision.placement.sides[1:] == "CS"


def test_batched_quantile_margins_cover_the_sum_of_a_requests_visits() -> None:
    """On a batched server, planning every one of n visits at the quantile would plan for n
    independent bad steps in a row: the excess over the mean shrinks as sqrt(n). A queueing
    server's visits meet one backlog: each keeps the whole quantile."""
    q = wait_bucket(0.2)
    batched = Load(wait_quantile_s=q, batch_rows=8.0, utilization=1.0)
    assert visit_wait_s(batched, 1) == q
    assert visit_wait_s(batched, 3) == pytest.approx(q / math.sqrt(3))
    assert visit_wait_s(Load(wait_mean_s=0.1, wait_quantile_s=0.5, batch_rows=2.0),
                        4) == pytest.approx(0.3)
    assert visit_wait_s(Load(wait_mean_s=0.1, wait_quantile_s=0.5), 4) == 0.5
    # the tiny world of test_load_policies: 3 passes, SLA 8 s beside the session's opening (one
    # 0.2 s round trip); CCS meets it with up to 0.127 s at each visit (work 0.3), ?SC with
    # more (work 0.6)
    world = tiny_world((0.0,), prompt=PROMPT, output=OUTPUT, sla_s=8.0 + 0.2)
    base = request_instance(world.types[0], world.clients[0], world, PROMPT, OUTPUT)
    for policy in ("exact-quantile", "exact-tuned", "frontier-priced"):
        plans = PlanPolicy(world, policy)
        chosen = plans.decide(0, 0, PROMPT, OUTPUT, batched)
        assert chosen.placement == Placement("CCS"), policy
        at_sum = evaluate(replace(base, server_wait_s=q / math.sqrt(3)), chosen.placement)
        assert at_sum.feasible
        assert not evaluate(replace(base, server_wait_s=q), chosen.placement).feasible
        queueing = plans.decide(0, 0, PROMPT, OUTPUT, replace(batched, batch_rows=1.0))
        assert queueing.placement.sides[1:] == "SC", policy  # embed is free: C or S


def test_the_meter_reads_the_rows_of_each_jobs_step(batched: World) -> None:
    meter = LoadMeter(batched)
    assert meter.load(0.0).batch_rows == 1.0
    for k in range(60):
        meter.job_done(1.0, 0.0, 0.0, rows=8 if k < 30 else 24)
    assert meter.load(1.0).batch_rows == pytest.approx(16.0)
    assert np.isclose(meter.load(50.0).batch_rows, 16.0)  # a mean: idle time does not move it


def test_a_batched_studys_first_lines_say_what_a_split_saves_there(batched: World) -> None:
    world = replace(batched, policies=("server-only", "exact-load-aware"))
    curve = tuple(run_point(world, p, 0.5) for p in world.policies)
    study = SimStudy(world, (Capacity("server-only", 1.0, 0.9, ()),
                             Capacity("exact-load-aware", 1.5, 0.9, ())), (0.5,), curve)
    lines = verdict_lines(study)
    assert lines[0].startswith("Best splitting policy: exact-load-aware")
    assert lines[-1].startswith("Batched server: a step reads each unit's weights once")
    assert f"{curve[1].server_s_per_request:.3g} server-s per request against server-only's " \
           f"{curve[0].server_s_per_request:.3g}" in lines[-1]
    fcfs = replace(study, world=replace(world, server=replace(world.server, scheduler="fcfs")))
    assert not any(line.startswith("Batched") for line in verdict_lines(fcfs))
