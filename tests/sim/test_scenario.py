"""Scenario files: good ones load; bad ones give one clear line naming the field (exit 2)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from splitllm.errors import UserError
from splitllm.sim.builtin import MIXED, builtin_world
from splitllm.sim.scenario import load_scenario

SCENARIOS = Path(__file__).parents[2] / "docs" / "scenarios"
CLI = [sys.executable, "-c", "from splitllm.cli import main; main()"]


def _write(tmp_path: Path, doc: Any, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc) if name.endswith(".json") else yaml.safe_dump(doc))
    return path


def _mutated(edit: Any) -> dict[str, Any]:
    doc = copy.deepcopy(MIXED)
    edit(doc)
    return doc


BAD = [
    (lambda d: d["request_types"][0].pop("sla_s"), "request_types[0].sla_s: Field required"),
    (lambda d: d["clients"][1].update(share=-1),
     "clients[1].share: Input should be greater than 0"),
    (lambda d: d["clients"][0].update(device="phne"), "clients[0].device: unknown device 'phne'"),
    (lambda d: d["server"].update(schedular="ps"),
     "server.schedular: Extra inputs are not permitted"),
    (lambda d: d["server"].update(scheduler="lifo"), "server.scheduler: Input should be 'fcfs'"),
    (lambda d: d.update(policies=["exact", "magic"]), "policies: unknown policy 'magic'"),
    (lambda d: d["request_types"][0]["prompt_tokens"].pop("high"),
     "request_types[0].prompt_tokens: a uniform distribution needs field 'high'"),
    (lambda d: d["request_types"][2].update(model="llama-9"),
     "request_types[2].model: unknown model 'llama-9'"),
    (lambda d: d["request_types"][2].update(keep_on_client=["block99"]),
     "request_types[2]: unknown unit 'block99'"),
    (lambda d: d["request_types"][2].update(keep_on_client=["head"], keep_on_server=["head"]),
     "request_types[2]: unit 'head' is in both keep_on_client and keep_on_server"),
    (lambda d: d["arrivals"].pop("rate_per_s"), "arrivals: poisson arrivals need 'rate_per_s'"),
    (lambda d: d.update(duration_s="long"), "duration_s: Input should be a valid number"),
    (lambda d: d["clients"].append(dict(d["clients"][0])),
     "clients: the name 'phone-4g' is used twice"),
    (lambda d: d["request_types"][1].update(
        output_tokens={"dist": "choice", "values": [1, 2], "weights": [1]}),
     "request_types[1].output_tokens: choice: weights must have one entry per value"),
    (lambda d: d.pop("clients"), "clients: Field required"),
    (lambda d: d["request_types"][0].update(speculation={"draft_tokens": 4, "hit_rate": 1.5}),
     "request_types[0].speculation: speculation needs draft_tokens >= 0 and a hit rate in"),
    (lambda d: d["request_types"][0].update(speculation={"draft_tokens": 4}),
     "request_types[0].speculation.hit_rate: Field required"),
]


@pytest.mark.parametrize(("edit", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_field_is_named_in_one_line(tmp_path: Path, edit: Any, message: str) -> None:
    path = _write(tmp_path, _mutated(edit))
    with pytest.raises(UserError) as info:
        load_scenario(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"scenario {path}: ")
    assert message in text


def test_bad_yaml_and_top_level(tmp_path: Path) -> None:
    broken = tmp_path / "b.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match=r"not valid YAML \(line 2: "):
        load_scenario(broken)
    with pytest.raises(UserError, match="expected a mapping"):
        load_scenario(_write(tmp_path, [1, 2]))
    with pytest.raises(UserError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")


def test_trace_errors_name_the_line(tmp_path: Path) -> None:
    doc = yaml.safe_load((SCENARIOS / "replay.yaml").read_text())
    (tmp_path / "trace.csv").write_text("arrived_at_s,request_type\n0.5,chat\n1.0,chatty\n")
    with pytest.raises(UserError, match=r"line 3: unknown request type 'chatty'"):
        load_scenario(_write(tmp_path, doc))
    (tmp_path / "trace.csv").write_text("when,request_type\n0.5,chat\n")
    with pytest.raises(UserError, match="missing column 'arrived_at_s'"):
        load_scenario(_write(tmp_path, doc))


def test_azure_traces_load_capped_with_one_line_errors(tmp_path: Path) -> None:
    doc = yaml.safe_load((SCENARIOS / "replay.yaml").read_text())
    doc["arrivals"] = {"process": "trace", "path": "azure.csv", "format": "azure", "rows": 2,
                       "request_type": "chat", "max_prompt_tokens": 300, "max_output_tokens": 40}
    trace = tmp_path / "azure.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:15:48.5,374,44\n2023-11-16 18:15:46.0,1396,9\n"
                     "2023-11-16 18:15:50.0,10,10\n")
    world = load_scenario(_write(tmp_path, doc))
    assert world.trace is not None
    assert world.trace.arrived_at_s == pytest.approx((0.0, 2.5))  # 2 rows, sorted
    assert world.trace.prompt_tokens == (300, 300) and world.trace.output_tokens == (9, 40)
    assert world.trace.type_index == (0, 0) and world.trace.class_index == (-1, -1)
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,3,4\n")
    with pytest.raises(UserError, match=r"line 2: TIMESTAMP must be a date and time"):
        load_scenario(_write(tmp_path, doc))
    trace.write_text("TIMESTAMP,Prompt\n2023-11-16 18:15:48.5,3\n")
    with pytest.raises(UserError, match=r"missing column 'ContextTokens'"):
        load_scenario(_write(tmp_path, doc))
    with pytest.raises(UserError, match=r"arrivals.request_type: unknown request type 'x'"):
        load_scenario(_write(tmp_path, {**doc, "arrivals": {**doc["arrivals"],
                                                              "request_type": "x"}}))
    plain = {**doc, "arrivals": {"process": "trace", "path": "azure.csv", "rows": 2}}
    with pytest.raises(UserError, match=r"arrivals: request_type, rows and max_\*_tokens apply"):
        load_scenario(_write(tmp_path, plain))


def test_good_files_load_and_match_the_builtin(tmp_path: Path) -> None:
    as_json = load_scenario(_write(tmp_path, MIXED, "mixed.json"))
    assert as_json == builtin_world("mixed")
    office = load_scenario(SCENARIOS / "office.yaml")
    thin = office.clients[1]
    assert thin.device.mem_capacity_bytes == 2e9  # preset with an override
    assert thin.device.peak_flops_per_s == 2.6e12
    assert thin.link.rtt_s == 0.01
    assert office.types[1].keep_on_client == frozenset({"embed"})
    replay = load_scenario(SCENARIOS / "replay.yaml")
    assert replay.trace is not None and len(replay.trace.arrived_at_s) == 240
    assert replay.trace.arrived_at_s[0] == 0.0


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_bad_scenario_exits_2_with_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, _mutated(lambda d: d["request_types"][3].update(sla_s=0)))
    done = _cli("simulate", "--scenario", str(path), "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "request_types[3].sla_s: Input should be greater than 0" in lines[0]
    assert not (tmp_path / "r").exists()


def test_cli_bad_flags_exit_2(tmp_path: Path) -> None:
    for args, message in (
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--scenario", "nowhere.yaml"],
         "use paper, mixed, azure-conv, azure-code or a scenario file"),
        (["--scenario", "paper", "--policies", "exact"], "--policies does not apply"),
        (["--rates", "1,fast"], "--rates '1,fast': expected numbers"),
        (["--policies", "exact,wizard"], "policies: unknown policy 'wizard'"),
        (["--scheduler", "lifo"], "server.scheduler: Input should be"),
    ):
        done = _cli("simulate", *args, "--out", str(tmp_path / "r"), cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1
        assert message in done.stderr
