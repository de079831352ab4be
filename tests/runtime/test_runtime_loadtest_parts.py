"""`splitllm loadtest` without a server: the arrival schedule, policy choice, the metrics'
arithmetic and the capacity search against a fake server whose step time is known (virtual
time: no wall clock anywhere)."""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from splitllm.placement import Placement
from splitllm.planner.hardware import device_preset, link_preset
from splitllm.planner.instance import evaluate
from splitllm.runtime.loadtest import (
    Outcome,
    Probe,
    ServerLoad,
    certainly_failed,
    noise_band,
    probed,
    run_record,
    run_study,
    search_capacity,
    server_job_s,
)
from splitllm.runtime.loadtest_report import budget_note
from splitllm.runtime.loadtest_world import (
    LoadtestSpec,
    Probed,
    as_probed,
    emulated_slowdown,
    idle_server_only_s,
    loadtest_world,
    scaled_step_model,
    scenario_requests,
    served_costs,
    speed_factors,
    with_step_model,
)
from splitllm.runtime.metrics import ServerMetrics, parse_metrics
from splitllm.sim.capacity import find_capacity, run_point
from splitllm.sim.client_host import ClientHost
from splitllm.sim.load import LoadMeter, finished_met
from splitllm.sim.metrics import RunMetrics, summarize
from splitllm.sim.policies import Load, PlanPolicy, request_instance
from splitllm.sim.run import run_policy
from splitllm.sim.scenario import parse_scenario, resolve
from splitllm.sim.workload import sample_workload
from splitllm.sim.world import World
from splitllm.stepmodel import StepModel, UnitFit

CONFIG: dict[str, object] = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
    "vocab_size": 320, "max_position_embeddings": 512}
STEP = StepModel(embed=UnitFit.line(1e-4, 1e-6), block=UnitFit.line(2e-3, 1e-4),
                 head=UnitFit.line(1e-3, 1e-4), n_blocks=4)
SERVER = device_preset("laptop")


def scenario(arrivals: dict[str, Any] | None = None, **extra: Any) -> World:
    return resolve(parse_scenario({
        "name": "t", "seed": 3, "duration_s": 60,
        "server": {"device": "datacenter-gpu"},
        "clients": [{"name": "phone", "device": "phone", "link": "4g"},
                    {"name": "box", "device": "edge-box", "link": "lan"}],
        "request_types": [{"name": "chat", "model": "llama-3-8b", "sla_s": 10,
                           "prompt_tokens": {"dist": "uniform", "low": 100, "high": 1000},
                           "output_tokens": {"dist": "uniform", "low": 10, "high": 100}}],
        "arrivals": arrivals or {"process": "poisson", "rate_per_s": 2.0}, **extra}, "t"))


def world_of(base: World, step: StepModel = STEP, **spec: Any) -> World:
    world, _ = loadtest_world(base, config=CONFIG, context_tokens=512, this_machine=SERVER,
                              step=step, spec=LoadtestSpec(**{"requests": 20, **spec}))
    return world


def test_poisson_schedule_is_seeded_and_its_time_axis_scales_with_the_rate() -> None:
    world = world_of(scenario(), length_scale=0.1)
    slow, fast = sample_workload(world.with_rate(1.0)), sample_workload(world.with_rate(4.0))
    assert len(slow) == len(fast) == 20
    np.testing.assert_allclose(fast.arrived_at_s * 4.0, slow.arrived_at_s)
    assert np.array_equal(slow.prompt_tokens, fast.prompt_tokens)
    again = sample_workload(world_of(scenario(), length_scale=0.1).with_rate(1.0))
    assert np.array_equal(again.arrived_at_s, slow.arrived_at_s)  # seeded
    other = sample_workload(world_of(scenario(seed=4), length_scale=0.1).with_rate(1.0))
    assert not np.array_equal(other.arrived_at_s, slow.arrived_at_s)
    drawn = scenario_requests(scenario(), 20)  # the scenario's own requests, then scaled
    assert np.array_equal(slow.prompt_tokens, np.rint(drawn.prompt_tokens * 0.1))
    assert np.array_equal(slow.output_tokens, np.rint(drawn.output_tokens * 0.1))
    gaps = np.diff(drawn.arrived_at_s)
    assert 0.3 < gaps.mean() < 1.0  # Poisson at the scenario's 2 req/s, before scaling


def test_trace_arrivals_replay_with_time_scaling(tmp_path: Path) -> None:
    csv = tmp_path / "trace.csv"
    times = [0.0, 1.0, 1.5, 4.0, 9.0]
    csv.write_text("arrived_at_s,request_type,prompt_tokens,output_tokens\n" + "".join(
        f"{t},chat,{100 * (i + 1)},{10 * (i + 1)}\n" for i, t in enumerate(times)))
    world = world_of(scenario({"process": "trace", "path": str(csv)}), requests=5,
                     length_scale=0.5, sla_s=1.0)  # arrivals span at least 3 SLAs: 3 s
    one_replay = np.array(times) / (9.0 * 5 / 4)  # the trace's shape, 5 requests per unit
    slow = sample_workload(world.with_rate(0.5))  # one replay lasts 10 s: once
    np.testing.assert_allclose(slow.arrived_at_s, one_replay * 10.0)
    assert slow.prompt_tokens.tolist() == [50, 100, 150, 200, 250]
    assert slow.output_tokens.tolist() == [5, 10, 15, 20, 25]
    fast = sample_workload(world.with_rate(2.0))  # 2.5 s a replay: again until 3 s
    np.testing.assert_allclose(fast.arrived_at_s, [*one_replay * 2.5, 2.5, *2.5 + one_replay[
        1:3] * 2.5])
    assert fast.prompt_tokens.tolist() == [50, 100, 150, 200, 250, 50, 100, 150]


def test_lengths_stay_within_the_context_and_slas_follow_the_device_profile() -> None:
    world = world_of(scenario(), length_scale=10.0, sla_factor=2.0)
    load = sample_workload(world.with_rate(1.0))
    assert (load.prompt_tokens + load.output_tokens <= 512).all()
    p_max, g_max = int(load.prompt_tokens.max()), int(load.output_tokens.max())
    assert g_max == 256  # capped at half the context
    slowest = link_preset("4g")
    costs = served_costs(CONFIG)
    idle_s = idle_server_only_s(costs, SERVER, slowest, p_max, g_max)
    assert world.types[0].sla_s == pytest.approx(2.0 * idle_s)
    # the roofline's server-only latency: a round trip per pass, and each decode pass reads
    # every weight once at the device's memory bandwidth
    weights = sum(u.weight_bytes for u in costs.units)
    assert idle_s > g_max * slowest.rtt_s + (g_max - 1) * weights / SERVER.mem_bandwidth_bytes_per_s
    # the server's step model (timed at its start, different each run) does not move the SLA
    slower = replace(STEP, block=UnitFit.line(2e-2, 1e-3))
    again = loadtest_world(scenario(), config=CONFIG, context_tokens=512, this_machine=SERVER,
                           step=slower, spec=LoadtestSpec(requests=20, length_scale=10.0,
                                                          sla_factor=2.0))[0]
    assert again.types[0].sla_s == world.types[0].sla_s
    assert world.server.scheduler == "batched" and world.server.step_model == STEP
    assert world_of(scenario(), sla_s=7.0).types[0].sla_s == 7.0


def test_clients_are_emulated_at_the_scenarios_speed_ratio() -> None:
    costs = served_costs(CONFIG)
    phone, gpu = device_preset("phone"), device_preset("datacenter-gpu")
    ratio = emulated_slowdown(costs, phone, gpu, 64, 8)
    assert ratio > 10  # a phone is far slower than a datacenter GPU
    assert emulated_slowdown(costs, gpu, gpu, 64, 8) == pytest.approx(1.0)
    assert emulated_slowdown(costs, gpu, phone, 64, 8) == 1.0  # never faster than this machine
    _, classes = loadtest_world(scenario(), config=CONFIG, context_tokens=512,
                                this_machine=SERVER, step=STEP, spec=LoadtestSpec(requests=4))
    assert [c.link.name for c in classes] == ["4g", "lan"]
    assert classes[0].slowdown > 1


def metrics_page(wait_sum_s: float, waits: int, busy_s: float) -> dict[str, float]:
    return {"splitllm_engine_queue_wait_seconds_sum": wait_sum_s,
            "splitllm_engine_queue_wait_seconds_count": waits,
            "splitllm_server_busy_seconds_total": busy_s}


def server_load(headroom: float = 0.1, target: float = 0.9) -> ServerLoad:
    return ServerLoad(tau_s=2.0, quantile=0.9, headroom=headroom, target=target)


def test_the_reported_queue_wait_is_what_load_aware_policies_read() -> None:
    load = server_load()
    assert load.load() == Load(headroom=0.1, tuned_headroom=0.1)
    load.update(0.0, metrics_page(1.0, 10, 5.0))
    load.update(1.0, metrics_page(4.0, 20, 5.5))  # 10 forwards waited 3 s: 0.3 s each
    assert load.load().wait_mean_s == pytest.approx(0.3)
    # a server without the histogram's buckets: the mean stands for the quantile
    assert load.load().wait_quantile_s == pytest.approx(0.3)
    assert load.load().utilization == pytest.approx(0.5 * (1 - math.exp(-0.5)))
    load.update(3.0, metrics_page(4.0, 20, 5.5))  # no forwards for 2 s: it shrinks by e^-1
    assert load.load().wait_mean_s == pytest.approx(0.3 * math.exp(-1.0))
    assert load.load().batch_rows == 1.0  # no steps reported: one row


def test_the_real_load_tests_queue_waits_read_as_the_simulators_meter_reads_them() -> None:
    """One meter: the waits the engine reports on /metrics (its histogram on the meter's grid)
    give the load test's policies the mean and the quantile the simulator's meter gives."""
    world = world_of(scenario(), length_scale=0.05)
    meter = LoadMeter(world)
    load = ServerLoad(tau_s=world.wait_tau_s, quantile=world.wait_quantile,
                      headroom=world.plan_headroom, target=world.headroom_target)
    metrics = ServerMetrics(["block0"])
    load.update(0.0, parse_metrics(metrics.render(0, 0)))
    rng = np.random.default_rng(3)
    for now_s in (1.0, 2.5, 3.0):
        waits_s = [*rng.lognormal(math.log(0.03), 1.0, size=40), 0.0, 5e-5]
        metrics.record_step([], rows=len(waits_s), tokens=len(waits_s), wall_s=0.01,
                            cpu_s=0.01, queue_waits_s=waits_s)
        for wait_s in waits_s:
            meter.job_done(now_s, wait_s, busy_s=0.001)
        load.update(now_s, parse_metrics(metrics.render(0, 0)))
        seen, expected = load.load(), meter.load(now_s)
        assert seen.wait_mean_s == pytest.approx(expected.wait_mean_s, rel=1e-9)
        assert seen.wait_quantile_s == pytest.approx(expected.wait_quantile_s, rel=1e-9)
        assert seen.wait_quantile_s > 1.2 * seen.wait_mean_s  # a spread: not the mean
    load.update(4.5, parse_metrics(metrics.render(0, 0)))  # idle since 3.0: both shrink
    assert load.load().wait_quantile_s == pytest.approx(meter.load(4.5).wait_quantile_s)
    assert load.load().wait_mean_s == pytest.approx(meter.load(4.5).wait_mean_s)


def test_the_tuned_headroom_learns_from_finished_requests_as_the_simulators_meter() -> None:
    """One definition of the tuning: the real load test steers the headroom that exact-tuned
    and frontier-priced plan with exactly as the simulator's meter does."""
    world = world_of(scenario(), length_scale=0.05)
    meter, load = LoadMeter(world), server_load(world.plan_headroom, world.headroom_target)
    outcomes = [False] * 12 + [True] * 30 + [False] * 3
    for met in outcomes:
        meter.request_done(met)
        load.request_done(met)
        assert load.load().tuned_headroom == meter.tuned_headroom
    assert load.load().headroom == world.plan_headroom  # the fixed one does not move
    assert load.load().tuned_headroom > world.plan_headroom  # 15 misses in 45: above 10%
    # a request met its limits by its own times: its latency within the SLA
    rtype = world.types[0]
    assert finished_met(rtype, 0.1, rtype.sla_s, 5)
    assert not finished_met(rtype, 0.1, rtype.sla_s * 1.01, 5)


def test_load_aware_policies_read_the_rows_per_engine_step() -> None:
    """As the simulator's meter gives them: the batch a batched server's work is priced at."""
    load = server_load()
    rows = "splitllm_engine_step_rows"
    load.update(0.0, {rows + "_sum": 10.0, rows + "_count": 10.0})
    load.update(1.0, {rows + "_sum": 50.0, rows + "_count": 20.0})  # 40 rows in 10 steps
    assert load.load().batch_rows == pytest.approx(4.0)
    keep = math.exp(-0.5)
    load.update(2.0, {rows + "_sum": 60.0, rows + "_count": 30.0})  # then 10 rows in 10 steps
    assert load.load().batch_rows == pytest.approx((keep * 40 + 10) / (keep * 10 + 10))


def test_the_servers_cpu_per_forward_outside_its_steps_from_two_metrics_pages() -> None:
    def page(process_s: float, steps_s: float, forwards: int) -> dict[str, float]:
        return {"process_cpu_seconds_total": process_s,
                "splitllm_server_cpu_seconds_total": steps_s, "splitllm_forwards_total": forwards}

    # 40 forwards: 2.0 s of the process's CPU, 1.6 s of it in steps: 10 ms each outside them
    assert server_job_s(page(10.0, 7.0, 100), page(12.0, 8.6, 140)) == pytest.approx(0.01)
    assert server_job_s(page(10.0, 7.0, 100), page(10.5, 7.0, 100)) == 0.0  # no forwards
    assert server_job_s({}, {}) == 0.0  # a server without the counters: unmeasured


def test_policy_choice_under_the_reported_load() -> None:
    fast = StepModel(embed=UnitFit.line(1e-7, 1e-9), block=UnitFit.line(1e-6, 1e-8),
                     head=UnitFit.line(1e-6, 1e-8), n_blocks=4)  # the planner plans with it
    world = world_of(scenario(), step=fast, length_scale=0.05)
    n = len(world.types[0].model.units)  # type: ignore[union-attr]
    instance = request_instance(world.types[0], world.clients[1], world, 30, 4)
    on_client = evaluate(instance, Placement("C" * n)).latency_s
    on_server = evaluate(instance, Placement("S" * n)).latency_s
    assert on_server < on_client  # the emulated edge box is slower than this server
    sla_s = (on_server + on_client) / 2  # all on the client misses it, all on the server not
    world = replace(world, types=(replace(world.types[0], sla_s=sla_s),))
    assert PlanPolicy(world, "server-only").decide(0, 1, 30, 4).placement.sides == "S" * n
    exact = PlanPolicy(world, "exact").decide(0, 1, 30, 4)
    aware = PlanPolicy(world, "exact-load-aware")
    assert aware.decide(0, 1, 30, 4, Load()).placement == exact.placement
    assert "S" in exact.placement.sides and exact.planned
    # a reported queue wait longer than the SLA at every visit: no plan with the server meets
    # it, so the request's work goes off the server (it misses anyway)
    swamped = aware.decide(0, 1, 30, 4, Load(wait_mean_s=60.0))
    assert swamped.placement.sides == "C" * n and not swamped.planned


def outcome(first: float, done: float, cpu: float = 0.1) -> Outcome:
    return Outcome(first_token_s=first, finished_s=done, server_cpu_s=cpu, placement="SSS",
                   planned=True)


def test_metrics_arithmetic_of_a_probe() -> None:
    world = replace(world_of(scenario(), requests=4, sla_s=2.0), duration_s=4.0)
    load = sample_workload(world.with_rate(1.0))
    load = replace(load, arrived_at_s=np.array([0.0, 1.0, 2.0, 3.0]),
                   output_tokens=np.array([3, 3, 3, 1]))
    outcomes = [outcome(0.5, 1.5), outcome(0.2, 1.0), outcome(1.0, 3.0), outcome(0.4, math.nan)]
    record = run_record("exact", 1.0, load, outcomes, horizon_s=4.0, busy_s=2.0,
                        queue_wait_mean_s=0.05, busy_total_s=2.6)
    m = summarize(world, record)
    assert m.requests == 4 and m.completed == 3
    assert m.sla_attainment == 0.5  # 1.5 s and 1.0 s met 2 s; 3.0 s did not; one never ended
    assert m.goodput_per_s == pytest.approx(2 / 4)  # both finished inside [0, 4)
    assert m.throughput_per_s == pytest.approx(2 / 4)  # the third finished at 5.0, after it
    assert m.ttft_s == (0.5, 1.0, 1.0)  # p50, p90, p99 of 0.2, 0.4, 0.5, 1.0 ("higher")
    assert m.tpot_s == (0.5, 1.0, 1.0)  # (1.5-0.5)/2, (1.0-0.2)/2, (3-1)/2
    # busy within the window, as the simulator counts it (not the drain after it)
    assert m.utilization == pytest.approx(0.5) and m.job_delay_mean_s == 0.05
    assert (record.busy_window_s, record.busy_total_s) == (2.0, 2.6)
    assert m.server_s_per_request == pytest.approx(0.1)


def fake_metrics(rate: float, attainment: float, requests: int = 10) -> RunMetrics:
    nan3 = (math.nan,) * 3
    return RunMetrics(policy="p", rate_per_s=rate, requests=requests, completed=requests,
                      throughput_per_s=rate, goodput_per_s=rate * attainment,
                      sla_attainment=attainment, server_s_per_request=0.0, utilization=0.0,
                      ttft_s=nan3, tpot_s=nan3, latency_s=nan3, client_unit_share=0.0,
                      fallback_share=0.0, job_delay_mean_s=0.0, events=0,
                      attainment_by_type=(), server_s_by_type=(), client_share_by_unit=())


def test_capacity_search_brackets_then_bisects_to_the_tolerance() -> None:
    probed: list[float] = []

    def probe(rate: float, left_s: float) -> Probe:
        probed.append(rate)
        return Probe(metrics=fake_metrics(rate, 1.0 if rate <= 3.7 else 0.5),
                     process_cpu_s_per_request=0.1, wall_s=1.0)

    found = search_capacity("p", probe, first_rate_per_s=1.0, target=0.9, rel_tol=0.05,
                            deadline_s=math.inf, clock=lambda: 0.0)
    assert probed[:3] == [1.0, 2.0, 4.0]  # doubled until 4 failed
    assert 3.7 / 1.05 <= found.rate_per_s <= 3.7 < found.lowest_failed_per_s
    assert found.lowest_failed_per_s / found.rate_per_s - 1 <= 0.05 and not found.cut_short
    start_high = search_capacity("p", probe, first_rate_per_s=100.0, target=0.9, rel_tol=0.05,
                                 deadline_s=math.inf, clock=lambda: 0.0)
    assert 3.7 / 1.05 <= start_high.rate_per_s <= 3.7  # halved until one worked


def test_the_measured_capacity_is_the_crossing_within_the_last_bracket() -> None:
    """Attainment falling linearly in log rate, through 90% at 3.7 req/s: whatever rates the
    search's grid lands on, the interpolated crossing is 3.7 exactly (the highest good rate
    alone is up to one --rel-tol step below it)."""
    def probe(rate: float, left_s: float) -> Probe:
        attainment = min(max(0.9 - 0.4 * math.log(rate / 3.7), 0.0), 1.0)
        return Probe(metrics=fake_metrics(rate, attainment, 1000),
                     process_cpu_s_per_request=0.1, wall_s=1.0)

    for first, rel_tol in ((1.0, 0.1), (2.9, 0.1), (100.0, 0.3)):
        found = search_capacity("p", probe, first_rate_per_s=first, target=0.9,
                                rel_tol=rel_tol, deadline_s=math.inf, clock=lambda: 0.0)
        assert found.rate_per_s < 3.7 < found.lowest_failed_per_s
        assert found.crossing_per_s == pytest.approx(3.7)
        assert found.bracket.good_attainment == found.attainment > 0.9
        assert found.bracket.bad_attainment == found.failed_attainment < 0.9


def test_the_noise_band_of_a_probes_verdict_and_when_it_may_stop_early() -> None:
    # one binomial standard error at the target: sqrt(0.9 * 0.1 / n)
    assert noise_band(100, 0.9) == pytest.approx(0.03)
    assert noise_band(400, 0.9) == pytest.approx(0.015)
    # 96 requests: 9.6 misses are the target, 2.94 more are chance
    assert not certainly_failed(12, 96, 0.9) and certainly_failed(13, 96, 0.9)
    assert certainly_failed(1, 1, 0.9) and not certainly_failed(0, 1, 0.9)


def test_a_rate_within_the_noise_is_probed_again_and_judged_on_its_requests_pooled() -> None:
    """At 4 req/s a probe of 100 requests reads 91% (within 3 points of 90%: undecided), its
    repeats 86% and 87%: pooled, 88% of 300 requests, a failure. Rates far from the target
    are probed once; the capacity's attainment is its probes' pooled."""
    readings = {2.0: [1.0], 4.0: [0.91, 0.86, 0.87], 2.828: [0.95]}
    probed: list[float] = []

    def probe(rate: float, left_s: float) -> Probe:
        probed.append(rate)
        return Probe(metrics=fake_metrics(rate, readings[round(rate, 3)].pop(0), 100),
                     process_cpu_s_per_request=0.1, wall_s=1.0)

    found = search_capacity("p", probe, first_rate_per_s=2.0, target=0.9, rel_tol=0.5,
                            deadline_s=math.inf, clock=lambda: 0.0)
    assert probed == [2.0, 4.0, 4.0, 4.0, pytest.approx(math.sqrt(8.0))]
    assert found.lowest_failed_per_s == 4.0 and not found.cut_short
    assert found.rate_per_s == pytest.approx(math.sqrt(8.0)) and found.attainment == 0.95
    assert len(found.probes) == 5


def test_a_probe_that_other_work_disturbed_and_failed_is_run_again_and_counts_for_nothing(
) -> None:
    """At 4 req/s other work took 0.8 then 0.6 cores and the probes failed: both are run again
    (the second repeat, quiet, passes and counts); at 8 req/s a disturbed failure is run
    again twice, and the third, still disturbed, counts; a disturbed pass counts at once."""
    readings = {2.0: [(1.0, 0.5)], 4.0: [(0.5, 0.8), (0.6, 0.6), (0.95, 0.0)],
                8.0: [(0.5, 0.9), (0.5, 0.9), (0.5, 0.9)], 5.657: [(0.95, 0.7)]}

    def probe(rate: float, left_s: float) -> Probe:
        attainment, foreign = readings[round(rate, 3)].pop(0)
        return Probe(metrics=fake_metrics(rate, attainment, 100), process_cpu_s_per_request=0.1,
                     wall_s=1.0, foreign_cores=foreign)

    found = search_capacity("p", probe, first_rate_per_s=2.0, target=0.9, rel_tol=0.5,
                            deadline_s=math.inf, clock=lambda: 0.0)
    assert [(p.rate_per_s, p.repeated) for p in found.probes] == [
        (2.0, False), (4.0, True), (4.0, True), (4.0, False), (8.0, True), (8.0, True),
        (8.0, False), (pytest.approx(math.sqrt(32.0)), False)]
    assert found.rate_per_s == pytest.approx(math.sqrt(32.0)) and found.attainment == 0.95
    assert found.lowest_failed_per_s == 8.0 and found.failed_attainment == 0.5
    assert all(p.disturbed for p in found.probes[4:]) and not found.probes[3].disturbed
    # what the repeated probes measured of the machine does not count either
    assert [p.rate_per_s for p in probed(found.probes)] == [2.0, 4.0, 8.0,
                                                           pytest.approx(math.sqrt(32.0))]
    quiet = Probe(metrics=fake_metrics(1.0, 0.5), process_cpu_s_per_request=0.1, wall_s=1.0)
    assert not quiet.disturbed  # nan: not known, not disturbed


def test_a_repeat_that_the_time_budget_leaves_no_room_for_ends_the_search() -> None:
    clock = [0.0]

    def probe(rate: float, left_s: float) -> Probe:
        clock[0] += 10.0  # a probe takes 10 s; the budget is 15 s
        return Probe(metrics=fake_metrics(rate, 0.91, 100), process_cpu_s_per_request=0.1,
                     wall_s=10.0)

    found = search_capacity("p", probe, first_rate_per_s=2.0, target=0.9, rel_tol=0.1,
                            deadline_s=15.0, clock=lambda: clock[0])
    # 91% of 100 is undecided; its repeat (again 91%) is undecided too, and no third fits
    assert len(found.probes) == 2 and found.cut_short
    assert found.rate_per_s == 0.0 and math.isinf(found.lowest_failed_per_s)


class FakeServer:
    """Server-only requests on one FCFS server whose step time is known, in virtual time: the
    probe's wall time advances a fake clock."""

    def __init__(self, world: World, speed: float = 1.0) -> None:
        self.world = world
        self.now_s = 0.0
        self.probes = 0
        self.speed = speed  # its steps take this many times STEP's

    def service_s(self, prompt: int, output: int) -> float:
        return self.speed * (STEP.step_s(prompt, 1) + (output - 1) * STEP.step_s(1, 1))

    def probe(self, policy: str, rate: float, left_s: float = math.inf) -> Probe:
        world = self.world.with_rate(rate)
        load = sample_workload(world)
        free_s, outcomes = 0.0, []
        for at_s, p, g in zip(load.arrived_at_s, load.prompt_tokens, load.output_tokens,
                              strict=True):
            start_s = max(free_s, float(at_s))
            free_s = start_s + self.service_s(int(p), int(g))
            outcomes.append(outcome(start_s + self.speed * STEP.step_s(int(p), 1) - at_s,
                                    free_s - at_s, self.service_s(int(p), int(g))))
        record = run_record(policy, rate, load, outcomes, horizon_s=world.horizon_s,
                            busy_s=0.0, queue_wait_mean_s=0.0)
        wall_s = free_s + 1.0
        self.now_s += wall_s
        self.probes += 1
        return Probe(metrics=summarize(world, record), process_cpu_s_per_request=0.1,
                     wall_s=wall_s, server_wall_s_per_request=float(np.mean(
                         [o.server_cpu_s for o in outcomes])))


def test_study_against_a_fake_server_with_known_step_time() -> None:
    world = replace(world_of(scenario(), requests=80, length_scale=0.05, sla_s=0.15,
                             rel_tol=0.05), policies=("server-only",))
    server = FakeServer(world)
    lines: list[str] = []
    [result] = run_study(world, server.probe, budget_s=1e6, clock=lambda: server.now_s,
                         progress=lines.append)
    found = result.measured
    load = sample_workload(world.with_rate(1.0))
    saturation = 1 / float(np.mean([server.service_s(int(p), int(g)) for p, g in
                                    zip(load.prompt_tokens, load.output_tokens, strict=True)]))
    # 80 requests and an SLA of a few service times: close to the steady state, where no
    # rate beyond the server's service rate keeps requests within their SLA
    assert 0.5 * saturation < found.rate_per_s < 1.2 * saturation
    assert server.probe("server-only", found.rate_per_s).metrics.sla_attainment >= 0.9
    assert server.probe("server-only", found.lowest_failed_per_s).metrics.sla_attainment < 0.9
    assert found.lowest_failed_per_s / found.rate_per_s - 1 <= 0.05
    assert result.at_capacity is not None and result.at_capacity.rate_per_s == found.rate_per_s
    assert any("measured capacity" in line for line in lines)


def test_the_prediction_runs_at_the_speeds_the_probes_measured() -> None:
    """After a policy's measured search, the simulator runs again with the server's step model
    scaled to the server's seconds per request its probes measured (a server 1.5x slower
    than its start-of-run model: less capacity): that is the prediction; the start-of-run
    one, where the search began, stays beside it."""
    world = replace(world_of(scenario(), requests=20, length_scale=0.05, sla_s=1.0,
                             rel_tol=0.1), policies=("server-only",))
    server = FakeServer(world, speed=1.5)
    [result] = run_study(world, server.probe, budget_s=1e6, clock=lambda: server.now_s,
                         progress=lambda line: None)
    start = find_capacity(world, "server-only").crossing_per_s
    assert result.simulated_start.crossing_per_s == start and not math.isnan(start)
    # the fake runs each request alone (FCFS), the simulated server batches them and charges
    # each its share of a step: the measured seconds read at least the 1.5x
    assert result.simulated_on_probes and result.server_factor > 1.5
    scaled = with_step_model(world, scaled_step_model(STEP, result.server_factor))
    assert result.simulated_per_s == find_capacity(scaled, "server-only").crossing_per_s
    assert 0 < result.simulated_per_s < start
    # and that world at each probe's rate, the same requests: the probe-by-probe comparison
    assert result.simulated_probes == tuple(
        run_point(scaled, "server-only", p.rate_per_s) for p in result.measured.probes)
    assert len(result.probe_errors()) == len(result.measured.probes)
    # no probe ran to its end: the prediction stays the start-of-run one
    cut = FakeServer(world)

    def cut_off(policy: str, rate: float, left_s: float) -> Probe:
        return replace(cut.probe(policy, rate), stopped_early=True)

    [bare] = run_study(world, cut_off, budget_s=1e6, clock=lambda: cut.now_s,
                       progress=lambda line: None)
    assert not bare.simulated_on_probes and bare.simulated_per_s == start


def test_a_probe_compares_with_the_simulator_the_seconds_it_charges_a_request() -> None:
    """The simulator charges a request its share of the steps and, per forward, the
    server's CPU outside them (the world's `job_s` holds both): what a probe measured of the
    server, for the speed factors, is the same sum (the steps' share alone read 4-6% under
    it); a server that does not report its CPU outside the steps counts the steps only."""
    probe = Probe(metrics=fake_metrics(1.0, 0.95), process_cpu_s_per_request=0.2, wall_s=10.0,
                  server_wall_s_per_request=0.12, server_job_s=0.003,
                  server_visits_per_request=2.5)
    assert probe.server_s_per_request == pytest.approx(0.12 + 0.003 * 2.5)
    [seen] = probed([probe])
    assert seen.server_s_per_request == pytest.approx(0.1275)
    unreported = replace(probe, server_job_s=math.nan)
    assert unreported.server_s_per_request == 0.12


def test_the_speed_factors_are_the_median_ratios_of_measured_to_simulated() -> None:
    world = replace(world_of(scenario(), requests=20, length_scale=0.05, sla_s=1.0),
                    client_host=ClientHost(cores=1.0, cpu_per_client_s=(2.0, 2.0),
                                           cpu_per_visit_s=0.001))
    policy = "fixed:CCSSSC"
    probes = []
    for rate, server, clients in ((0.5, 1.2, 0.7), (1.0, 1.5, 0.8), (2.0, 1.4, 0.9)):
        at_rate = world.with_rate(rate)
        record = run_policy(at_rate, policy)
        probes.append(Probed(rate_per_s=rate, server_s_per_request=server * summarize(
            at_rate, record).server_s_per_request, client_cpu_s=clients
            * record.client_cores_busy_s))
    assert speed_factors(world, policy, probes) == pytest.approx((1.4, 0.8))
    assert speed_factors(world, policy, []) == (1.0, 1.0)
    probed = as_probed(world, 2.0, 0.5)
    assert probed.server.step_model == scaled_step_model(STEP, 2.0)
    assert probed.server.step_model.step_s(8, 2) == pytest.approx(2 * STEP.step_s(8, 2))
    assert probed.client_host == ClientHost(cores=1.0, cpu_per_client_s=(1.0, 1.0),
                                            cpu_per_visit_s=0.0005)


def test_the_speed_factors_replay_the_probes_own_placements() -> None:
    """A load-reading policy chooses by the load it meets: the simulator's choices at a
    probe's rate need not be the real clients'. The factors compare the same work: each
    probe's placements, request by request, replayed in the simulated run."""
    world = world_of(scenario(), requests=20, length_scale=0.05, sla_s=1.0)
    policy = "frontier-priced"
    n = len(sample_workload(world.with_rate(1.0)))
    ran = tuple(("SSSSSS", "CSSSSS", "CCSSSC")[r % 3] for r in range(n))
    replayed = run_policy(world.with_rate(1.0), policy, replayed=ran)
    assert [replayed.placements[i] for i in replayed.placement_index] == list(ran)
    own = run_policy(world.with_rate(1.0), policy)
    assert [own.placements[i] for i in own.placement_index] != list(ran)
    measured = 1.3 * summarize(world.with_rate(1.0), replayed).server_s_per_request
    probe = Probed(rate_per_s=1.0, server_s_per_request=measured, client_cpu_s=math.nan,
                   placements=ran)
    assert speed_factors(world, policy, [probe])[0] == pytest.approx(1.3)
    with pytest.raises(ValueError, match="placements replayed"):
        run_policy(world.with_rate(1.0), policy, replayed=ran[1:])


def test_the_search_stops_at_its_time_budget() -> None:
    world = replace(world_of(scenario(), requests=10, length_scale=0.05, sla_s=1.0,
                             rel_tol=0.01), policies=("server-only", "exact"))
    server = FakeServer(world)
    clock = [0.0]
    told: list[float] = []

    def probe(policy: str, rate: float, left_s: float) -> Probe:
        told.append(left_s)
        result = server.probe(policy, rate)
        if left_s < 90.0:  # a probe takes 90 virtual seconds: this one the budget cuts off
            clock[0] += left_s
            return replace(result, wall_s=left_s, cut_off=True)
        clock[0] += 90.0
        return replace(result, wall_s=90.0)

    lines: list[str] = []
    results = run_study(world, probe, budget_s=240.0, clock=lambda: clock[0],
                        progress=lines.append)
    assert clock[0] == 240.0  # the whole study within its budget, not a probe beyond it
    # the policies in turn: the third probe cut off by the budget, none started after it
    assert told == [240.0, 150.0, 60.0]
    server_only, exact = results
    assert [p.cut_off for p in server_only.measured.probes] == [False, True]
    assert [p.cut_off for p in exact.measured.probes] == [False]
    for r in results:
        first = r.measured.probes[0]
        assert r.measured.cut_short
        # a cut-off probe counts for nothing: the capacity rests on the first one alone
        good = first.metrics.sla_attainment >= 0.9
        assert r.measured.rate_per_s == (first.rate_per_s if good else 0.0)
        assert r.measured.lowest_failed_per_s == (math.inf if good else first.rate_per_s)
    assert sum("cut off by --max-minutes" in line for line in lines) == 1
    note = budget_note(results)
    assert "ended these searches early" in note and "`exact` (measured)" in note


def test_the_policies_take_their_probes_in_turn() -> None:
    """The measured searches alternate, one probe each, so that every policy's probes span
    the same minutes; each search alone finds what it finds run by itself."""
    world = replace(world_of(scenario(), requests=20, length_scale=0.05, sla_s=1.0,
                             rel_tol=0.1), policies=("server-only", "fixed:CCSSSC"))
    server = FakeServer(world)
    order: list[str] = []

    def probe(policy: str, rate: float, left_s: float) -> Probe:
        order.append(policy)
        return server.probe(policy, rate, left_s)

    results = run_study(world, probe, budget_s=1e6, clock=lambda: server.now_s,
                        progress=lambda line: None)
    counts = [len(r.measured.probes) for r in results]
    both = 2 * min(counts)
    assert order[:both] == list(world.policies) * min(counts)  # in turn while both search
    assert len(order) == sum(counts)
    for r in results:
        alone = search_capacity(r.policy, partial(FakeServer(world).probe, r.policy),
                                first_rate_per_s=r.measured.probes[0].rate_per_s, target=0.9,
                                rel_tol=0.1, deadline_s=math.inf, clock=lambda: 0.0)
        assert alone.rate_per_s == r.measured.rate_per_s
        assert alone.lowest_failed_per_s == r.measured.lowest_failed_per_s


def test_the_simulated_search_stops_when_told() -> None:
    world = world_of(scenario(), requests=10, length_scale=0.05, sla_s=1.0, rel_tol=0.01)
    seen: list[RunMetrics] = []
    whole = find_capacity(world, "server-only")
    assert not whole.cut_short and len(whole.probes) > 3
    cut = find_capacity(world, "server-only", on_probe=seen.append, stop=lambda: len(seen) >= 3)
    assert cut.cut_short and len(cut.probes) == 3 and cut.probes == whole.probes[:3]


@pytest.mark.parametrize("sides", ["CSSSSS", "CCSSCS", "SSSSSS"])
def test_the_measured_visit_cost_is_charged_per_pass_and_visit_by_planner_and_simulator(
        sides: str) -> None:
    from splitllm.sim.walk import WalkBuilder

    visit_s, prompt, output = 0.0125, 30, 4
    spec = LoadtestSpec(requests=20)
    free, _ = loadtest_world(scenario(), config=CONFIG, context_tokens=512,
                             this_machine=SERVER, step=STEP, spec=spec)
    paid, classes = loadtest_world(scenario(), config=CONFIG, context_tokens=512,
                                   this_machine=SERVER, step=STEP, spec=spec, visit_s=visit_s)
    assert [c.link.visit_s for c in paid.clients] == [visit_s, visit_s]
    assert [c.link.visit_s for c in classes] == [0.0, 0.0]  # the emulated link: the real visit
    visits = output * sum(1 for s in Placement(sides).segments() if s.side == "S")
    placement = Placement(sides)
    for c in range(len(paid.clients)):
        planned = [evaluate(request_instance(w.types[0], w.clients[c], w, prompt, output),
                            placement).latency_s for w in (free, paid)]
        walked = [sum(WalkBuilder(w).walk(0, c, prompt, output, placement).gaps_s)
                  for w in (free, paid)]
        assert planned[1] - planned[0] == pytest.approx(visits * visit_s)
        assert walked[1] - walked[0] == pytest.approx(visits * visit_s)


def test_the_planner_takes_the_measured_step_model_for_the_server_as_the_simulator_does() -> None:
    prompt, output = 30, 4
    world = world_of(scenario())
    instance = request_instance(world.types[0], world.clients[0], world, prompt, output)
    # alone: every pass pays each unit's fixed seconds, the blocks their per-token seconds for
    # every position (30 prompt + 3 decoded), the head one row per pass
    block_s = 4 * 2e-3 + (prompt + output - 1) * 1e-4  # STEP's block line
    head_s = 4 * 1e-3 + 4 * 1e-4
    assert [u.server_s for u in instance.units[1:-1]] == pytest.approx([block_s] * 4)
    assert instance.units[-1].server_s == pytest.approx(head_s)
    assert [u.server_work for u in instance.units] == [u.server_s for u in instance.units]
    roofline = replace(world, server=replace(world.server, step_model=None))
    plain = request_instance(roofline.types[0], roofline.clients[0], roofline, prompt, output)
    assert plain.units[1].server_s != pytest.approx(block_s)  # the roofline misses fixed costs
    # the server's seconds per job (a visit's pass), charged per visit as its steps charge it
    assert (instance.job_s, instance.job_work_s) == (STEP.job_s, STEP.job_s)
    paid = with_step_model(world, replace(STEP, job_s=0.003))
    costly = request_instance(paid.types[0], paid.clients[0], paid, prompt, output)
    assert (costly.job_s, costly.job_work_s) == (0.003, 0.003)
    one, two = Placement("CSSSSC"), Placement("CSCSSC")  # one visit, two
    for placement, visits in ((one, 1), (two, 2)):
        extra = evaluate(costly, placement).server_work - evaluate(instance, placement).server_work
        assert extra == pytest.approx(visits * output * 0.003)  # a pass per output token
