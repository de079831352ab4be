"""Policies side by side at the same rates, probe by probe: paired, so that the machine's drift
hits every policy alike.

A `splitllm loadtest` search measures one policy after the other; on a shared machine whose
speed drifts over minutes, two searches 5 minutes apart can disagree by 2x on a split policy's
capacity (2026-12-01: `frontier-priced` 8.4 and 16.3 req/s in two runs 20 minutes apart).
This starts a local SmolLM2 server as `splitllm loadtest` does (`loadtest_tails.local_runner`:
azure-conv x 1/64 tokens, 96 requests a probe, the same calibration), then, for `--rounds`
rounds, runs every policy's probe at every rate, the policies' order turned by one each
round. Each probe is the load test's own (`RealRunner.probe`: it stops early once its
attainment is certainly below the target). It prints, per rate and policy, every round's
attainment, how many rounds met the target, the server's busy share and wall seconds a
request (medians over the rounds), the server's speed factor (its wall seconds a request over
the start-of-run model's, the median over the policy's probes, `loadtest_world.speed_factors`)
and the simulator's attainment at that rate in the world as the probes ran it. Run it under
the measurement lock:

    flock /tmp/measure.lock env PYTHONPATH=src python benchmarks/loadtest_paired.py \\
        --device-profile device.json --clients fleet --policies server-only,frontier-priced \\
        --rates 10,12,14 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict

import torch

from loadtest_tails import local_runner
from splitllm.runtime.loadtest import Probe, probe_line, probed
from splitllm.runtime.loadtest_world import as_probed, speed_factors
from splitllm.runtime.models import load_model
from splitllm.sim.capacity import run_point
from splitllm.sim.world import World


def turned(policies: list[str], round_index: int) -> list[str]:
    """The policies' order in round `round_index`: turned left by one a round."""
    k = round_index % len(policies)
    return policies[k:] + policies[:k]


def table(world: World, probes: dict[tuple[str, float], list[Probe]], policies: list[str],
          rates: list[float]) -> str:
    """Per rate and policy: the rounds' attainments, the rounds that met the target, the busy
    share and server wall seconds a request (medians), the server's speed factor, the
    simulated attainment."""
    target = world.sweep.target_attainment
    lines = [f"| rate (req/s) | policy | attainment each round | rounds >= {target:.0%} | "
             "server busy | server wall ms / request | server x | simulated attainment |",
             "|---|---|---|---|---|---|---|---|"]
    for policy in policies:
        runs = [p for rate in rates for p in probes[(policy, rate)]]
        factors = speed_factors(world, policy, probed(runs))
        seen = as_probed(world, *factors)
        for rate in rates:
            at_rate = probes[(policy, rate)]
            attained = [p.metrics.sla_attainment for p in at_rate]
            met = sum(a >= target for a in attained)
            busy = statistics.median(p.metrics.utilization for p in at_rate)
            wall_ms = 1e3 * statistics.median(p.server_wall_s_per_request for p in at_rate)
            simulated = run_point(seen, policy, rate).sla_attainment
            early = ["*" if p.stopped_early else "" for p in at_rate]
            lines.append(f"| {rate:g} | {policy} | "
                         + " ".join(f"{a:.1%}{e}" for a, e in zip(attained, early, strict=True))
                         + f" | {met}/{len(at_rate)} | {busy:.0%} | {wall_ms:.0f} | "
                         f"{factors[0]:.2f} | {simulated:.0%} |")
    return "\n".join(lines) + "\n(*: stopped early, certainly below the target)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device-profile", required=True)
    parser.add_argument("--policies", default="server-only,frontier-priced")
    parser.add_argument("--rates", default="10,12,14")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", choices=("here", "fleet"), default="fleet",
                        help="as `splitllm loadtest --clients`")
    args = parser.parse_args()
    policies = args.policies.split(",")
    rates = [float(r) for r in args.rates.split(",")]
    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        world, runner = local_runner(stack, load_model("smollm2"), args.device_profile,
                                     fleet=args.clients == "fleet")
        probes: dict[tuple[str, float], list[Probe]] = defaultdict(list)
        began_s = time.perf_counter()
        for k in range(args.rounds):
            for rate in rates:
                for policy in turned(policies, k):
                    probe = runner.probe(policy, rate)
                    probes[(policy, rate)].append(probe)
                    print(f"round {k + 1} ({time.perf_counter() - began_s:.0f} s in): "
                          + probe_line(policy, probe), flush=True)
        print(table(world, probes, policies, rates))


if __name__ == "__main__":
    main()
