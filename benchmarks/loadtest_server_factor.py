"""Does the server's speed, taken like for like, explain a probe's misses?

`loadtest_tails.py --trace-out` (same arguments), and after each probe one more line: the
server's speed factor like for like, beside the per-request one the load test uses
(`loadtest_world.speed_factors`: the server's steps' wall seconds a request over the
simulated, which moves with how full the steps are), and the simulated attainment in the
probe's world with that factor instead:

- real: the real steps' seconds (`forward_trace`) over the start-of-run step model's seconds
  for each step's own rows;
- simulated: the same world's steps at the probe's rate, their seconds over their base seconds
  (what the co-located clients' compute added: `sim.client_host`);
- like for like: real over simulated.

    flock /work/measure.lock env PYTHONPATH=src python benchmarks/loadtest_server_factor.py \\
        --device-profile device.json --policies greedy,exact --rates 9.3,10.4 \\
        --trace-out trace.jsonl
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import loadtest_tails
import splitllm.sim.server as sim_server
from forward_trace import real_steps, steps_table
from splitllm.runtime.loadtest import Probe, probed
from splitllm.runtime.loadtest_world import as_probed, speed_factors
from splitllm.sim.engine import NewEvent
from splitllm.sim.metrics import sla_met
from splitllm.sim.run import run_policy
from splitllm.sim.world import World
from splitllm.stepmodel import StepModel, jobs_step_s

seconds = {"base": 0.0, "slowed": 0.0}  # the simulated steps', summed as they start
start_step = sim_server.BatchedServer._start


def counted_start(self: sim_server.BatchedServer, now_s: float) -> list[NewEvent]:
    waiting = list(self.queue)[:self.max_batch]  # the jobs this step takes
    seconds["base"] += self.cost.step_s([self.shape(r, j) for r, j, _ in waiting])
    events = start_step(self, now_s)
    seconds["slowed"] += self.step_s
    return events


probe_seen: dict[str, Any] = {}
tails_report = loadtest_tails.report


def report(world: World, policy: str, probe: Probe, timings: loadtest_tails.Timings,
           pages: tuple[dict[str, float], dict[str, float]],
           entries: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    probe_seen.update(world=world, policy=policy, probe=probe)
    return tails_report(world, policy, probe, timings, pages, entries)


def real_over_model_s(entries: Sequence[dict[str, Any]], model: StepModel) -> tuple[float, float]:
    """The real steps' seconds (`forward_trace.real_steps`) and `model`'s for their own rows."""
    steps = real_steps(entries)
    return (sum(end - start for start, end, _ in steps),
            sum(jobs_step_s(model, jobs) for _, _, jobs in steps))


def with_like_for_like(entries: Sequence[dict[str, Any]], model: StepModel) -> str:
    """`steps_table`, then the like-for-like factor's line (`model`: the probe's world's, the
    start-of-run model times the per-request factor)."""
    world, policy, probe = probe_seen["world"], probe_seen["policy"], probe_seen["probe"]
    server_factor, client_factor = speed_factors(world, policy, probed([probe]))
    real_s, priced_s = real_over_model_s(entries, model)
    real = real_s / priced_s * server_factor  # over the start-of-run model
    seconds["base"] = seconds["slowed"] = 0.0
    run_policy(as_probed(world, 1.0, client_factor).with_rate(probe.rate_per_s), policy)
    simulated = seconds["slowed"] / seconds["base"]
    factor = real / simulated
    seen = as_probed(world, factor, client_factor).with_rate(probe.rate_per_s)
    attainment = sla_met(seen, run_policy(seen, policy)).mean()
    return (steps_table(entries, model) + f"\nlike for like: the real steps {real_s:.2f} s, "
            f"x{real:.3f} the start-of-run model's for their rows; the simulated x{simulated:.3f} "
            f"their base; the server x{factor:.3f} (per request x{server_factor:.3f}): "
            f"{probe.metrics.sla_attainment:.0%} within SLA measured, {attainment:.0%} "
            f"simulated at x{factor:.2f}")


if __name__ == "__main__":
    sim_server.BatchedServer._start = counted_start  # type: ignore[method-assign]
    loadtest_tails.report = report
    loadtest_tails.steps_table = with_like_for_like
    loadtest_tails.main()
