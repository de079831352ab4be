"""Where a load-test probe's requests lose their time: per request, from the client's side.

Starts a local SmolLM2 server as `splitllm loadtest` does (azure-conv x 1/64 tokens, 96
requests a probe, calibrated the same way), runs one policy's probes at the given rates, and
times every request's parts from inside the client process: how late its worker thread took
it (after its scheduled arrival), its client units (emulation included), its session's
opening beyond the emulated link, and its forwards beyond the emulated link and the server's
compute for them (the server's queue, and the client process's own delays); beside them the
server's mean queue wait per forward (/metrics). Run it under the measurement lock:

    flock /work/measure.lock env PYTHONPATH=src python benchmarks/loadtest_tails.py \
        --device-profile device.json --policy greedy --rates 11.3,12.3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from splitllm.planner.hardware import device_preset
from splitllm.runtime import remote
from splitllm.runtime.client import Session
from splitllm.runtime.dialer import fetch_info
from splitllm.runtime.fidelity_run import local_server
from splitllm.runtime.loadtest_command import _scenario, _visit_s, calibrated
from splitllm.runtime.loadtest_run import RealRunner, RunnerOptions
from splitllm.runtime.loadtest_world import LoadtestSpec, loadtest_world
from splitllm.runtime.models import context_tokens, load_model
from splitllm.stepmodel import StepModel

CURRENT = threading.local()  # the request a worker thread runs now


class Timings:
    """Per request: (wall s, emulated link s) of each message exchange, and its generation."""

    def __init__(self) -> None:
        self.exchanges: dict[int, list[tuple[str, float, float]]] = {}
        self.generations: dict[int, Any] = {}
        self.picked_late_s: dict[int, float] = {}

    def exchange(self, kind: str, call: Callable[[], Any], transport: Any) -> Any:
        link_before_s = getattr(transport, "delay_s", 0.0)
        start_s = time.perf_counter()
        result = call()
        self.exchanges.setdefault(getattr(CURRENT, "r", -1), []).append(
            (kind, time.perf_counter() - start_s, getattr(transport, "delay_s", 0.0)
             - link_before_s))
        return result


@contextlib.contextmanager
def instrumented(runner: RealRunner, timings: Timings) -> Iterator[None]:
    """Within: the runner's requests, sessions and server exchanges are timed."""
    forward, opened, generate = (remote.RemoteSession.forward, remote.RemoteSession.__init__,
                                 Session.generate)
    one = runner._one

    def timed_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return timings.exchange("forward", lambda: forward(self, *args, **kwargs),
                                self.transport)

    def timed_open(self: Any, transport: Any, *args: Any, **kwargs: Any) -> None:
        timings.exchange("open", lambda: opened(self, transport, *args, **kwargs), transport)

    def timed_generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = generate(self, *args, **kwargs)
        timings.generations[getattr(CURRENT, "r", -1)] = result
        return result

    def timed_one(load: Any, r: int, *args: Any) -> Any:
        start_s = args[2]
        timings.picked_late_s[r] = time.perf_counter() - start_s - float(load.arrived_at_s[r])
        CURRENT.r = r
        return one(load, r, *args)

    remote.RemoteSession.forward = timed_forward  # type: ignore[method-assign]
    remote.RemoteSession.__init__ = timed_open  # type: ignore[method-assign]
    Session.generate = timed_generate  # type: ignore[method-assign]
    runner._one = timed_one  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        remote.RemoteSession.forward = forward  # type: ignore[method-assign]
        remote.RemoteSession.__init__ = opened  # type: ignore[method-assign]
        Session.generate = generate  # type: ignore[method-assign]
        runner._one = one  # type: ignore[method-assign]


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    return f"{statistics.quantiles(values, n=10)[int(q * 10) - 1] * 1e3:.0f}" if len(
        values) > 1 else f"{values[0] * 1e3:.0f}"


def summary(timings: Timings) -> str:
    """Median / p90 (ms) of each part over the probe's requests."""
    beyond: list[float] = []
    opening: list[float] = []
    units: list[float] = []
    for r, generation in timings.generations.items():
        forwards = [(wall, link) for kind, wall, link in timings.exchanges.get(r, ())
                    if kind == "forward"]
        if forwards:
            beyond.append((sum(w - link for w, link in forwards) - generation.server_busy_s)
                          / len(forwards))
        opening += [w - link for kind, w, link in timings.exchanges.get(r, ()) if kind == "open"]
        units.append(generation.client_busy_s)
    late = list(timings.picked_late_s.values())
    return (f"picked up late {_ms(late, 0.5)} / {_ms(late, 0.9)} ms; session opening beyond "
            f"the link {_ms(opening, 0.5)} / {_ms(opening, 0.9)} ms; a forward beyond the link "
            f"and the server's compute {_ms(beyond, 0.5)} / {_ms(beyond, 0.9)} ms; client units "
            f"{_ms(units, 0.5)} / {_ms(units, 0.9)} ms (median / p90)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device-profile", required=True)
    parser.add_argument("--policy", default="greedy")
    parser.add_argument("--rates", default="11.3,12.3")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    loaded = load_model("smollm2")
    spec = LoadtestSpec(requests=96, length_scale=1 / 64, sla_factor=3.0)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(local_server("smollm2", 1))
        info = fetch_info(url, None)
        world, classes = loadtest_world(
            _scenario("azure-conv"), config=loaded.model.config.to_dict(),
            context_tokens=context_tokens(loaded.model.config),
            this_machine=device_preset(args.device_profile),
            step=StepModel.from_json(info["step_model"]), spec=spec,
            visit_s=_visit_s(url, None, int(info["n_units"])))
        runner = RealRunner(loaded, world, classes, RunnerOptions(server=url))
        stack.callback(runner.close)
        calibrated(world, runner, url, None, classes)
        for rate in (float(r) for r in args.rates.split(",")):
            timings = Timings()
            with instrumented(runner, timings):
                probe = runner.probe(args.policy, rate)
            m = probe.metrics
            print(f"{args.policy} at {rate:g} req/s: {m.sla_attainment:.0%} within SLA, server "
                  f"busy {m.utilization:.0%}, its queue wait {m.job_delay_mean_s * 1e3:.0f} ms "
                  f"a forward, clients {probe.client_cores_busy:.2f} cores; "
                  + summary(timings), flush=True)


if __name__ == "__main__":
    main()
