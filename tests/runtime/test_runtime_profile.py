"""`splitllm profile`: fitted device profiles, link profiles, and how they move the planner."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from splitllm.cli import app, main
from splitllm.planner.configs import MODEL_CONFIGS
from splitllm.planner.costs import model_costs
from splitllm.planner.hardware import (
    DeviceProfile,
    device_preset,
    link_preset,
    load_profile,
    save_profile,
)
from splitllm.planner.instance import Request, build_instance
from splitllm.planner.network import Link
from splitllm.planner.solvers import solve
from splitllm.runtime.autoplace import fastest_uniform_s
from splitllm.runtime.device_profile import Sample, fit_device, profile_device
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.units import UnitStack

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
                                     prompt_tokens=(4, 8), decode_steps=2)
    assert [s.kind for s in samples] == ["prefill", "decode"] * 2
    assert all(s.seconds > 0 and s.flops > 0 and s.mem_bytes > 0 for s in samples)
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
    assert document["device"]["kind"] == "device" and len(document["samples"]) == 6
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
