"""Old load-test runs under the bracket-crossing estimator and at their probes' speeds: how
much of their error was the capacity search's quantisation, and how much the machine's speed.

Rebuilds each results.json's start-of-run world (azure-conv on SmolLM2, its step model, visit
cost and client-host calibration, this machine's device profile), checks that the simulator
gives its recorded simulated capacity again, and prints both sides as recorded (highest
passing rate) beside the crossing interpolated in the last bracket (`sim.capacity.Bracket`),
then the prediction at the speeds the policy's probes measured (`loadtest_world.as_probed`):

    PYTHONPATH=src python benchmarks/loadtest_requant.py --device-profile device.json \
        run1/results.json run2/results.json
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from splitllm.planner.hardware import device_preset
from splitllm.runtime.loadtest_command import _scenario
from splitllm.runtime.loadtest_host import HostFit
from splitllm.runtime.loadtest_world import (
    LoadtestSpec,
    Probed,
    as_probed,
    loadtest_world,
    speed_factors,
)
from splitllm.runtime.models import context_tokens, load_model
from splitllm.sim.capacity import bracket_of, find_capacity
from splitllm.sim.world import World
from splitllm.stepmodel import StepModel


def start_world(document: dict[str, Any], device_profile: str) -> World:
    """The start-of-run world a results.json was simulated on."""
    loaded = load_model("smollm2")
    world, classes = loadtest_world(
        _scenario(str(document["scenario"])), config=loaded.model.config.to_dict(),
        context_tokens=context_tokens(loaded.model.config),
        this_machine=device_preset(device_profile),
        step=StepModel.from_json(document["step_model"]),
        spec=LoadtestSpec(requests=int(document["requests_per_probe"]),
                          length_scale=float(document["length_scale"]), sla_factor=3.0),
        visit_s=float(document["visit_s"]))
    host = document["client_host"]  # None: `--clients fleet`, no client shares the server's host
    return replace(world, client_host=host and HostFit.from_json(host).host(classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--device-profile", required=True)
    args = parser.parse_args()
    for path in args.results:
        document = json.loads(path.read_text())
        world = start_world(document, args.device_profile)
        print(f"{path}: SLA {world.types[0].sla_s:.3g} s (recorded "
              f"{next(iter(document['sla_s'].values())):.3g} s)")
        for name, entry in document["policies"].items():
            simulated = find_capacity(world, name)
            measured = bracket_of(((p["rate_req_s"], p["attainment"] if p["attainment"]
                                    is not None else math.nan, p["requests"])
                                   for p in entry["probes"]), world.sweep.target_attainment)
            old_m, old_s = entry["capacity_req_s"], entry["simulated_capacity_req_s"]
            new_m = measured.crossing_per_s(world.sweep.target_attainment)
            new_s = simulated.crossing_per_s
            ran = [Probed(rate_per_s=p["rate_req_s"],
                          # runs before the wall seconds were recorded: their CPU seconds
                          server_s_per_request=p.get("server_wall_s_per_request")
                          or p["server_s_per_request"],
                          client_cpu_s=p["client_cores_busy"] * p["wall_s"])
                   for p in entry["probes"] if not p["stopped_early"]]
            server, clients = speed_factors(world, name, ran)
            probed = find_capacity(as_probed(world, server, clients), name).crossing_per_s
            print(f"  {name:17s} recorded {old_m:.3g} / {old_s:.3g} ({old_s / old_m - 1:+.0%}; "
                  f"re-simulated {simulated.rate_per_s:.3g}) | crossing {new_m:.3g} / "
                  f"{new_s:.3g} ({new_s / new_m - 1:+.0%}) | at its probes' speeds (server "
                  f"x{server:.2f}, clients' CPU x{clients:.2f}) {probed:.3g} "
                  f"({probed / new_m - 1:+.0%})", flush=True)


if __name__ == "__main__":
    main()
