"""`splitllm profile`: fitted device profiles, link profiles, and how they move the planner; unit
profiles in wall and CPU seconds, the server's step model, the per-visit and per-pass costs."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from runtime_kit import TIMEOUT_S
from typer.testing import CliRunner

from splitllm.cli import app, main
from splitllm.placement import Placement
from splitllm.planner.configs import MODEL_CONFIGS
from splitllm.planner.costs import model_costs
from splitllm.planner.hardware import (
    DeviceProfile,
    device_preset,
    link_preset,
    load_profile,
    save_profile,
)
from splitllm.planner.instance import Instance, Request, Unit, build_instance, evaluate
from splitllm.planner.network import Link
from splitllm.planner.solvers import solve
from splitllm.runtime.autoplace import (
    fastest_uniform_s,
    measured_instance,
    profile_server_times,
    step_model_server_times,
)
from splitllm.runtime.client import connect
from splitllm.runtime.device_profile import Sample, fit_device, profile_device
from splitllm.runtime.dialer import fetch_info, fetch_rows_per_step
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.profile import UnitProfile, filled_cache, profile_units
from splitllm.runtime.units import UnitStack
from splitllm.runtime.wire_bytes import WireFormat, request_bytes
from splitllm.stepmodel import StepModel, UnitFit

# A CPU-like device: what `splitllm profile` fitted on this 2-core machine (loaded).
CPU = DeviceProfile(name="cpu", peak_flops_per_s=3.1e10, mem_bandwidth_bytes_per_s=2.8e9,
                    mem_capacity_bytes=2.5e10, efficiency=1.0)
COSTS = model_costs(MODEL_CONFIGS["smollm2-135m"], weight_bytes=4, wire_bytes=4)
REQUEST = Request(prompt_tokens=64, output_tokens=8)


def plan_for(client: DeviceProfile, link: Link) -> str:
    """The exact plan's placement at 1.3x the faster uniform placement's latency."""
    instance = build_instance(COSTS, client, replace(CPU, name="server"), link, REQUEST)
    instance = replace(instance, sla_s=1.3 * fastest_uniform_s(instance))
    plan = solve(instance, solver="exact")
    assert plan is not None
    return str(plan.placement)


def slower(device: DeviceProfile, factor: float) -> DeviceProfile:
    return replace(device, peak_flops_per_s=device.peak_flops_per_s / factor,
                   mem_bandwidth_bytes_per_s=device.mem_bandwidth_bytes_per_s / factor)


def test_fit_recovers_a_known_roofline() -> None:
    truth = DeviceProfile(name="t", peak_flops_per_s=2e10, mem_bandwidth_bytes_per_s=5e9,
                          mem_capacity_bytes=1e9, efficiency=1.0)
    work = [(1e9, 4e8), (4e9, 5e8), (1e8, 5e8), (2e8, 6e8)]  # two compute-, two memory-bound
    samples = [Sample(kind="x", tokens=1, seconds=truth.time_s(f, b), flops=f, mem_bytes=b)
               for f, b in work]
    fitted = fit_device(samples, name="t", mem_capacity_bytes=1e9)
    assert fitted.peak_flops_per_s == pytest.approx(2e10, rel=1e-3)
    assert fitted.mem_bandwidth_bytes_per_s == pytest.approx(5e9, rel=1e-3)


def test_a_measured_profile_round_trips_through_json(tiny_llama: LoadedModel,
                                                     tmp_path: Path) -> None:
    device, samples = profile_device(UnitStack(tiny_llama.model),
                                     tiny_llama.model.config.to_dict(), name="tiny-host",
                                     prompt_tokens=(4, 8), contexts=(5, 200))
    assert [(s.kind, s.tokens) for s in samples] == [("prefill", 4), ("prefill", 8),
                                                     ("decode", 5), ("decode", 200)]
    assert all(s.seconds == s.wall_s > 0 and s.cpu_s > 0 and s.flops > 0 and s.mem_bytes > 0
               for s in samples)
    on_cpu, cpu_samples = profile_device(UnitStack(tiny_llama.model),
                                         tiny_llama.model.config.to_dict(), name="tiny-cpu",
                                         prompt_tokens=(4, 8), contexts=(5, 200), clock="cpu")
    assert all(s.seconds == s.cpu_s for s in cpu_samples) and on_cpu.name == "tiny-cpu"
    path = tmp_path / "tiny-host.json"
    save_profile(device, path)
    assert load_profile(path) == device
    assert device_preset(str(path)) == device  # accepted wherever a preset is


def test_a_slower_client_moves_units_to_the_server() -> None:
    wifi = link_preset("wifi")
    on_server = [plan_for(slower(CPU, f), wifi).count("S") for f in (1, 2, 4, 8)]
    assert on_server == sorted(on_server) and on_server[-1] > on_server[0]


def test_a_faster_link_allows_more_switches(tmp_path: Path) -> None:
    client = slower(CPU, 2)
    slow, fast = tmp_path / "slow.json", tmp_path / "fast.json"
    save_profile(Link(uplink_bytes_per_s=1e4, downlink_bytes_per_s=1e4, rtt_s=0.2), slow)
    save_profile(Link(uplink_bytes_per_s=1e9, downlink_bytes_per_s=1e9, rtt_s=1e-4), fast)
    on_slow, on_fast = (plan_for(client, link_preset(str(p))) for p in (slow, fast))
    switches = [sum(a != b for a, b in zip("C" + p, p + "C", strict=True))
                for p in (on_slow, on_fast)]  # the input and output crossings count too
    assert switches[0] < switches[1]


def test_profile_command_writes_both_profiles(tiny_llama_dir: Path, llama_server: BackgroundServer,
                                              tmp_path: Path) -> None:
    device, link = tmp_path / "d.json", tmp_path / "l.json"
    result = CliRunner().invoke(app, ["profile", "--model", str(tiny_llama_dir), "--out",
                                      str(device), "--server", llama_server.ws_url,
                                      "--link-out", str(link), "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout.strip().splitlines()[-1])
    # 3 prompt lengths, 2 contexts: the tiny model's 256 positions cap 256 and 1024 alike.
    assert document["device"]["kind"] == "device" and len(document["samples"]) == 5
    assert document["link"]["visit_s"] >= 0
    assert isinstance(device_preset(str(device)), DeviceProfile)
    measured = link_preset(str(link))
    assert measured.rtt_s > 0 and measured.uplink_bytes_per_s > 0
    assert document["link"]["rtt_s"] == measured.rtt_s


@pytest.mark.parametrize(("content", "field"), [
    ({"kind": "device", "name": "x", "peak_flops_per_s": -1, "mem_bandwidth_bytes_per_s": 1,
      "mem_capacity_bytes": 1}, "peak_flops_per_s"),
    ({"kind": "device", "name": "x", "peak_flops_per_s": 1, "mem_capacity_bytes": 1},
     "mem_bandwidth_bytes_per_s"),
    ({"kind": "link", "uplink_bytes_per_s": 1, "downlink_bytes_per_s": 1, "rtt_s": 1,
      "jitter_s": 1}, "jitter_s"),
    ({"kind": "modem"}, "kind"),
])
def test_a_bad_profile_file_is_one_line_and_exit_2(
        content: dict[str, object], field: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    option = "--link" if content.get("kind") == "link" else "--client"
    monkeypatch.setattr(sys, "argv", ["splitllm", "plan", "--model", "smollm2-135m", option,
                                      str(path)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and lines[0].startswith("error:")


# -- unit profiles in wall and CPU seconds, the server's step model, per-visit and per-pass costs

NAMES = ("embed", "block0", "block1", "head")


def unit_profile(wall: float, cpu: float, pass_s: float = 0.0) -> UnitProfile:
    """Every unit 1 ms + 0.1 ms per prompt token of prefill and 2 ms per decode step, x wall
    (x cpu in CPU seconds)."""
    lengths, contexts = (8, 16, 32), (16, 256)

    def rows(scale: float) -> tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]]:
        prefill = tuple((scale * (1e-3 + 1e-4 * p),) * len(NAMES) for p in lengths)
        return prefill, tuple((scale * 2e-3,) * len(NAMES) for _ in contexts)

    (prefill, decode), (prefill_cpu, decode_cpu) = rows(wall), rows(cpu)
    return UnitProfile(names=NAMES, prompt_tokens=lengths, prefill_s=prefill, contexts=contexts,
                       decode_s=decode, threads=1, prefill_cpu_s=prefill_cpu,
                       decode_cpu_s=decode_cpu, pass_s=pass_s)


def test_an_emulated_slowdown_scales_cpu_seconds_as_the_emulation_does() -> None:
    # Wall 2 x CPU (a loaded machine): x3 emulated is 3 x CPU, not 3 x wall; x1.5 is the wall.
    profile = unit_profile(wall=2.0, cpu=1.0)
    slow = profile.emulated(3.0)
    assert slow.prefill_at(32) == pytest.approx(tuple(1.5 * t for t in profile.prefill_at(32)))
    assert slow.cpu().decode_at(100) == pytest.approx(profile.scaled(3.0).cpu().decode_at(100))
    assert profile.emulated(1.5).decode_at(100) == pytest.approx(profile.decode_at(100))
    assert profile.emulated(1.0) == profile
    wall_only = replace(profile, prefill_cpu_s=(), decode_cpu_s=())  # an older profile
    assert wall_only.emulated(3.0) == wall_only.scaled(3.0)


def test_unit_profiles_round_trip_with_cpu_seconds_and_the_loop_cost() -> None:
    profile = unit_profile(wall=2.0, cpu=1.0, pass_s=0.004)
    assert UnitProfile.from_json(json.loads(json.dumps(profile.to_json()))) == profile
    assert profile.cpu().prefill_at(32) == pytest.approx(tuple(0.5 * t
                                                               for t in profile.prefill_at(32)))
    assert profile.scaled(3.0).cpu().decode_at(100) == pytest.approx((6e-3,) * 4)
    older = profile.to_json()  # a server from before CPU seconds: wall seconds stand in
    for key in ("prefill_cpu_s", "decode_cpu_s", "pass_s"):
        del older[key]
    assert UnitProfile.from_json(older).cpu().prefill_at(8) == profile.prefill_at(8)


def test_profile_units_times_both_clocks_at_long_contexts(tiny_llama: LoadedModel) -> None:
    stack = UnitStack(tiny_llama.model)
    profile = profile_units(stack, prompt_tokens=(4, 16), contexts=(8, 64, 1024), rounds=3)
    assert profile.contexts == (8, 64, stack.max_positions - 2)  # spans the model's positions
    for wall, cpu in ((profile.prefill_s, profile.prefill_cpu_s),
                      (profile.decode_s, profile.decode_cpu_s)):
        assert np.shape(wall) == np.shape(cpu) == (len(wall), stack.n_units)
        # A thread's CPU seconds never exceed the wall seconds they were spent in (the two
        # clocks are read a few microseconds apart: slack for that).
        assert np.sum(cpu) <= 1.05 * np.sum(wall) + 1e-4 and np.all(np.array(cpu) > 0)
    cache = filled_cache(stack, 100)
    assert cache is not None and cache.get_seq_length() == 100


def test_the_step_model_gives_server_latency_and_work_at_the_load() -> None:
    fit = UnitFit.line(fixed_s=0.01, per_token_s=0.001)
    wall = StepModel(embed=UnitFit.line(0.0, 0.0001), block=fit, head=fit, n_blocks=2)
    cpu = StepModel(embed=UnitFit.line(0.0, 0.00005), block=UnitFit.line(0.005, 0.0005),
                    head=UnitFit.line(0.005, 0.0005), n_blocks=2)
    request = Request(prompt_tokens=10, output_tokens=5)  # a prefill and 4 decode steps
    alone = step_model_server_times(wall, cpu, request, rows=1)
    block = 0.01 + 0.001 * 10 + 4 * (0.01 + 0.001 * 1)
    assert alone.latency_s == pytest.approx((0.0001 * 14, block, block, 4 * 0.011 + 0.011))
    assert alone.work_s[1] == pytest.approx(0.005 + 0.0005 * 10 + 4 * 0.0055)
    # 8 rows per step: each decode step takes the step of 8 rows, costs 1/8 of its CPU seconds.
    loaded = step_model_server_times(wall, cpu, request, rows=8)
    assert loaded.latency_s[1] == pytest.approx(0.02 + 4 * (0.01 + 0.008))
    assert loaded.work_s[1] == pytest.approx(0.01 + 4 * (0.005 + 0.004) / 8)
    assert "8 rows per step" in loaded.source
    # With the server's unit profile, a prompt beyond the curve's longest step (its lines are
    # measured at 0 and 1 token): per unit the slower prefill of the two (the profile's, timed
    # at prompt lengths with the head at one position, or the curve's extension); always the
    # profile's KV reads of the decode steps; the decode steps themselves are the line's.
    step_prefill = [f.seconds(10) for f in (wall.embed, fit, fit)] + [wall.head.seconds(1)]
    steps_wall = np.subtract(loaded.latency_s, step_prefill)
    for scale in (1.0, 0.001):  # the profile slower than the step model, then faster
        profile = unit_profile(wall=scale, cpu=scale / 2)
        with_profile = step_model_server_times(wall, cpu, request, rows=8, profile=profile)
        prefill = np.maximum(profile.prefill_at(10), step_prefill)
        assert with_profile.latency_s == pytest.approx(
            np.add(prefill, steps_wall) + profile.kv_reads_s(10, 4))
        assert with_profile.work_s[1] == pytest.approx(
            max(profile.cpu().prefill_at(10)[1], 0.005 + 0.0005 * 10)
            + 4 * (0.005 + 0.004) / 8 + profile.cpu().kv_reads_s(10, 4)[1])
    assert list(with_profile.latency_s) != list(np.add(profile.prefill_at(10), steps_wall)
                                                + profile.kv_reads_s(10, 4))  # the curve's
    assert "beyond its longest step: the slower of it and the unit profile" in with_profile.source
    assert (with_profile.job_s, with_profile.job_work_s) == (0.0, 0.0)  # none announced


def test_within_the_step_models_measured_steps_its_prefill_is_the_curves() -> None:
    """A prompt no longer than the steps the curve was measured at: the curve's prefill even
    where the unit profile is slower (timed once at start, announced at the decode steps'
    speed); a longer prompt: the slower of the two, per unit."""
    curve = UnitFit(((1.0, 0.001), (16.0, 0.004)))  # measured steps of 1 and 16 tokens
    wall = StepModel(embed=curve, block=curve, head=curve, n_blocks=2)
    slow = unit_profile(wall=10.0, cpu=10.0)  # prefill 10-42 ms per unit: slower than the curve
    for prompt_tokens in (8, 16, 17):
        times = step_model_server_times(wall, wall, Request(prompt_tokens=prompt_tokens,
                                                            output_tokens=1), profile=slow)
        prefill = np.array([curve.seconds(prompt_tokens)] * 3)  # embed and the two blocks
        assert np.all(prefill < slow.prefill_at(prompt_tokens)[:3])  # the profile is slower
        if prompt_tokens > 16:
            prefill = np.maximum(prefill, slow.prefill_at(prompt_tokens)[:3])
        assert times.latency_s == pytest.approx([*prefill, curve.seconds(1)])


def test_the_servers_seconds_per_job_are_charged_per_visit_and_pass() -> None:
    """The step models' job_s (wall: latency, CPU: work) go into the planner's instance, which
    charges them once per visit and pass."""
    fit = UnitFit.line(fixed_s=0.01, per_token_s=0.001)
    wall = StepModel(embed=fit, block=fit, head=fit, n_blocks=2, job_s=0.004)
    cpu = replace(wall, job_s=0.002)
    request = Request(prompt_tokens=10, output_tokens=5)  # 5 passes
    server = step_model_server_times(wall, cpu, request)
    assert (server.job_s, server.job_work_s) == (0.004, 0.002)
    client = unit_profile(wall=2.0, cpu=2.0)
    link = Link(uplink_bytes_per_s=1e9, downlink_bytes_per_s=1e9, rtt_s=0.0)
    sizes = request_bytes(WireFormat(n_units=4, hidden_size=8, wire_dtype="float32",
                                     vocab_size=16), 10, 5)
    costly = measured_instance(client, server, link, request, sizes)
    free = measured_instance(client, replace(server, job_s=0.0, job_work_s=0.0), link, request,
                             sizes)
    for sides, visits in (("SSSS", 1), ("CSCS", 2), ("SCSC", 2)):
        paid, not_paid = evaluate(costly, Placement(sides)), evaluate(free, Placement(sides))
        assert paid.server_work - not_paid.server_work == pytest.approx(visits * 5 * 0.002)
        assert paid.latency_s - not_paid.latency_s == pytest.approx(visits * 5 * 0.004)


def test_the_client_loop_cost_is_paid_by_every_placement() -> None:
    link = Link(uplink_bytes_per_s=1e7, downlink_bytes_per_s=1e7, rtt_s=0.01)
    request = Request(prompt_tokens=16, output_tokens=6)
    fmt = WireFormat(n_units=4, hidden_size=64, wire_dtype="float32", vocab_size=320)
    server = profile_server_times(unit_profile(wall=1.0, cpu=0.5), request)
    without, with_loop = (
        measured_instance(unit_profile(wall=3.0, cpu=3.0, pass_s=pass_s), server, link, request,
                          request_bytes(fmt, 16, 6)) for pass_s in (0.0, 0.01))
    for sides in ("CCCC", "SSSS", "CSSC", "CSCC"):
        a, b = (evaluate(i, Placement(sides)) for i in (without, with_loop))
        assert b.latency_s == pytest.approx(a.latency_s + 6 * 0.01)
        assert b.server_work == a.server_work  # CPU seconds of the server's units only
    assert evaluate(without, Placement("SSSS")).server_work == pytest.approx(sum(server.work_s))


def server_segments(placement: str) -> int:
    return sum(segment.side == "S" for segment in Placement(placement).segments())


def visits_instance(visit_s: float) -> Instance:
    """Units 1 and 3 are slow on the client; the server's work is the same on every unit."""
    client_s = (0.01, 1.0, 0.01, 1.0, 0.01)
    units = tuple(Unit(name=f"u{i}", client_s=c, server_s=0.01, server_work=1.0, out_bytes=1e3)
                  for i, c in enumerate(client_s))
    link = Link(uplink_bytes_per_s=1e9, downlink_bytes_per_s=1e9, rtt_s=1e-3, visit_s=visit_s)
    return Instance(units=units, link=link, sla_s=0.12, input_bytes=10.0, output_bytes=10.0,
                    passes=4)


def test_a_per_visit_cost_means_fewer_visits() -> None:
    plans = {visit_s: solve(visits_instance(visit_s), solver="exact")
             for visit_s in (0.0, 0.01, 0.05)}
    # Free visits: the two slow units alone go up (58 ms). At 10 ms a visit, two visits over 4
    # passes miss the SLA (138 ms): one visit, one more unit's work (98 ms). At 50 ms even one
    # visit does (254 ms), and the client alone takes 2 s: nothing meets the SLA.
    assert {v: p and str(p.placement) for v, p in plans.items()} == {
        0.0: "CSCSC", 0.01: "CSSSC", 0.05: None}
    assert evaluate(visits_instance(0.01), Placement("CSCSC")).latency_s > 0.12
    # The crossing formula: each visit, each pass, pays it going up.
    extra = (evaluate(visits_instance(0.01), Placement("CSCSC")).latency_s
             - evaluate(visits_instance(0.0), Placement("CSCSC")).latency_s)
    assert extra == pytest.approx(2 * 4 * 0.01)


def test_a_link_profile_carries_its_visit_cost(tmp_path: Path) -> None:
    link = Link(uplink_bytes_per_s=1e6, downlink_bytes_per_s=1e6, rtt_s=0.01, visit_s=0.003,
                name="measured")
    save_profile(link, tmp_path / "l.json")
    assert load_profile(tmp_path / "l.json") == link
    older = {"kind": "link", "uplink_bytes_per_s": 1, "downlink_bytes_per_s": 1, "rtt_s": 1}
    (tmp_path / "old.json").write_text(json.dumps(older))
    assert link_preset(str(tmp_path / "old.json")).visit_s == 0.0


def test_a_session_measures_the_visit_cost_and_the_servers_load(
        tiny_llama: LoadedModel, llama_server: BackgroundServer) -> None:
    with connect(llama_server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as session:
        link = session.measure_link()
        assert link.visit_s >= 0
        session.generate([5, 6, 7], 3, placement="S" * session.stack.n_units, chat=False)
        rows = fetch_rows_per_step(session.server, None)
        assert rows >= 1.0
        instance, source = session.instance(8, 4)
        assert "engine step model" in source
        n = len(instance)
        all_server = evaluate(instance, Placement("S" * n))
        # each pass's visit: the round trip, its fixed cost and the server's own per job (its
        # live step model's, once earlier tests' splits let it tell a visit from a block)
        announced = StepModel.from_json(fetch_info(session.server, None)["step_model"])
        assert instance.job_s == announced.job_s
        expected_network = (4 * (link.rtt_s + link.visit_s + instance.job_s)
                            + instance.input_bytes / link.uplink_bytes_per_s
                            + instance.output_bytes / link.downlink_bytes_per_s)
        # ... and once the session's opening: a round trip with its messages, no visit cost
        assert link.rtt_s < instance.session_open_s < link.rtt_s + 0.01
        assert all_server.network_s == pytest.approx(expected_network + instance.session_open_s)
