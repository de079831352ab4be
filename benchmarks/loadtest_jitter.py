"""Does noise in the server's step times move the simulated capacity, or only scatter probes?

Rebuilds a `splitllm loadtest` run's world offline from its results.json (its SLAs, step
model, visit cost, clients' calibration and each policy's speed factors: the prediction at the
probes' speeds), then simulates one policy at the given rates with every batched step's time
times a lognormal factor of mean 1 and the given coefficients of variation (0: the load test's
own deterministic prediction), several seeds each, and prints each rate's attainment: the mean
and the range over the seeds. A real step's time over the step model's for its rows read a
coefficient of variation of 0.15 (`loadtest_tails.py --trace-out`). `--server-x F` slows the
world's server by a further F first (its deterministic capacity printed beside the run's).

    PYTHONPATH=src python benchmarks/loadtest_jitter.py reports/loadtest/results.json \\
        --device-profile device.json --policy server-only --rates 14,16,18,20
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from splitllm.planner.hardware import device_preset
from splitllm.runtime.loadtest_command import _scenario
from splitllm.runtime.loadtest_host import HostFit
from splitllm.runtime.loadtest_world import LoadtestSpec, as_probed, loadtest_world
from splitllm.runtime.models import context_tokens, load_model
from splitllm.sim.batching import BatchCost, JobShape
from splitllm.sim.capacity import find_capacity, run_point
from splitllm.sim.world import World
from splitllm.stepmodel import StepModel


def run_world(document: dict[str, Any], device_profile: str, policy: str) -> World:
    """The world the run's prediction at `policy`'s probes' speeds simulated."""
    loaded = load_model("smollm2")
    [sla_s] = set(document["sla_s"].values())  # the built-in traces: one request type
    spec = LoadtestSpec(requests=int(document["requests_per_probe"]),
                        length_scale=float(document["length_scale"]), sla_s=float(sla_s))
    world, classes = loadtest_world(
        _scenario(str(document["scenario"])), config=loaded.model.config.to_dict(),
        context_tokens=context_tokens(loaded.model.config),
        this_machine=device_preset(device_profile),
        step=StepModel.from_json(document["step_model"]), spec=spec,
        visit_s=float(document["visit_s"]))
    host = HostFit.from_json(document["client_host"]).host(classes)
    entry = document["policies"][policy]
    return as_probed(replace(world, client_host=host), float(entry["server_speed_factor"]),
                     float(entry["client_cpu_factor"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a load test's results.json")
    parser.add_argument("--device-profile", required=True, help="the run's device profile")
    parser.add_argument("--policy", default="server-only")
    parser.add_argument("--rates", default="14,16,18,20")
    parser.add_argument("--cvs", default="0,0.16,0.3")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--server-x", type=float, default=1.0,
                        help="the world's server a further this many times slower")
    args = parser.parse_args()
    document = json.loads(args.results.read_text())
    world = as_probed(run_world(document, args.device_profile, args.policy), args.server_x, 1.0)
    entry = document["policies"][args.policy]
    print(f"{args.policy}: measured capacity {entry['capacity_req_s']:.3g} req/s, simulated "
          f"{entry['simulated_capacity_req_s']:.3g} (server x{entry['server_speed_factor']:.3f}); "
          f"rebuilt here with the server x{args.server_x:g} more: "
          f"{find_capacity(world, args.policy).crossing_per_s:.3g} req/s")
    step_s = BatchCost.step_s
    rng = np.random.default_rng(0)
    cv = [0.0]

    def noisy_step_s(self: BatchCost, jobs: list[JobShape]) -> float:
        sigma2 = math.log(1 + cv[0] ** 2)  # lognormal of mean 1
        return step_s(self, jobs) * float(rng.lognormal(-sigma2 / 2, math.sqrt(sigma2)))

    BatchCost.step_s = noisy_step_s  # type: ignore[method-assign]
    rates = [float(r) for r in args.rates.split(",")]
    print("| step time CV | " + " | ".join(f"{r:g} req/s" for r in rates) + " |")
    print("|---|" + "---|" * len(rates))
    for cv[0] in (float(c) for c in args.cvs.split(",")):
        cells = []
        for rate in rates:
            seen = [run_point(world, args.policy, rate).sla_attainment
                    for _ in range(1 if cv[0] == 0 else args.seeds)]
            cells.append(f"{np.mean(seen):.0%} ({min(seen):.0%}-{max(seen):.0%})")
        print(f"| {cv[0]:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
