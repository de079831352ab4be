"""The load test's clients sharing this machine, against a fake runtime whose CPU and server
times are known: the clients' CPU fit, the server's slowdown while their cores compute, and
the report's two predictions (the world measured here, a real fleet)."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

import pytest
from test_runtime_loadtest_parts import FakeServer, fake_metrics, scenario, world_of

from splitllm.placement import Placement
from splitllm.planner.instance import evaluate
from splitllm.runtime.loadtest import (
    FOREIGN_CORES,
    POLL_S,
    Capacity,
    PolicyResult,
    Probe,
    run_study,
)
from splitllm.runtime.loadtest_host import (
    BETWEEN_PAIRS,
    BUSY_ROUNDS,
    TOGETHER_REQUESTS,
    TOGETHER_ROUNDS,
    HostFit,
    HostProbes,
    Request,
    Together,
    alone_samples,
    calibrate_host,
    client_segments,
    fit_client_cpu,
    foreign_cores,
    machine_busy_s,
    retimed,
)
from splitllm.runtime.loadtest_idle import Alone, IdleRow, idle_check
from splitllm.runtime.loadtest_report import policy_json, report_md
from splitllm.runtime.loadtest_run import RealRunner
from splitllm.runtime.loadtest_world import EmulatedClass
from splitllm.sim.capacity import Capacity as SimCapacity
from splitllm.sim.capacity import find_capacity
from splitllm.sim.client_host import ClientHost
from splitllm.sim.metrics import RunMetrics
from splitllm.sim.policies import request_instance
from splitllm.sim.world import World

PER_UNIT_S, PER_VISIT_S = 1.7, 0.0006  # the fake client's CPU per unit second and per visit
PER_POLL_S = 0.004  # ... and per read of the server's load
BUSY_SHARE = 0.5  # the fake server's busy share while a batch runs
CORE_SHARE = 0.75  # the fake clients' share of their core while it computes


class FakeClients:
    """Requests alone with known client CPU (PER_UNIT_S of this machine's time for its units,
    PER_VISIT_S a visit) and server seconds (0.002 a server unit, x2 while `computing`)."""

    def __init__(self, world: World, classes: tuple[EmulatedClass, ...]) -> None:
        self.world, self.classes = world, classes
        self.busy_threads = 0
        self.segments: list[tuple[int, int]] = []
        self.slowdowns: list[float] = []  # the busy server's factor, round by round (then 2)
        self.wall_s = self.cpu_s = 0.0  # its clock: a request alone takes 1 s, and while its
        # cores compute the clients' process gets CORE_SHARE of its core
        self.batches: list[list[Request]] = []

    def _work(self, c: int, prompt: int, output: int, sides: str) -> tuple[float, int]:
        """(this machine's seconds of the request's client units, its visits)"""
        instance = request_instance(self.world.types[0], self.world.clients[c], self.world,
                                    prompt, output)
        machine_s = evaluate(instance, Placement(sides)).client_compute_s / self.classes[
            c].slowdown
        return machine_s, output * sum(1 for s in Placement(sides).segments() if s.side == "S")

    def alone(self, c: int, prompt: int, output: int, sides: str) -> Alone:
        machine_s, visits = self._work(c, prompt, output, sides)
        self.wall_s += 1.0
        self.cpu_s += CORE_SHARE * self.busy_threads
        server_s = 0.002 * sides.count("S") * (self.slowdown if self.busy_threads else 1.0)
        return Alone(latency_s=1.0, ttft_s=0.1, client_busy_s=0.0, server_busy_s=server_s,
                     round_trips=visits,
                     client_cpu_s=PER_UNIT_S * machine_s + PER_VISIT_S * visits)

    def together(self, requests: Sequence[Request]) -> Together:
        """The CPU the model says: each request's units x the server's slowdown (2) over its
        busy share (BUSY_SHARE), as the simulated clients pay, and its visits."""
        cpu_s = 0.0
        trips = []
        for request in requests:
            machine_s, visits = self._work(*request)
            trips.append(visits)
            cpu_s += ((1 + (2.0 - 1) * BUSY_SHARE) * machine_s * PER_UNIT_S
                      + visits * PER_VISIT_S)
        self.batches.append(list(requests))
        return Together(round_trips=tuple(trips), cpu_s=cpu_s, server_busy_share=BUSY_SHARE)

    def poll(self) -> None:
        self.cpu_s += PER_POLL_S

    def probes(self) -> HostProbes:
        return HostProbes(alone=self.alone, computing=self.computing, together=self.together,
                          poll=self.poll, clock=lambda: (self.wall_s, self.cpu_s))

    @contextlib.contextmanager
    def computing(self, threads: int, segments: Sequence[tuple[int, int]]) -> Iterator[None]:
        self.segments = list(segments)
        self.busy_threads = threads
        self.slowdown = self.slowdowns.pop(0) if self.slowdowns else 2.0
        try:
            yield
        finally:
            self.busy_threads = 0


def _world() -> tuple[World, tuple[EmulatedClass, ...]]:
    world = world_of(scenario(), length_scale=0.05, sla_s=1.0)
    classes = tuple(EmulatedClass(c.name, c.link, s, c.name) for c, s in
                    zip(world.clients, (50.0, 20.0), strict=True))
    return world, classes


def test_the_clients_cpu_is_fitted_per_unit_second_and_per_visit() -> None:
    world, classes = _world()
    fake = FakeClients(world, classes)
    rows = idle_check(world, fake.alone)
    assert {r.policy for r in rows} >= {"server-only", "exact"}
    assert fit_client_cpu(alone_samples(rows, classes)) == pytest.approx(
        (PER_UNIT_S, PER_VISIT_S), rel=1e-6)


def _calibrated() -> tuple[World, tuple[EmulatedClass, ...], FakeClients, list[list[IdleRow]],
                           HostFit]:
    """The fake clients' calibration over three idle-check rounds, its CPU fit checked exact."""
    world, classes = _world()
    fake = FakeClients(world, classes)
    rounds = [idle_check(world, fake.alone) for _ in range(3)]
    fit = calibrate_host(world, classes, rounds, fake.probes(), cores=1)
    assert (fit.cpu_per_machine_s, fit.cpu_per_visit_s) == pytest.approx(
        (PER_UNIT_S, PER_VISIT_S), rel=1e-6)
    return world, classes, fake, rounds, fit


def test_the_clients_cpu_is_fitted_on_requests_run_together_as_well() -> None:
    world, _, fake, rounds, fit = _calibrated()
    # per policy, TOGETHER_ROUNDS batches of the probes' first TOGETHER_REQUESTS requests (every
    # size) as it plans them: server-only's visit alone, the split's compute units too
    assert len(fake.batches) == len(world.policies) * TOGETHER_ROUNDS
    trace = world.trace
    assert trace is not None
    n = min(TOGETHER_REQUESTS, len(trace.arrived_at_s))
    assert all([(c, p, g) for c, p, g, _ in b] == list(zip(
        trace.class_index[:n], trace.prompt_tokens[:n], trace.output_tokens[:n], strict=True))
        for b in fake.batches)
    assert len({g for b in fake.batches for _, _, g, _ in b}) > 1
    sides = [{placement for *_, placement in batch} for batch in fake.batches]
    assert sides[0] == {"SSSSSS"} and any("C" in p for p in sides[1])
    assert len(fit.to_json()["samples"]) == len(fit.samples) == 3 * len(rounds[0]) + len(
        fake.batches)
    assert HostFit.from_json(fit.to_json()) == replace(fit, samples=())


def test_an_older_runs_calibration_is_read_without_its_zero_terms() -> None:
    # runs E-H (loadtest12) wrote terms per other request in flight and per request (all
    # fitted 0) and their samples' regressors: ignored
    older = {"cores": 1, "cpu_per_machine_s": 1.38, "cpu_per_visit_s": 0.0021,
             "cpu_per_machine_other_s": 0.0, "cpu_per_visit_other_s": 0.0,
             "cpu_per_request_s": 0.0, "server_idle_s": [1.0, 1.2], "server_busy_s": [1.1, 1.2],
             "server_slowdown": 1.05, "load_average": 1.3, "loaded": False,
             "segments": [[0, 2]], "core_shares": [0.98, 0.99], "core_share": 0.985,
             "samples": [{"unit_s": 0.0, "visits": 7, "unit_others_s": 0.0,
                          "visit_others": 0.0, "requests": 1, "cpu_s": 0.012}]}
    assert HostFit.from_json(older) == HostFit(
        cores=1, cpu_per_machine_s=1.38, cpu_per_visit_s=0.0021, server_idle_s=(1.0, 1.2),
        server_busy_s=(1.1, 1.2), load_average=1.3, segments=((0, 2),),
        core_shares=(0.98, 0.99))


def test_a_calibration_on_a_loaded_machine_is_flagged() -> None:
    pairs = {"server_idle_s": (1.0, 1.0, 1.0), "cores": 1, "cpu_per_machine_s": 1.0,
             "cpu_per_visit_s": 0.0}
    calm = HostFit(server_busy_s=(1.1, 1.2, 1.1), load_average=2.5, **pairs)
    assert calm.server_slowdown == pytest.approx(1.1) and not calm.loaded
    # a transient under one pair: the median pair's ratio holds, the spread flags it
    transient = HostFit(server_busy_s=(1.1, 2.1, 1.15), load_average=2.5, **pairs)
    assert transient.server_slowdown == pytest.approx(1.15) and transient.loaded
    # other work beyond the load test's own server and clients
    assert HostFit(server_busy_s=(1.1, 1.2, 1.1), load_average=3.5, **pairs).loaded
    assert calm.to_json()["loaded"] is False


def test_the_servers_slowdown_is_timed_with_the_clients_cores_computing() -> None:
    world, classes, fake, rounds, fit = _calibrated()
    assert fit.server_slowdown == pytest.approx(2.0)  # the fake server: x2 while computing
    assert len(fit.server_busy_s) == len(fit.server_idle_s) == BUSY_ROUNDS
    # while timed, the clients' cores ran what the split plans run on their clients
    assert fake.segments == client_segments([r for rows in rounds for r in rows])
    assert fake.segments and all(0 <= a < b <= 6 for a, b in fake.segments)
    # plans that run nothing on their clients: nothing to time, no slowdown
    only = replace(world, policies=("server-only",))
    bare = calibrate_host(only, classes, [idle_check(only, fake.alone)], fake.probes(),
                          cores=1)
    assert bare.server_busy_s == () and bare.server_slowdown == 1.0
    # the clients' process got CORE_SHARE of its core in the busy rounds: the simulated
    # clients have that much
    assert fit.core_shares == pytest.approx([CORE_SHARE] * BUSY_ROUNDS)
    host = fit.host(classes)
    assert host == ClientHost(cores=CORE_SHARE, cpu_per_client_s=pytest.approx(  # type: ignore[arg-type]
        (PER_UNIT_S / 50.0, PER_UNIT_S / 20.0)), cpu_per_visit_s=pytest.approx(PER_VISIT_S),
        poll_s=POLL_S, cpu_per_poll_s=pytest.approx(PER_POLL_S),
        server_slowdown=pytest.approx(2.0))
    # noise that makes the busy server look faster is no speed-up
    faster = replace(fit, server_busy_s=tuple(0.9 * s for s in fit.server_idle_s))
    assert faster.server_slowdown == 1.0
    assert fit.to_json()["server_slowdown"] == pytest.approx(2.0)


def test_the_study_predicts_the_world_measured_here_and_a_fleet_beside_it() -> None:
    """The prediction (the target's comparison) runs the clients on their shared core; the
    fleet's, every client its own device (both on the start-of-run world). Clients whose units
    cost real CPU beyond one core's worth at the fleet's capacity cap the co-located world
    below it."""
    world, _ = _world()
    world = replace(world, policies=("fixed:CCSSSC",))
    fleet = find_capacity(world, "fixed:CCSSSC").crossing_per_s
    host = ClientHost(cores=1.0, cpu_per_client_s=(20.0, 20.0), cpu_per_visit_s=0.001)
    shared = replace(world, client_host=host)
    server = FakeServer(shared)
    [result] = run_study(shared, server.probe, budget_s=1e6, clock=lambda: server.now_s,
                         progress=lambda line: None)
    assert result.simulated_fleet_per_s == fleet
    assert result.simulated_start.crossing_per_s == find_capacity(
        shared, "fixed:CCSSSC").crossing_per_s
    assert 0 < result.simulated_start.crossing_per_s < fleet
    # no server slowdown in this world: the shared cores alone explain the difference
    assert result.simulated_unslowed_per_s == result.simulated_start.crossing_per_s
    slowed = replace(shared, client_host=replace(host, server_slowdown=3.0))
    [worse] = run_study(slowed, FakeServer(slowed).probe, budget_s=1e6, clock=lambda: 0.0,
                        progress=lambda line: None)
    assert worse.simulated_unslowed_per_s == result.simulated_start.crossing_per_s
    assert worse.simulated_start.crossing_per_s < result.simulated_start.crossing_per_s
    document = policy_json(result)
    assert document["simulated_fleet_capacity_req_s"] == fleet
    assert document["colocation_cost"] == pytest.approx(
        1 - result.simulated_start.crossing_per_s / fleet)
    # a world whose clients are each their own device already has no second prediction
    [alone] = run_study(world, FakeServer(world).probe, budget_s=1e6, clock=lambda: 0.0,
                        progress=lambda line: None)
    assert alone.simulated_start.crossing_per_s == fleet and policy_json(alone)[
        "simulated_fleet_capacity_req_s"] is None


def test_the_report_shows_both_predictions() -> None:
    probe = Probe(metrics=fake_metrics(10.0, 0.95), process_cpu_s_per_request=0.05, wall_s=9.0)
    measured = Capacity("greedy", 10.0, 11.0, (probe,), cut_short=False, attainment=0.95,
                        failed_attainment=0.85)
    # the simulated searches: 10 and 12 req/s met the target, 14 did not; 8 did
    sims = [fake_metrics(10.0, 1.0), fake_metrics(12.0, 0.95), fake_metrics(14.0, 0.85)]
    on_probes = SimCapacity("greedy", 12.0, 0.9, tuple(sims))
    start = SimCapacity("greedy", 8.0, 0.9, (fake_metrics(8.0, 0.9),
                                             fake_metrics(16.0, 0.5)))
    result = PolicyResult("greedy", measured, on_probes, start, None,
                          simulated_fleet_per_s=20.0, simulated_unslowed_per_s=15.0,
                          server_factor=1.1, client_factor=0.9)
    # the crossings: halfway (in attainment) between the bracket's rates, geometrically
    assert result.measured_per_s == pytest.approx(math.sqrt(110.0))
    assert result.simulated_per_s == pytest.approx(math.sqrt(12.0 * 14.0))
    assert start.crossing_per_s == 8.0  # exactly on the target: the good rate
    text = report_md([result], "HEADER")
    row = next(line for line in text.splitlines() if line.startswith("| greedy | 10.5 "))
    assert "[10 (95%) - 11 (85%)]" in row and "| 13 [12 (95%) - 14 (85%)] | +24% |" in row
    assert "| 8 (-24%) | 20 (60% lost) | 15 |" in row
    document = policy_json(result)
    assert document["bracket"] == {"good_req_s": 10.0, "good_attainment": 0.95,
                                   "bad_req_s": 11.0, "bad_attainment": 0.85}
    assert document["simulated_on"] == "its probes' speeds"
    assert (document["server_speed_factor"], document["client_cpu_factor"]) == (1.1, 0.9)
    assert document["simulated_start_capacity_req_s"] == 8.0
    assert "Fleet: that with every client its own device" in text
    assert ("measured: **missed** (worst 24%) at the probes' speeds (read after the probes); "
            "**missed** (worst 24%) on the start-of-run model") in text
    close = replace(result, simulated=SimCapacity("greedy", 10.0, 0.9, tuple(sims[:2])))
    assert "measured: met (worst " in report_md([close], "HEADER")
    fit = HostFit(cores=1, cpu_per_machine_s=1.5, cpu_per_visit_s=5e-4,
                  server_idle_s=(1.0, 2.0, 1.1), server_busy_s=(1.6, 2.2, 1.1 * 1.3))
    assert fit.server_slowdown == pytest.approx(1.3)  # the median round's ratio


def test_the_report_compares_each_probe_with_its_simulation() -> None:
    """Per probe that counts: the verdicts, simulated against measured (a probe stopped early
    failed); where it ran to its end, simulated minus measured attainment at its rate (a
    repeated probe is shown, not counted; one not simulated: -)."""
    def probe(rate: float, attainment: float, **kw: Any) -> Probe:
        return Probe(metrics=fake_metrics(rate, attainment), process_cpu_s_per_request=0.05,
                     wall_s=9.0, **kw)

    probes = (probe(8.0, 1.0), probe(12.0, 0.67, stopped_early=True), probe(10.0, 0.94),
              probe(11.0, 0.5, repeated=True), probe(11.0, 0.89))
    measured = Capacity("greedy", 10.0, 11.0, probes, cut_short=False, attainment=0.94,
                        failed_attainment=0.89)
    sim = SimCapacity("greedy", 10.0, 0.9, (fake_metrics(10.0, 0.95),))
    def simulated(*attainments: float) -> tuple[RunMetrics | None, ...]:
        return tuple(None if a != a else replace(fake_metrics(p.rate_per_s, a),
                                                  fallback_share=0.25)
                     for p, a in zip(probes, attainments, strict=True))

    result = PolicyResult("greedy", measured, sim, sim, None,
                          simulated_probes=simulated(1.0, 0.97, 0.98, math.nan, 0.96))
    assert result.probe_errors() == pytest.approx([0.0, 0.04, 0.07])
    assert result.probe_verdicts() == [(8.0, True, True), (12.0, False, True),
                                       (10.0, True, True), (11.0, False, True)]
    document = policy_json(result)
    assert document["probe_attainment_err"] == {
        "median": pytest.approx(0.04), "max_abs": pytest.approx(0.07), "probes": 3}
    assert document["probe_verdicts"] == {"agree": 2, "probes": 4,
                                          "only_simulated_passed_req_s": [12.0, 11.0],
                                          "only_measured_passed_req_s": []}
    assert [p["simulated_attainment"] for p in document["probes"]] == [
        1.0, 0.97, 0.98, None, 0.96]
    # the requests that found no plan within their limits, measured (0 here) and simulated
    assert [p["simulated_fallback_share"] for p in document["probes"]] == [
        0.25, 0.25, 0.25, None, 0.25]
    assert {p["fallback_share"] for p in document["probes"]} == {0.0}
    text = report_md([result], "HEADER")
    assert ("greedy: the verdicts agree at 2 of 4 probes (only the simulated passed at 12, 11 "
            "req/s); simulated minus measured attainment where both ran to their end, median "
            "+4 points, largest 7 (3 probes).") in text
    assert "| greedy | 12 | 67% (stopped early) | 97% | 0% (25%) | " in text
    assert "| greedy | 11 | 50% | - | 0% | " in text
    pessimist = replace(result, simulated_probes=simulated(0.85, 0.5, 0.98, math.nan, 0.5))
    assert "(only the measured passed at 8 req/s)" in report_md([pessimist], "H")
    bare = replace(result, simulated_probes=())
    assert bare.probe_errors() == [] and bare.probe_verdicts() == []
    assert policy_json(bare)["probe_attainment_err"] is None
    assert policy_json(bare)["probe_verdicts"] is None
    assert "No probe was simulated at its rate." in report_md([bare], "H")


def test_the_report_says_which_probes_other_work_disturbed() -> None:
    def probe(attainment: float, foreign: float, repeated: bool = False) -> Probe:
        return Probe(metrics=fake_metrics(10.0, attainment), process_cpu_s_per_request=0.05,
                     wall_s=9.0, foreign_cores=foreign, repeated=repeated)

    probes = (probe(0.5, 0.8, repeated=True), probe(0.95, 0.05), probe(0.92, 0.4))
    measured = Capacity("greedy", 10.0, math.inf, probes, cut_short=False, attainment=0.95)
    sim = SimCapacity("greedy", 10.0, 0.9, (fake_metrics(10.0, 0.95),))
    result = PolicyResult("greedy", measured, sim, sim, None)
    assert result.at_capacity is probes[2]  # the last that counts
    text = report_md([result], "HEADER")
    assert ("Other work on this machine took at most 0.80 cores during a probe (its CPU less "
            "this load test's own processes'); **2 probe(s) disturbed** (> 0.25 cores): 1 that "
            "did not pass were run again (they count for nothing), 1 count as measured.") in text
    assert "| 0.80 (run again) | 9 |" in text and "| 0.05 | 9 |" in text
    assert [(p["foreign_cores"], p["repeated"]) for p in policy_json(result)["probes"]] == [
        (0.8, True), (0.05, False), (0.4, False)]
    quiet = replace(result, measured=replace(measured, probes=probes[1:2]))
    assert "at most 0.05 cores during a probe (its CPU less this load test's own processes'); " \
        "no probe was disturbed (> 0.25 cores)." in report_md([quiet], "HEADER")
    unknown = replace(result, measured=replace(measured, probes=(
        replace(probes[1], foreign_cores=math.nan),)))
    assert "during the probes: not known (no /proc/stat)." in report_md([unknown], "HEADER")


def test_other_work_on_the_machine_is_seen_beside_the_load_tests_own() -> None:
    """A process spinning on this machine is other work: the machine's CPU less this
    process's own."""
    if math.isnan(machine_busy_s()):
        pytest.skip("no /proc/stat here")
    assert foreign_cores(5.0, 3.0, 4.0) == 0.5 and foreign_cores(1.0, 3.0, 4.0) == 0.0
    assert math.isnan(foreign_cores(math.nan, 1.0, 1.0))
    burner = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdout.write('up\\n'); "
                               "sys.stdout.flush()\nwhile True: pass"], stdout=subprocess.PIPE)
    try:
        assert burner.stdout is not None and burner.stdout.readline() == b"up\n"
        machine_s, own_s, wall_s = machine_busy_s(), time.process_time(), time.monotonic()
        time.sleep(1.0)
        seen = foreign_cores(machine_busy_s() - machine_s, time.process_time() - own_s,
                             time.monotonic() - wall_s)
        # after a disturbed probe the runner waits for quiet: here it never comes
        lines: list[str] = []
        waited_s = RealRunner._wait_quiet(cast(Any, SimpleNamespace(progress=lines.append)), 1.5)
    finally:
        burner.kill()
        burner.wait()
    assert seen > FOREIGN_CORES  # it spins on a core of its own or shares one with two others
    assert waited_s >= 1.5 and lines == [
        "waiting up to 2 s for other work on this machine to end"]


def test_the_slowdown_is_timed_again_between_policies_and_pooled() -> None:
    """A transient under half the first pairs (x3 against x1.1) is outvoted once the pairs
    timed before the later policies join them."""
    world, classes = _world()
    fake = FakeClients(world, classes)
    fake.slowdowns = [3.0, 3.0, 3.0] + [1.1] * 20
    rounds = [idle_check(world, fake.alone)]
    fit = calibrate_host(world, classes, rounds, fake.probes(), cores=1)
    assert fit.ratios == pytest.approx([3.0] * 3 + [1.1] * 3)
    assert fit.server_slowdown == pytest.approx(2.05) and fit.loaded  # the spread flags it
    again = retimed(world, retimed(world, fit, fake.probes()), fake.probes())
    assert len(again.ratios) == BUSY_ROUNDS + 2 * BETWEEN_PAIRS
    assert again.server_slowdown == pytest.approx(1.1)
    assert again.segments == fit.segments == tuple(fake.segments)
    assert HostFit.from_json(again.to_json()).server_slowdown == pytest.approx(1.1)
    assert "LOADED" in again.note() and "x1.1 while the clients compute" in again.note()
    # the study recalibrates once, after every probe (before the predictions at their speeds)
    seen: list[int] = []

    def between(w: World) -> World:
        seen.append(server.probes)
        return w

    two = replace(world, policies=("server-only", "fixed:CCSSSC"))
    server = FakeServer(two)
    results = run_study(two, server.probe, budget_s=1e6, clock=lambda: server.now_s,
                        progress=lambda line: None, between=between)
    assert seen == [sum(len(r.measured.probes) for r in results)]
