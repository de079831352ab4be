"""The simulator's batched server on the step model a real engine measured (/v1/info)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from sim_kit import tiny_model, tiny_world

from splitllm.errors import UserError
from splitllm.planner.hardware import DeviceProfile
from splitllm.sim.batching import BatchCost
from splitllm.sim.run import run_policy
from splitllm.sim.scenario import load_scenario
from splitllm.sim.world import ServerSpec
from splitllm.stepmodel import StepModel, UnitFit, jobs_step_s, queue_wait_s

MEASURED = StepModel(embed=UnitFit.line(0.001, 0.0001), block=UnitFit.line(0.2, 0.01),
                     head=UnitFit.line(0.05, 0.002), n_blocks=1)


def test_measured_steps_replace_the_roofline() -> None:
    world = tiny_world((0.0,), prompt=2, output=2)  # embed, one block, head
    server = DeviceProfile(name="server", peak_flops_per_s=1000.0,
                           mem_bandwidth_bytes_per_s=1000.0, mem_capacity_bytes=1e15,
                           efficiency=1.0)
    world = replace(world, types=(replace(world.types[0], model=tiny_model()),),
                    server=ServerSpec(server, "batched"))
    cost = BatchCost(world, MEASURED)
    decode, prefill, whole = (0, 1, 2, 2, 1), (0, 1, 2, 2, 0), (0, 0, 3, 2, 1)
    assert cost.step_s([decode]) == pytest.approx(0.2 + 0.01)
    # The block runs once for both rows: its fixed time is shared, not paid twice.
    assert cost.step_s([decode, decode]) == pytest.approx(0.2 + 0.02)
    assert cost.step_s([prefill, decode]) == pytest.approx(0.2 + 0.03)
    assert cost.step_s([whole, decode]) == pytest.approx(0.0011 + 0.22 + 0.052)
    assert BatchCost(world).step_s([decode, decode]) != cost.step_s([decode, decode])


def test_jobs_step_s_counts_each_unit_once_over_its_rows() -> None:
    model = replace(MEASURED, n_blocks=3)  # units: embed, 3 blocks, head
    # rows over blocks 1-2 and 2-4: block unit 2 runs once over both rows' tokens
    got = jobs_step_s(model, [(1, 3, 1), (2, 5, 4)])
    want = model.block.seconds(1) + model.block.seconds(5) + model.block.seconds(4) \
        + model.head.seconds(1)
    assert got == pytest.approx(want)


SMOL_STEPS = StepModel(embed=UnitFit.line(0.0, 1e-5), block=UnitFit.line(0.002, 1e-4),
                       head=UnitFit.line(0.01, 1e-3), n_blocks=30)  # SmolLM2: 30 blocks
ONE_CHAT = {  # SmolLM2 requests far apart on a batched server: every step serves one job
    "name": "measured", "seed": 1, "duration_s": 50, "warmup_s": 0,
    "server": {"device": "datacenter-gpu", "scheduler": "batched"},
    "clients": [{"name": "laptop", "device": "laptop", "link": "wifi"}],
    "request_types": [{"name": "chat", "model": "smollm2-135m", "prompt_tokens": 40,
                       "output_tokens": 6, "sla_s": 100}],
    "arrivals": {"process": "poisson", "rate_per_s": 0.1},
    "policies": ["server-only"],
}


def _scenario(tmp_path: Path, step_file: object, **server: object) -> Path:
    (tmp_path / "steps.json").write_text(json.dumps(step_file))
    doc = {**ONE_CHAT, "server": {**ONE_CHAT["server"], "step_model": "steps.json", **server}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("wrapped", [False, True], ids=["step-model", "v1-info"])
def test_a_scenario_runs_the_batched_server_on_a_measured_step_model(
        tmp_path: Path, wrapped: bool) -> None:
    body = SMOL_STEPS.to_json()
    world = load_scenario(_scenario(tmp_path, {"model": "x", "step_model": body} if wrapped
                                    else body))
    assert world.server.step_model == SMOL_STEPS
    rec = run_policy(world, "server-only")
    done = ~np.isnan(rec.finished_at_s)
    assert done.sum() >= 3
    # alone on the server, a request costs its prefill step and one step per decode token
    want = SMOL_STEPS.step_s(40, 1) + 5 * SMOL_STEPS.step_s(1, 1)
    assert rec.server_work_s[done] == pytest.approx(want)
    roofline = replace(world, server=replace(world.server, step_model=None))
    assert run_policy(roofline, "server-only").server_work_s[0] != pytest.approx(want)



def test_the_servers_seconds_per_job_outside_its_units_count_once_per_job(
        tmp_path: Path) -> None:
    jobs = [(0, 32, 40), (0, 32, 1), (5, 20, 1)]  # a prefill, a decode, a split's segment
    costly = replace(SMOL_STEPS, job_s=0.004)
    assert jobs_step_s(costly, jobs) == pytest.approx(jobs_step_s(SMOL_STEPS, jobs) + 0.012)
    assert costly.step_s(16, 16) == pytest.approx(SMOL_STEPS.step_s(16, 16) + 16 * 0.004)
    assert StepModel.from_json(costly.to_json()) == costly
    world = load_scenario(_scenario(tmp_path, costly.to_json()))
    assert world.server.step_model == costly
    rec = run_policy(world, "server-only")
    done = ~np.isnan(rec.finished_at_s)
    # alone on the server: the prefill step and one step per decode token, one job each
    want = SMOL_STEPS.step_s(40, 1) + 5 * SMOL_STEPS.step_s(1, 1) + 6 * 0.004
    assert rec.server_work_s[done] == pytest.approx(want)

BAD_STEPS = [
    (None, "not valid JSON"),  # the file holds `{oops`
    ({"n_blocks": 30, "embed": {"fixed_s": 0, "per_token_s": 0}}, "block: Field required"),
    ({**SMOL_STEPS.to_json(), "block": {"fixed_s": -1, "per_token_s": 0}},
     "block.fixed_s: Input should be greater than or equal to 0"),
    ({**SMOL_STEPS.to_json(), "head": {"points": [[4, 0.01], [1, 0.02]]}},
     "distinct ascending tokens"),
    ({**SMOL_STEPS.to_json(), "head": {"points": [[1, 0.01]], "fixed_s": 0.0}},
     "head: Value error, give either points or both fixed_s and per_token_s"),
    ({**SMOL_STEPS.to_json(), "n_blocks": 12}, "measured on a model of 12 blocks"),
    ([1, 2], "expected a step model object"),
]


@pytest.mark.parametrize(("content", "message"), BAD_STEPS,
                         ids=["json", "missing", "negative", "unordered", "both", "blocks",
                              "list"])
def test_a_bad_step_model_file_is_one_line_naming_the_field(
        tmp_path: Path, content: object, message: str) -> None:
    path = _scenario(tmp_path, content)
    if content is None:
        (tmp_path / "steps.json").write_text("{oops")
    with pytest.raises(UserError) as info:
        load_scenario(path)
    text = str(info.value)
    assert "\n" not in text and "server.step_model" in text and message in text


def test_a_step_model_needs_the_batched_server_and_a_readable_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"server\.step_model applies to scheduler batched"):
        load_scenario(_scenario(tmp_path, SMOL_STEPS.to_json(), scheduler="ps"))
    path = _scenario(tmp_path, SMOL_STEPS.to_json())
    (tmp_path / "steps.json").unlink()
    with pytest.raises(UserError, match=r"server.step_model: .*steps.json: cannot read"):
        load_scenario(path)


def test_cli_bad_step_model_exits_2_with_one_line(tmp_path: Path) -> None:
    path = _scenario(tmp_path, {**SMOL_STEPS.to_json(), "n_blocks": 12})
    done = subprocess.run([sys.executable, "-c", "from splitllm.cli import main; main()",
                           "simulate", "--scenario", str(path), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "server.step_model" in lines[0]


def test_the_batched_servers_delay_is_the_queue_wait_before_its_step() -> None:
    """Load-aware policies read what the real engine reports: a job's wait from its arrival to
    the start of the step that runs it, not its response less its solo time (which would also
    hold the stretching of a shared step by the other rows)."""
    world = tiny_world((0.0, 0.05, 0.1), prompt=2, output=1)
    world = replace(world, types=(replace(world.types[0], model=tiny_model()),),
                    server=ServerSpec(world.server.device, "batched", step_model=MEASURED))
    rec = run_policy(world, "server-only", log=True)
    (_, _, at0, done0), (_, _, at1, done1), (_, _, at2, done2) = sorted(rec.job_log)
    assert done1 == done2 > done0 > at2 > at1 > at0  # r0 alone, then r1 and r2 in one step
    waits = [0.0, done0 - at1, done0 - at2]
    assert rec.job_delay_mean_s == pytest.approx(np.mean(waits))
    solo_s = jobs_step_s(MEASURED, [(0, 3, 2)])
    assert done1 - done0 > solo_s  # the shared step took longer than either job alone ...
    assert rec.job_delay_mean_s < np.mean([0.0, done1 - at1 - solo_s, done2 - at2 - solo_s])


def test_a_queue_wait_runs_from_arrival_to_the_step_start() -> None:
    assert queue_wait_s(1.0, 1.25) == pytest.approx(0.25)
    assert queue_wait_s(1.0, 0.999) == 0.0  # clocks read apart: never negative
