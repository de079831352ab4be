"""`splitllm loadtest` on a real server: a short run against a tiny random model (a few
requests, bounded, stopping itself) and bad files on the command line. Asserts counts and
tokens, never wall time."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from splitllm.placement import Placement
from splitllm.planner.hardware import device_preset
from splitllm.planner.instance import evaluate
from splitllm.runtime.decoding import RemoteResult, SplitPipe, generate_tokens
from splitllm.runtime.dialer import fetch_info
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.loadtest import ServerLoad
from splitllm.runtime.loadtest_command import (
    DEFAULT_POLICIES,
    _on_this_machine,
    calibrated,
    calibrated_host,
)
from splitllm.runtime.loadtest_host import BUSY_ROUNDS, TOGETHER_ROUNDS, machine_busy_s
from splitllm.runtime.loadtest_idle import idle_check
from splitllm.runtime.loadtest_run import RealRunner, RunnerOptions
from splitllm.runtime.loadtest_world import (
    EmulatedClass,
    LoadtestSpec,
    loadtest_world,
    with_step_model,
)
from splitllm.runtime.models import LoadedModel, context_tokens
from splitllm.runtime.units import UnitStack
from splitllm.sim.policies import PlanPolicy, request_instance
from splitllm.sim.scenario import parse_scenario, resolve
from splitllm.sim.workload import sample_workload
from splitllm.sim.world import World
from splitllm.stepmodel import StepModel

COMMAND_S = 600.0  # a bound, not a speed check: importing torch on a loaded machine is slow
SCENARIO: dict[str, Any] = {
    "name": "tiny", "seed": 1, "duration_s": 60,
    "clients": [{"name": "box", "device": "edge-box", "link": "lan"},
                {"name": "laptop", "device": "laptop", "link": "wifi"}],
    "request_types": [{"name": "chat", "model": "llama-3-8b", "sla_s": 10,
                       "prompt_tokens": {"dist": "uniform", "low": 40, "high": 200},
                       "output_tokens": {"dist": "uniform", "low": 40, "high": 120}}],
    "arrivals": {"process": "poisson", "rate_per_s": 1.0},
}


def tiny_world(loaded: LoadedModel, server: BackgroundServer, **spec: Any
               ) -> tuple[World, tuple[EmulatedClass, ...]]:
    info = fetch_info(server.ws_url, None)
    return loadtest_world(resolve(parse_scenario(SCENARIO, "tiny")),
                          config=loaded.model.config.to_dict(),
                          context_tokens=context_tokens(loaded.model.config),
                          this_machine=device_preset("laptop"),
                          step=StepModel.from_json(info["step_model"]),
                          spec=LoadtestSpec(length_scale=0.05, **spec))


def test_a_short_real_run_against_a_tiny_model_server(tiny_llama: LoadedModel,
                                                       llama_server: BackgroundServer) -> None:
    world, classes = tiny_world(tiny_llama, llama_server, requests=4, sla_s=120.0,
                                window_slas=0.0)  # the 4 requests once, whatever the rate

    def workers() -> int:
        return sum(t.name.startswith("loadtest") for t in threading.enumerate())

    started = workers()
    runner = RealRunner(tiny_llama, world, classes,
                        RunnerOptions(server=llama_server.ws_url, max_in_flight=4))
    try:
        assert workers() == started + 4  # every worker thread up before any clock starts
        before = runner.metrics()
        probe = runner.probe("server-only", 20.0)
        after = runner.metrics()
        load = sample_workload(world.with_rate(20.0))
        m = probe.metrics
        assert (m.requests, m.completed, m.sla_attainment) == (4, 4, 1.0)
        assert not probe.stopped_early and m.fallback_share == 0.0
        # every position of every request went through the server: the prompt, then one
        # position per further token
        positions = int((load.prompt_tokens + load.output_tokens - 1).sum())
        processed = "splitllm_tokens_processed_total"
        assert after[processed] - before[processed] == positions
        assert after["splitllm_sessions_opened_total"] - before[
            "splitllm_sessions_opened_total"] == 4
        assert probe.process_cpu_s_per_request > 0 and m.server_s_per_request > 0
        assert probe.server_wall_s_per_request > 0  # the steps' wall share, what the model prices
        # one forward a token (the prompt's in one), counted as the server counts them; the
        # seconds the simulator charges a request add their CPU outside the steps
        forwards = after["splitllm_forwards_total"] - before["splitllm_forwards_total"]
        assert probe.server_visits_per_request * 4 == float(load.output_tokens.sum()) == forwards
        assert probe.server_s_per_request == pytest.approx(
            probe.server_wall_s_per_request
            + probe.server_job_s * probe.server_visits_per_request)
        # other work on the machine, timed (Linux): the server's CPU is this process's own
        assert probe.foreign_cores >= 0 or math.isnan(machine_busy_s())
        assert m.ttft_s[0] <= m.latency_s[0] and m.tpot_s[0] > 0
        # how late the clients' worker threads took the requests, timed for each: each one
        # started before it finished
        assert math.isfinite(probe.started_late_p90_s)
        assert probe.started_late_p90_s <= m.latency_s[1]
        # the server's busy share counts its arrivals' window, within the whole probe's busy
        busy = "splitllm_server_busy_seconds_total"
        horizon_s = world.with_rate(20.0).horizon_s
        assert 0 <= m.utilization * horizon_s <= after[busy] - before[busy] + 1e-9
        split = runner.probe("fixed:CCSSSC", 20.0)  # a real split: fewer positions served
        assert (split.metrics.requests, split.metrics.completed) == (4, 4)
        assert runner.metrics()[processed] - after[processed] == positions
        assert split.metrics.client_unit_share == pytest.approx(0.5)
    finally:
        runner.close()


def test_a_probe_plans_its_requests_before_its_clock(tiny_llama: LoadedModel,
                                                     llama_server: BackgroundServer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request is planned before the first is released: at an arrival only a
    load-reading policy's choice under the load it reads is left to compute (planning in the
    arrival loop took the EMULATED clients' core and delayed arrivals)."""
    world, classes = tiny_world(tiny_llama, llama_server, requests=4, sla_s=120.0,
                                window_slas=0.0)
    events: list[str] = []
    decide, one = PlanPolicy.decide, RealRunner._one

    def planned(self: PlanPolicy, *kind: Any) -> Any:
        decision = decide(self, *kind)
        events.append(f"plan {len(kind) > 4 and kind[4] is not None}")  # with a load read
        return decision

    def ran(self: RealRunner, *args: Any) -> Any:
        events.append("run")
        return one(self, *args)

    monkeypatch.setattr(PlanPolicy, "decide", planned)
    monkeypatch.setattr(RealRunner, "_one", ran)
    runner = RealRunner(tiny_llama, world, classes, RunnerOptions(server=llama_server.ws_url))
    try:
        for policy, reads_load in (("greedy", False), ("exact-load-aware", True)):
            events.clear()
            probe = runner.probe(policy, 20.0)
            assert probe.metrics.completed == 4
            # the four planned ahead, then each arrival: its choice (under the load it reads)
            assert events[:4] == ["plan False"] * 4
            assert sorted(events[4:]) == ["plan " + str(reads_load)] * 4 + ["run"] * 4
    finally:
        runner.close()


def test_each_plan_alone_on_the_idle_server(tiny_llama: LoadedModel,
                                            llama_server: BackgroundServer) -> None:
    world, classes = tiny_world(tiny_llama, llama_server, requests=6, sla_s=120.0,
                                policies=("server-only", "fixed:CCSSSC"))
    runner = RealRunner(tiny_llama, world, classes, RunnerOptions(server=llama_server.ws_url))
    try:
        rows = idle_check(world, runner.alone)
    finally:
        runner.close()
    assert [(r.client_class, r.policy) for r in rows] == [
        (c.name, p) for c in world.clients for p in ("server-only", "fixed:CCSSSC")]
    for r in rows:
        assert r.met and r.round_trips == r.output_tokens  # one visit to the server per pass
        if r.policy == "server-only":
            assert r.measured.client_s == r.predicted.client_s == 0.0
        else:
            # the EMULATED client took (at least: never faster than this machine) what its
            # device profile says, the planner's own client time
            assert r.predicted.client_s > 0
            assert r.measured.client_s >= r.predicted.client_s * (1 - 1e-9)
        assert r.measured.server_s > 0 and r.measured.latency_s >= r.measured.client_s


def test_the_idle_check_predicts_with_the_servers_seconds_per_forward(
        tiny_llama: LoadedModel, llama_server: BackgroundServer) -> None:
    """The server's CPU per forward outside its steps is measured on a first round of the idle
    check, so the check's predictions charge it per pass as the probes' planners do (measured
    over the check itself, every prediction lacked it)."""
    world, classes = tiny_world(tiny_llama, llama_server, requests=6, sla_s=120.0,
                                policies=("server-only", "fixed:CCSSSC"))
    runner = RealRunner(tiny_llama, world, classes, RunnerOptions(server=llama_server.ws_url))
    try:
        stepped, rounds = calibrated(world, runner, llama_server.ws_url, None)
        ready, fit = calibrated_host(stepped, runner, rounds, classes)
        rows = idle_check(ready, runner.alone)
    finally:
        runner.close()
    assert ready.server.step_model is not None and runner.world is ready
    assert ready.server == stepped.server and stepped.client_host is None  # `--clients fleet`
    # the clients share this machine: their CPU fitted on the rounds, the server timed again
    # (server-only's requests) while their cores ran the model
    assert ready.client_host == fit.host(classes) and fit.cores >= 1
    terms = (fit.cpu_per_machine_s, fit.cpu_per_visit_s)
    assert min(terms) >= 0  # non-negative least squares
    # the samples' CPU is charged to some term (which one, a loaded minute may shift: on six
    # tiny requests the terms are nearly collinear; one loop round beside a CPU burner fitted
    # 0 per visit and 218 per unit second)
    assert sum(sum(x * t for x, t in zip(s.regressors(), terms, strict=True))
               for s in fit.samples) > 0
    assert len(fit.server_busy_s) == BUSY_ROUNDS and min(fit.server_busy_s) > 0
    assert fit.server_slowdown >= 1.0
    # and batches of the probes' first requests ran at once through their worker threads:
    # every request visited the server, and the clients' process spent CPU on them
    together = fit.samples[-len(world.policies) * TOGETHER_ROUNDS:]
    assert all(s.visits > 0 and s.cpu_s > 0 for s in together)
    assert fit.cpu_per_poll_s > 0  # its reads of /metrics cost the clients' process CPU
    assert len(fit.samples) == 3 * len(rows) + len(together)
    assert all(r.client_cpu_s > 0 for r in rows)
    job_s = ready.server.step_model.job_s
    assert job_s > 0  # the first round's forwards cost the server CPU outside its steps
    names = [c.name for c in world.clients]
    free = with_step_model(ready, replace(ready.server.step_model, job_s=0.0))  # visits cost 0
    for r in rows:
        bare = evaluate(request_instance(free.types[0], free.clients[names.index(
            r.client_class)], free, r.prompt_tokens, r.output_tokens), Placement(r.placement))
        # one visit per pass: each pays the server's seconds per forward
        assert r.predicted.other_s - bare.network_s == pytest.approx(job_s * r.round_trips)


def test_a_probe_that_cannot_meet_its_sla_stops_itself(tiny_llama: LoadedModel,
                                                       llama_server: BackgroundServer) -> None:
    world, classes = tiny_world(tiny_llama, llama_server, requests=8, sla_s=1e-4)
    runner = RealRunner(tiny_llama, world, classes, RunnerOptions(server=llama_server.ws_url))
    try:
        probe = runner.probe("server-only", 1.0)  # 8 requests over 8 s if it did not stop
    finally:
        runner.close()
    assert probe.stopped_early and probe.metrics.sla_attainment == 0.0
    assert probe.metrics.requests < 8  # no more requests were sent once it had failed


class RecordingServer:
    """A server segment that records what the client sent: hidden states of ones back, or
    token 7 where it holds the head."""

    def __init__(self, stack: UnitStack) -> None:
        self.stack = stack
        self.sent: list[tuple[tuple[int, int], torch.Tensor, tuple[int, int]]] = []

    def forward(self, units: tuple[int, int], x: torch.Tensor, positions: tuple[int, int],
                return_logits: bool, return_hidden: bool = True, **_: bool) -> RemoteResult:
        self.sent.append((units, x.clone(), positions))
        if units[1] == self.stack.n_units:
            return RemoteResult(token=7)
        return RemoteResult(hidden=torch.ones(1, positions[1] - positions[0],
                                              self.stack.hidden_size))


def test_a_fleets_client_units_are_timed_not_computed(tiny_llama: LoadedModel,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    stack = UnitStack(tiny_llama.model)
    n = stack.n_units
    placement = Placement("CC" + "S" * (n - 4) + "CC")  # the client holds two blocks and the head
    monkeypatch.setattr(UnitStack, "run", lambda *a, **k: pytest.fail("a unit was computed"))
    clocked: list[tuple[int, int, int, int]] = []

    def clock(a: int, b: int, start: int, tokens: int) -> float:
        clocked.append((a, b, start, tokens))
        return 1e-4 * (b - a) * tokens

    server = RecordingServer(stack)
    pipe = SplitPipe(stack, placement, server, client_clock=clock, compute_units=False)
    prompt = [5, 9, 2, 11, 3]
    # the stand-in head's logits are zeros: greedy token 0, after the prompt's and each decode's
    assert list(generate_tokens(pipe, prompt, 3)) == [0, 0, 0]
    # the server got what a real client sends, in shape: the prompt's embedding (the stand-in
    # for units [0, 2)), then one position at a time
    assert [(units, tuple(x.shape), span) for units, x, span in server.sent] == [
        ((2, n - 2), (1, 5, stack.hidden_size), (0, 5)),
        ((2, n - 2), (1, 1, stack.hidden_size), (5, 6)),
        ((2, n - 2), (1, 1, stack.hidden_size), (6, 7))]
    positions = torch.arange(5)[None]
    torch.testing.assert_close(server.sent[0][1], stack.embed(torch.tensor([prompt]), positions))
    torch.testing.assert_close(server.sent[1][1], stack.embed(torch.tensor([[0]]),
                                                             torch.tensor([[5]])))
    # each client segment of each pass took its emulated time, and only that
    assert clocked == [(0, 2, 0, 5), (n - 2, n, 0, 5), (0, 2, 5, 1), (n - 2, n, 5, 1),
                       (0, 2, 6, 1), (n - 2, n, 6, 1)]
    assert pipe.client_busy_s == pytest.approx(sum(1e-4 * (b - a) * t for a, b, _, t in clocked))
    with pytest.raises(ValueError, match="client_clock"):
        SplitPipe(stack, placement, server, compute_units=False)


def test_a_fleet_probe_gives_the_server_a_real_splits_work(
        tiny_llama: LoadedModel, llama_server: BackgroundServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    world, classes = tiny_world(tiny_llama, llama_server, requests=4, sla_s=120.0,
                                window_slas=0.0)
    run = UnitStack.run
    by_clients = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        by_clients[0] += threading.current_thread().name.startswith("loadtest")
        return run(*args, **kwargs)

    monkeypatch.setattr(UnitStack, "run", counted)
    processed = "splitllm_tokens_processed_total"
    served, ended = [], []
    for fleet in (False, True):
        runner = RealRunner(tiny_llama, world, classes, RunnerOptions(
            server=llama_server.ws_url, max_in_flight=4, fleet=fleet))
        try:
            before = runner.metrics()
            probe = runner.probe("fixed:CCSSSC", 20.0)
            served.append(runner.metrics()[processed] - before[processed])
            if fleet:  # a load-reading policy's tuned headroom learns from every request's end
                monkeypatch.setattr(ServerLoad, "request_done",
                                    lambda self, met: ended.append(met))
                tuned = runner.probe("exact-tuned", 20.0)
                assert len(ended) == tuned.metrics.completed == 4
                assert sum(ended) == round(tuned.metrics.sla_attainment * 4)
        finally:
            runner.close()
        assert (probe.metrics.requests, probe.metrics.completed) == (4, 4)
        assert probe.metrics.client_unit_share == pytest.approx(0.5)
        computed, by_clients[0] = by_clients[0], 0
        assert (computed == 0) == fleet  # the fleet's clients computed no unit
    assert served[0] == served[1] > 0  # the same positions through the server either way


def run_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from splitllm.cli import main; main()",
                           "loadtest", *args], capture_output=True, text=True,
                          timeout=COMMAND_S)


def test_bad_scenario_and_profile_files_are_one_line_naming_the_field(tmp_path: Path) -> None:
    scenario = tmp_path / "bad.yaml"
    scenario.write_text("duration_s: 10\nclients:\n  - {name: a, device: phone, link: 4g}\n"
                        "request_types:\n  - {name: chat, model: smollm2-135m, sla_s: -1}\n"
                        "arrivals: {process: poisson, rate_per_s: 1}\n")
    profile = tmp_path / "device.json"
    profile.write_text('{"kind": "device", "peak_flops_per_s": 1e12, "speed": 3}')
    for args, message in [
        (["--scenario", str(scenario)], "request_types[0].sla_s"),
        (["--device-profile", str(profile)], "unknown field 'speed'"),
        (["--scenario", "nowhere.yaml"], "--scenario 'nowhere.yaml'"),
        (["--policies", "fastest"], "unknown policy 'fastest'"),
        (["--clients", "moon"], "--clients 'moon'"),
    ]:
        result = run_command(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_the_commands_default_policies_are_the_specs() -> None:
    """The CLI spells its default out (its module stays light to import); it is the spec's."""
    assert DEFAULT_POLICIES.split(",") == list(LoadtestSpec.policies)


def test_a_server_on_this_machine_is_named_by_its_loopback() -> None:
    assert _on_this_machine("ws://127.0.0.1:8765") and _on_this_machine("ws://localhost:1")
    assert _on_this_machine("ws://[::1]:8765") and not _on_this_machine("ws://10.0.0.7:8765")


@pytest.mark.parametrize("clients", ["here", "fleet"])
def test_the_command_prints_the_json_document(tmp_path: Path, tiny_llama_dir: Path,
                                              llama_server: BackgroundServer,
                                              clients: str) -> None:
    scenario = tmp_path / "tiny.json"
    scenario.write_text(json.dumps(SCENARIO))
    # a budget too small for more than one probe: the document's shape, not a capacity
    result = run_command("--server", llama_server.ws_url, "--model", str(tiny_llama_dir),
                         "--scenario", str(scenario), "--policies", "server-only,exact",
                         "--requests", "4", "--length-scale", "0.05", "--sla-s", "0.3",
                         "--device-profile", "laptop", "--max-minutes", "0.01", "--json",
                         "--clients", clients, "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    # a fleet's clients compute no units: no shared machine calibrated, and the report says so
    assert (document["client_host"] is None) == (clients == "fleet")
    report = (tmp_path / "report" / "report.md").read_text()
    assert ("are NOT computed (`--clients fleet`)" in report) == (clients == "fleet")
    assert set(document["policies"]) == {"server-only", "exact"}
    for entry in document["policies"].values():
        assert {"capacity_req_s", "attainment", "ttft_p99_s", "simulated_capacity_req_s",
                "server_cpu_s_per_request", "probes"} <= set(entry)
        assert entry["search_cut_short"]
    # the whole run within 0.6 s of budget: the simulated search stopped after its first probe
    server_only = document["policies"]["server-only"]
    assert server_only["simulated_search_cut_short"]
    assert server_only["simulated_capacity_req_s"] is not None  # null: infinite
    assert document["sla_s"] == {"chat": 0.3} and document["requests_per_probe"] == 4
    assert document["server_job_s"] > 0  # the idle check's forwards cost the server CPU
    assert [e["link"]["name"] for e in document["emulated"]] == ["lan", "wifi"]
    assert [(row["client_class"], row["policy"]) for row in document["idle"]] == [
        (c, p) for c in ("box", "laptop") for p in ("server-only", "exact")]
    assert "simulated capacity" in result.stderr  # progress lines
