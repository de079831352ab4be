"""The load test's clients share this machine: what their real compute costs the clients'
cores and the server, calibrated on the idle server (`sim.client_host.ClientHost`).

The EMULATED clients compute their units for real, all in one process on this machine's
client core(s), and sleep up to their emulated device's time; a real fleet's clients are each
their own device. Measured at the splits' capacities before this model: the client process ran
0.80-0.88 of its one core (70-76 ms of CPU a request, 67-72 ms of it in the units), where the
simulator gave each client its own device. Calibrated here:
- the clients' CPU: the client process's CPU seconds for each of the idle check's requests
  (run alone), against this machine's own time for its client units (the planner's roofline
  on this machine's device profile: the class's emulated time over its slowdown) and its
  visits to the server (transport): non-negative least squares over the calibration rounds;
- the server's slowdown while the clients' cores compute (their compute and the server share
  this machine's memory bandwidth): the server's seconds for one policy's idle-check requests
  with the clients' cores busy running the split plans' client units for real (the same
  weights the clients read, one position a pass), over the same requests' seconds with those
  cores idle, rounds alternating (measured: 1.52x with the whole model computing, 2 rounds;
  1.13x with the plans' units, 4 rounds; 2.08x while other work loaded the machine).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import nnls

from splitllm.placement import CLIENT, Placement
from splitllm.runtime.loadtest_idle import IdleRow, Runner, idle_check
from splitllm.runtime.loadtest_world import EmulatedClass
from splitllm.sim.client_host import ClientHost
from splitllm.sim.world import World

BUSY_ROUNDS = 6  # rounds of one policy's idle-check requests with the clients' cores busy
# (two read 1.71 and 1.25 s against 0.87-0.99 s idle: one round's noise is large)


@dataclass(frozen=True, kw_only=True)
class HostFit:
    """What the calibration measured of the clients' machine."""

    cores: int  # the clients' cores (this process's CPU affinity)
    cpu_per_machine_s: float  # client CPU seconds per second of this machine's unit time
    cpu_per_visit_s: float  # client CPU seconds per visit to the server (transport)
    server_idle_s: tuple[float, ...]  # the server's seconds for the same requests, per round:
    server_busy_s: tuple[float, ...]  # ... the clients' cores idle, and busy computing

    @property
    def server_slowdown(self) -> float:
        """The server's time with the clients' cores busy over idle, the median of the rounds'
        ratios (each busy round beside its idle one; >= 1: noise below it)."""
        ratios = [busy / idle for idle, busy in zip(self.server_idle_s, self.server_busy_s,
                                                      strict=False) if idle > 0]
        return max(statistics.median(ratios), 1.0) if ratios else 1.0

    def host(self, classes: Sequence[EmulatedClass]) -> ClientHost:
        """The world's clients' machine: each class's CPU per second of its emulated time is
        this machine's CPU per unit second over the class's slowdown."""
        return ClientHost(cores=float(self.cores),
                          cpu_per_client_s=tuple(self.cpu_per_machine_s / e.slowdown
                                                 for e in classes),
                          cpu_per_visit_s=self.cpu_per_visit_s,
                          server_slowdown=self.server_slowdown)

    def to_json(self) -> dict[str, Any]:
        return {"cores": self.cores, "cpu_per_machine_s": self.cpu_per_machine_s,
                "cpu_per_visit_s": self.cpu_per_visit_s,
                "server_idle_s": list(self.server_idle_s),
                "server_busy_s": list(self.server_busy_s),
                "server_slowdown": self.server_slowdown}


def client_cores() -> int:
    """The cores this process may run on (the clients' share of the machine)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def fit_client_cpu(rows: Sequence[IdleRow], classes: Sequence[EmulatedClass]
                   ) -> tuple[float, float]:
    """(CPU seconds per second of this machine's unit time, CPU seconds per visit): the
    non-negative least-squares fit of the rows' measured client CPU."""
    slowdown = {e.name: e.slowdown for e in classes}
    kept = [r for r in rows if math.isfinite(r.client_cpu_s)]
    if not kept:
        return 0.0, 0.0
    x = np.array([[r.predicted.client_s / slowdown[r.client_class], r.round_trips]
                  for r in kept], dtype=float)
    y = np.array([r.client_cpu_s for r in kept], dtype=float)
    (per_unit_s, per_visit_s), _ = nnls(x, y)
    return float(per_unit_s), float(per_visit_s)


def _server_s(rows: Sequence[IdleRow], policy: str) -> float:
    return sum(r.measured.server_s for r in rows if r.policy == policy)


def client_segments(rows: Sequence[IdleRow]) -> list[tuple[int, int]]:
    """The unit ranges [a, b) the rows' plans run on their clients (each once)."""
    return sorted({(seg.start, seg.stop) for r in rows
                   for seg in Placement(r.placement).segments() if seg.side == CLIENT})


Computing = Callable[[int, Sequence[tuple[int, int]]], contextlib.AbstractContextManager[None]]


@dataclass(frozen=True)
class HostProbes:
    """How the calibration runs requests on the real runtime (`loadtest_run.RealRunner`)."""

    alone: Runner  # one request by itself
    computing: Computing  # within: the clients' cores busy with these client unit ranges


def calibrate_host(world: World, classes: Sequence[EmulatedClass],
                   rounds: Sequence[Sequence[IdleRow]], probes: HostProbes, *,
                   cores: int) -> HostFit:
    """Fit the clients' CPU on the calibration `rounds` (the idle check's rows), and time one
    policy's idle-check requests again
    (`BUSY_ROUNDS`), each round once idle and once while `probes.computing(cores, segments)`
    keeps the clients' cores busy with the plans' client units (none: no slowdown timed)."""
    rows = [r for found in rounds for r in found]
    per_unit_s, per_visit_s = fit_client_cpu(rows, classes)
    policy = "server-only" if "server-only" in world.policies else world.policies[0]
    one = replace(world, policies=(policy,))
    idle, busy = [], []
    segments = client_segments(rows)
    for _ in range(BUSY_ROUNDS if segments else 0):  # alternately: the machine's other load
        # moves between minutes, not between seconds
        idle.append(_server_s(idle_check(one, probes.alone), policy))
        with probes.computing(cores, segments):
            busy.append(_server_s(idle_check(one, probes.alone), policy))
    return HostFit(cores=cores, cpu_per_machine_s=per_unit_s, cpu_per_visit_s=per_visit_s,
                   server_idle_s=tuple(idle), server_busy_s=tuple(busy))
