"""The load test's model of one request: an EMULATED client takes exactly what its device
profile says (the planner's client time), and the idle check's arithmetic, predicted against
measured part by part, on a fake runner whose times are known (no wall clock)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from test_runtime_loadtest_parts import CONFIG, fake_metrics, scenario, world_of

from splitllm.placement import Placement
from splitllm.planner.hardware import device_preset, link_preset
from splitllm.planner.instance import Request, build_instance, evaluate
from splitllm.runtime.loadtest import Capacity, PolicyResult, Probe
from splitllm.runtime.loadtest_idle import Alone, idle_check, idle_json, idle_md
from splitllm.runtime.loadtest_report import report_md
from splitllm.runtime.loadtest_world import EmulatedClass, roofline_clock, served_costs
from splitllm.sim.capacity import Capacity as SimCapacity
from splitllm.sim.policies import request_instance


def generation_passes(prompt: int, output: int) -> list[tuple[int, int]]:
    """(start, tokens) of each pass of a generation, as `generate_tokens` runs them."""
    return [(0, prompt), *((prompt + k, 1) for k in range(output - 1))]


@pytest.mark.parametrize(("prompt", "output"), [(1, 1), (7, 1), (35, 3), (200, 40)])
def test_the_emulated_client_takes_the_planners_client_time(prompt: int, output: int) -> None:
    costs = served_costs(CONFIG)
    phone = device_preset("phone")
    clock = roofline_clock(costs, phone)
    instance = build_instance(costs, phone, device_preset("laptop"), link_preset("4g"),
                              Request(prompt_tokens=prompt, output_tokens=output))
    for unit, planned in enumerate(instance.units):
        emulated = sum(clock(unit, unit + 1, start, tokens)
                       for start, tokens in generation_passes(prompt, output))
        assert emulated == pytest.approx(planned.client_s, rel=1e-12)
    # a client segment is the sum of its units
    start, tokens = generation_passes(prompt, output)[-1]
    assert clock(0, 3, start, tokens) == pytest.approx(
        sum(clock(u, u + 1, start, tokens) for u in range(3)), rel=1e-12)


def test_the_idle_check_puts_predicted_and_measured_parts_side_by_side() -> None:
    world = world_of(scenario(), length_scale=0.05, sla_s=0.05)
    assert world.trace is not None
    p, g = max(world.trace.prompt_tokens), max(world.trace.output_tokens)
    ran: list[tuple[int, int, int, str]] = []

    def run_alone(c: int, prompt: int, output: int, sides: str) -> Alone:
        """A fake runtime with known times: the client 0.01 s per unit on it, the server
        0.002 s per unit, 0.005 s per round trip; the phone's requests 1 s slower."""
        ran.append((c, prompt, output, sides))
        client_s, server_s = 0.01 * sides.count("C"), 0.002 * sides.count("S")
        other_s = 0.005 * output + (1.0 if c == 0 else 0.0)
        return Alone(latency_s=client_s + server_s + other_s, ttft_s=0.001,
                     client_busy_s=client_s, server_busy_s=server_s, round_trips=output)

    rows = idle_check(world, run_alone)
    assert len(rows) == len(world.clients) * len(world.policies)
    assert {(c, prompt, output) for c, prompt, output, _ in ran} == {(0, p, g), (1, p, g)}
    for row, (c, _, _, sides) in zip(rows, ran, strict=True):
        instance = request_instance(world.types[0], world.clients[c], world, p, g)
        plan = evaluate(instance, Placement(sides))
        assert (row.placement, row.client_class) == (sides, world.clients[c].name)
        assert (row.predicted.client_s, row.predicted.server_s, row.predicted.other_s) == (
            plan.client_compute_s, plan.server_compute_s, plan.network_s)
        assert row.predicted.latency_s == pytest.approx(plan.latency_s, rel=1e-12)
        assert row.measured.client_s == 0.01 * sides.count("C")
        assert row.measured.server_s == 0.002 * sides.count("S")
        assert row.measured.other_s == pytest.approx(0.005 * g + (1.0 if c == 0 else 0.0))
        assert row.met == (row.measured.latency_s <= 0.05)
    assert not any(r.met for r in rows if r.client_class == "phone")  # 1 s over a 0.05 s SLA
    report = idle_md(rows)
    missed = sum(not r.met for r in rows)
    assert f"**{missed} of {len(rows)} missed their SLA alone" in report
    document = idle_json(rows)
    assert [d["met"] for d in document] == [r.met for r in rows]
    assert all(math.isclose(d["measured"]["latency_s"], r.measured.latency_s)
               for d, r in zip(document, rows, strict=True))
    assert np.all([d["sla_s"] == 0.05 for d in document])


def test_the_report_says_first_when_splitting_is_below_server_only() -> None:
    def result(policy: str, rate: float, cpu_s: float, share: float) -> PolicyResult:
        metrics = replace(fake_metrics(rate, 0.95), client_unit_share=share)
        probe = Probe(metrics=metrics, process_cpu_s_per_request=cpu_s, wall_s=10.0)
        simulated = SimCapacity(policy, rate, 0.9, (metrics,))
        return PolicyResult(policy, Capacity(policy, rate, 2 * rate, (probe,), cut_short=False),
                            simulated, simulated, None)

    link = link_preset("4g")
    classes = (EmulatedClass("phone", link, 50.7, "phone"),
               EmulatedClass("laptop", link, 25.5, "laptop"))
    results = [result("server-only", 20.0, 0.1, 0.0), result("exact", 5.0, 0.075, 0.3)]
    text = report_md(results, "HEADER", "IDLE", classes)
    first = text.splitlines()[2]  # after the title and a blank line
    assert first.startswith("The best splitting policy, `exact`, measured 5 req/s against "
                            "server-only's 20 req/s (0.25x). **Splitting is below server-only "
                            "here**")
    assert "saved only 25% of the server's CPU" in first
    assert "EMULATED 25.5-50.7x slower than this server" in first and "30% of the units" in first
    assert text.index(first) < text.index("HEADER") < text.index("IDLE")
