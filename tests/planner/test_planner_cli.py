"""`splitllm plan` and `splitllm presets`, run as a user runs them (the console script)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from planner_kit import brute_force_case, hand_instance, with_field

from splitllm.planner.configs import MODEL_CONFIGS
from splitllm.planner.hardware import DEVICE_PRESETS, LINK_PRESETS
from splitllm.planner.instance import Instance
from splitllm.planner.instance_file import instance_to_dict, save_instance
from splitllm.planner.solvers import solve

SPLITLLM = str(Path(sys.executable).with_name("splitllm"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SPLITLLM, *args], capture_output=True, text=True, timeout=120)


def instance_file(tmp_path: Path, instance: Instance) -> str:
    path = tmp_path / "instance.json"
    save_instance(instance, path)
    return str(path)


def test_plan_instance_json_prints_the_exact_plan(tmp_path: Path) -> None:
    instance = brute_force_case(41)  # 14 units, finite SLA
    expected = solve(instance, "exact")
    assert expected is not None
    result = run("plan", "--instance", instance_file(tmp_path, instance), "--solver", "exact",
                 "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["feasible"] is True
    assert out["placement"] == expected.placement.sides
    assert out["latency_s"] == pytest.approx(expected.latency_s, rel=1e-12)
    assert out["server_work"] == pytest.approx(expected.server_work, rel=1e-12)
    assert out["client_mem_bytes"] == pytest.approx(expected.client_mem_bytes, rel=1e-12)


def test_plan_of_an_infeasible_instance_says_why_and_exits_3(tmp_path: Path) -> None:
    # Two units that each take >= 1 s anywhere; SLA 0.5 s.
    instance = hand_instance([(1.0, 1.0, 1.0, 0.0), (1.0, 1.0, 1.0, 0.0)], sla_s=0.5)
    result = run("plan", "--instance", instance_file(tmp_path, instance), "--json")
    assert result.returncode == 3
    out = json.loads(result.stdout)
    assert out["feasible"] is False
    assert out["reason"]


def test_exported_model_instance_replans_to_the_same_plan(tmp_path: Path) -> None:
    exported = tmp_path / "exported.json"
    model_args = ["--model", "llama-3-8b", "--client", "laptop", "--link", "wifi",
                  "--prompt-tokens", "512", "--output-tokens", "8", "--sla-s", "3",
                  "--ttft-s", "2", "--json"]
    first = run("plan", *model_args, "--export-instance", str(exported))
    assert first.returncode == 0, first.stderr
    second = run("plan", "--instance", str(exported), "--json")
    assert second.returncode == 0, second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["placement"] == b["placement"]
    assert a["server_work"] == pytest.approx(b["server_work"], rel=1e-12)
    assert a["latency_s"] == pytest.approx(b["latency_s"], rel=1e-12)


def test_plan_with_milp_solver_matches_exact(tmp_path: Path) -> None:
    instance = brute_force_case(69)
    expected = solve(instance, "exact")
    assert expected is not None
    result = run("plan", "--instance", instance_file(tmp_path, instance), "--solver", "milp",
                 "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["server_work"] == pytest.approx(expected.server_work)


def test_plan_frontier_json_lists_the_frontier(tmp_path: Path) -> None:
    instance = brute_force_case(13)
    result = run("plan", "--instance", instance_file(tmp_path, instance), "--frontier",
                 "--json")
    assert result.returncode in (0, 3), result.stderr
    out = json.loads(result.stdout)
    works = [p["server_work"] for p in out["frontier"]]
    assert works == sorted(works)
    assert out["frontier_size"] == len(works) > 0


def test_plan_prints_tables_without_json(tmp_path: Path) -> None:
    result = run("plan", "--model", "smollm2-135m", "--client", "phone", "--link", "5g",
                 "--sla-s", "2")
    assert result.returncode == 0, result.stderr
    for solver in ("exact", "server-only", "greedy", "best-single-cut"):
        assert solver in result.stdout


def test_presets_lists_every_model_device_link_and_solver() -> None:
    result = run("presets")
    assert result.returncode == 0, result.stderr
    names = [*MODEL_CONFIGS, *DEVICE_PRESETS, *LINK_PRESETS, "exact", "dp-grid", "milp",
             "greedy", "best-single-cut", "server-only", "client-only"]
    missing = [name for name in names if name not in result.stdout]
    assert not missing


@pytest.mark.parametrize("args", [["--help"], ["plan", "--help"], ["presets", "--help"]])
def test_help_works(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def good_instance() -> dict[str, Any]:
    return instance_to_dict(brute_force_case(41))


def with_good_field(path: str, value: Any) -> dict[str, Any]:
    """good_instance() with one field set (None: removed)."""
    return with_field(good_instance(), path, value)


# (instance file content or None for the default file, extra args, what stderr must name)
BAD_INPUTS: dict[str, tuple[Any, list[str], str]] = {
    "malformed json": ('{"layers": [', [], "malformed JSON"),
    "missing field": (with_good_field("sla_s", None), [], "sla_s"),
    "missing layer field": (with_good_field("layers.2.server_work", None), [], "server_work"),
    "unknown field": (with_good_field("colour", "blue"), [], "colour"),
    "unknown layer field": (with_good_field("layers.0.colour", "blue"), [], "colour"),
    "negative": (with_good_field("rtt_s", -0.1), [], "rtt_s"),
    "negative layer value": (with_good_field("layers.1.client_s", -1.0), [], "client_s"),
    "zero sla": (with_good_field("sla_s", 0), [], "sla_s"),
    "zero bandwidth": (with_good_field("uplink_bytes_per_s", 0), [], "uplink_bytes_per_s"),
    "nan": (with_good_field("sla_s", math.nan), [], "sla_s"),
    "infinity": (with_good_field("layers.0.out_bytes", math.inf), [], "out_bytes"),
    "no layers": (with_good_field("layers", []), [], "layers"),
    "missing file": (None, ["--instance", "/nonexistent/instance.json"], "instance.json"),
    "unknown solver": ({}, ["--solver", "nosuch"], "nosuch"),
    "zero step": ({}, ["--solver", "dp-grid", "--step-s", "0"], "step"),
    "unknown client": (None, ["--client", "nosuch"], "nosuch"),
    "unknown server": (None, ["--server", "nosuch"], "nosuch"),
    "unknown link": (None, ["--link", "nosuch"], "nosuch"),
    "missing profile": (None, ["--client", "/nonexistent/phone.json"],
                        "device profile /nonexistent/phone.json: no such file"),
    "unknown model": (None, ["--model", "nosuch"], "nosuch"),
    "unknown dtype": (None, ["--weight-dtype", "int3"], "int3"),
    "unknown unit": (None, ["--keep-on-client", "block99"], "block99"),
    "negative sla": (None, ["--sla-s", "-1"], "sla_s"),
    "nan sla": (None, ["--sla-s", "nan"], "sla_s"),
    "zero ttft": (None, ["--ttft-s", "0"], "ttft_s"),
    "zero prompt": (None, ["--prompt-tokens", "0"], "prompt_tokens"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_on_stderr_and_exit_2(tmp_path: Path, case: str) -> None:
    content, args, named = BAD_INPUTS[case]
    if content is not None:
        path = tmp_path / "instance.json"
        data = content or good_instance()
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        args = ["--instance", str(path), *args]
    result = run("plan", *args, "--json")
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
