"""The load test's clients share this machine: what their real compute costs the clients'
cores and the server, calibrated on the idle server (`sim.client_host.ClientHost`).

The EMULATED clients compute their units for real, all in one process on this machine's
client core(s), and sleep up to their emulated device's time; a real fleet's clients are each
their own device. Measured at the splits' capacities before this model: the client process ran
0.80-0.88 of its one core (70-76 ms of CPU a request, 67-72 ms of it in the units), where the
simulator gave each client its own device. Calibrated here:
- the clients' CPU: the client process's CPU seconds for each of the idle check's requests
  run alone, and for batches of the probes' own requests (the world's first
  `TOGETHER_REQUESTS`, every size, as each policy plans them) started at once through the
  probes' worker threads, against this machine's own time for their client units (the
  planner's roofline on this machine's device profile: the class's emulated time over its
  slowdown) and their visits to the server (transport) (non-negative least squares: fitted
  on the largest requests alone, the probes' client process took 1.12-1.38x the CPU it said;
  terms per other request in flight and per request fitted 0 in four of five real runs, and
  0.024 CPU s per unit second per other request in the fifth: concurrency made a request's
  transport cheaper, not dearer);
- the clients' CPU of one read of the server's load (a /metrics page, what load-aware
  probes read every `POLL_S`): the process's CPU seconds over `POLLS` reads (before it was
  charged, exact-load-aware's probes took 1.18-1.26x the clients' CPU the model said where
  the other policies' took 0.95-1.09x);
- the server's slowdown while the clients' cores compute (their compute and the server share
  this machine's memory bandwidth): the server's seconds for one policy's idle-check requests
  with the clients' cores busy running the split plans' client units for real (the same
  weights the clients read, one position a pass), over the same requests' seconds with those
  cores idle, in pairs whose order alternates (measured: 1.52x with the whole model
  computing, 2 rounds; 1.13x with the plans' units, 4 rounds; 2.08x while other work loaded
  the machine): the median pair's ratio; in the busy rounds, the share of its cores the
  clients' process gets (CPU over wall seconds: other work on the machine takes the rest),
  the simulated clients' cores; and the calibration flagged `loaded` where the
  machine's load average beyond this load test's own two processes exceeds
  `LOADED_BEYOND` or the pairs' ratios spread wider than `LOADED_SPREAD`.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import nnls

from splitllm.placement import CLIENT, Placement
from splitllm.planner.instance import evaluate
from splitllm.runtime.loadtest import POLL_S
from splitllm.runtime.loadtest_idle import IdleRow, Runner, idle_check
from splitllm.runtime.loadtest_world import EmulatedClass
from splitllm.sim.client_host import ClientHost
from splitllm.sim.policies import PlanPolicy, request_instance
from splitllm.sim.world import World

BUSY_ROUNDS = 6  # pairs of one policy's idle-check rounds, the clients' cores idle and busy
# (two read 1.71 and 1.25 s against 0.87-0.99 s idle: one round's noise is large)
TOGETHER_REQUESTS = 18  # requests started at once in a calibration batch (the probes near the
# splits' capacities ran 20-30 at once)
TOGETHER_ROUNDS = 2  # batches per policy
BETWEEN_PAIRS = 2  # pairs timed again after the probes (before the predictions at their speeds)
LOADED_BEYOND = 1.0  # runnable processes beyond the load test's own two (its server, clients)
LOADED_SPREAD = 1.5  # the pairs' highest ratio over their lowest
POLLS = 40  # reads of the server's load timed for their CPU (10 s of a probe's reads)


@dataclass(frozen=True, kw_only=True)
class CpuSample:
    """Client work, and the clients' process's CPU seconds measured for it."""

    unit_s: float  # this machine's seconds of the client units computed
    visits: float
    cpu_s: float

    def regressors(self) -> tuple[float, float]:
        return (self.unit_s, self.visits)


@dataclass(frozen=True, kw_only=True)
class Together:
    """Requests started at once through the probes' worker threads."""

    round_trips: tuple[int, ...]  # each one's visits to the server
    cpu_s: float  # the clients' process's CPU seconds over them all
    server_busy_share: float  # the server's busy seconds over the batch's wall seconds


@dataclass(frozen=True, kw_only=True)
class HostFit:
    """What the calibration measured of the clients' machine."""

    cores: int  # the clients' cores (this process's CPU affinity)
    cpu_per_machine_s: float  # client CPU seconds per second of this machine's unit time
    cpu_per_visit_s: float  # client CPU seconds per visit to the server (transport)
    cpu_per_poll_s: float = 0.0  # client CPU seconds of one read of the server's load (older
    # runs: not measured)
    server_idle_s: tuple[float, ...]  # the server's seconds for the same requests, per round:
    server_busy_s: tuple[float, ...]  # ... the clients' cores idle, and busy computing
    load_average: float = math.nan  # the machine's during the calibration (1 minute)
    samples: tuple[CpuSample, ...] = ()  # what the CPU fit was fitted on
    segments: tuple[tuple[int, int], ...] = ()  # the client unit ranges the busy rounds ran
    core_shares: tuple[float, ...] = ()  # per busy round: the clients' process's CPU seconds
    # per wall second and core while its cores computed without pause

    @property
    def core_share(self) -> float:
        """The share of its cores the clients' process gets (other work on the machine takes
        the rest): the busy rounds' median, at most 1."""
        return min(statistics.median(self.core_shares), 1.0) if self.core_shares else 1.0

    @property
    def ratios(self) -> list[float]:
        """Each pair's busy over idle seconds."""
        return pair_ratios(self.server_idle_s, self.server_busy_s)

    @property
    def server_slowdown(self) -> float:
        """The server's time with the clients' cores busy over idle (`median_slowdown`)."""
        return median_slowdown(self.ratios)

    @property
    def loaded(self) -> bool:
        """Whether the calibration ran on a machine other work loaded (its slowdown suspect)."""
        ratios = self.ratios
        spread = max(ratios) / min(ratios) if ratios and min(ratios) > 0 else 1.0
        return self.load_average - 2 > LOADED_BEYOND or spread > LOADED_SPREAD

    def note(self) -> str:
        """The calibration in one paragraph, for the report's header."""
        flag = ("**LOADED: the calibration ran on a machine other work loaded** (load average "
                f"{self.load_average:.2f} beyond this load test's own two processes by more "
                f"than {LOADED_BEYOND:g}, or the pairs' ratios {LOADED_SPREAD:g}x apart or "
                "more): its slowdown is suspect" if self.loaded else "not loaded")
        return (f"Calibration of the clients' machine: {self.cpu_per_machine_s:.3g} CPU s per "
                f"second of this machine's unit time and {self.cpu_per_visit_s * 1e3:.3g} ms "
                f"per visit (fitted on {len(self.samples)} samples: the idle check's requests "
                "alone and batches of the probes' requests at once), "
                f"{self.cpu_per_poll_s * 1e3:.3g} ms per read of the server's load (the mean of "
                f"{POLLS}; load-aware policies read it every {POLL_S:g} s); the server "
                f"x{self.server_slowdown:.3g} while the clients compute "
                f"(the median of {len(self.ratios)} pairs: "
                f"{', '.join(f'{r:.2f}' for r in self.ratios)}); the clients' process got "
                f"{self.core_share:.2f} of its {self.cores} core(s) while they computed (the "
                "median of the busy rounds: the rest went to other work); load average "
                f"{self.load_average:.2f}: {flag}.")

    def host(self, classes: Sequence[EmulatedClass]) -> ClientHost:
        """The world's clients' machine: each class's CPU per second of its emulated time is
        this machine's CPU per unit second over the class's slowdown."""
        return ClientHost(cores=self.cores * self.core_share,
                          cpu_per_client_s=tuple(self.cpu_per_machine_s / e.slowdown
                                                 for e in classes),
                          cpu_per_visit_s=self.cpu_per_visit_s,
                          poll_s=POLL_S, cpu_per_poll_s=self.cpu_per_poll_s,
                          server_slowdown=self.server_slowdown)

    def to_json(self) -> dict[str, Any]:
        return {"cores": self.cores, "cpu_per_machine_s": self.cpu_per_machine_s,
                "cpu_per_visit_s": self.cpu_per_visit_s, "cpu_per_poll_s": self.cpu_per_poll_s,
                "server_idle_s": list(self.server_idle_s),
                "server_busy_s": list(self.server_busy_s),
                "server_slowdown": self.server_slowdown, "load_average": self.load_average,
                "loaded": self.loaded, "segments": [list(seg) for seg in self.segments],
                "core_shares": list(self.core_shares), "core_share": self.core_share,
                "samples": [{"unit_s": c.unit_s, "visits": c.visits, "cpu_s": c.cpu_s}
                            for c in self.samples]}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> HostFit:
        """A fit from its `to_json` (older runs': no load average; their terms per other
        request in flight and per request, all fitted 0, ignored)."""
        return cls(cores=int(document["cores"]),
                   cpu_per_machine_s=float(document["cpu_per_machine_s"]),
                   cpu_per_visit_s=float(document["cpu_per_visit_s"]),
                   cpu_per_poll_s=float(document.get("cpu_per_poll_s", 0.0)),
                   server_idle_s=tuple(document["server_idle_s"]),
                   server_busy_s=tuple(document["server_busy_s"]),
                   load_average=float(document.get("load_average", math.nan)),
                   segments=tuple((int(a), int(b)) for a, b in document.get("segments", ())),
                   core_shares=tuple(document.get("core_shares", ())))


def pair_ratios(idle_s: Sequence[float], busy_s: Sequence[float]) -> list[float]:
    """Each pair's busy over idle seconds."""
    return [busy / idle for idle, busy in zip(idle_s, busy_s, strict=False) if idle > 0]


def median_slowdown(ratios: Sequence[float]) -> float:
    """The median pair's ratio (>= 1: noise below it; none: 1)."""
    return max(statistics.median(ratios), 1.0) if ratios else 1.0


def machine_busy_s() -> float:
    """CPU seconds every process on this machine has run since boot, all cores (Linux's
    /proc/stat: user, nice, system, irq, softirq and steal time); nan where there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return math.nan
    if len(fields) < 9 or fields[0] != "cpu":
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def foreign_cores(machine_s: float, own_s: float, wall_s: float) -> float:
    """Cores other work took over `wall_s` seconds: the machine's CPU seconds less this load
    test's own processes' (`own_s`), per second (nan: the machine's not known)."""
    if math.isnan(machine_s) or wall_s <= 0:
        return math.nan
    return max(machine_s - own_s, 0.0) / wall_s


def client_cores() -> int:
    """The cores this process may run on (the clients' share of the machine)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def fit_client_cpu(samples: Sequence[CpuSample]) -> tuple[float, float]:
    """(CPU seconds per second of this machine's unit time, per visit): the non-negative
    least-squares fit of the samples' CPU."""
    kept = [c for c in samples if math.isfinite(c.cpu_s)]
    if not kept:
        return 0.0, 0.0
    x = np.array([c.regressors() for c in kept], dtype=float)
    y = np.array([c.cpu_s for c in kept], dtype=float)
    unit, visit = nnls(x, y)[0]
    return float(unit), float(visit)


def _machine_s(row: IdleRow, classes: Sequence[EmulatedClass]) -> float:
    """This machine's seconds of the row's client units (its class's time over its slowdown)."""
    return row.predicted.client_s / next(e.slowdown for e in classes
                                         if e.name == row.client_class)


def alone_samples(rows: Sequence[IdleRow], classes: Sequence[EmulatedClass]
                  ) -> list[CpuSample]:
    """The idle check's requests, each run alone."""
    return [CpuSample(unit_s=_machine_s(r, classes), visits=r.round_trips,
                      cpu_s=r.client_cpu_s) for r in rows]


def together_sample(unit_s: Sequence[float], together: Together, server_slowdown: float
                    ) -> CpuSample:
    """A batch of requests run at once, `unit_s` this machine's seconds of each one's client
    units, priced as the simulated clients pay them (x `server_slowdown` while the server
    computes: its busy share of the batch)."""
    slowed = 1.0 + (server_slowdown - 1.0) * min(together.server_busy_share, 1.0)
    return CpuSample(unit_s=slowed * sum(unit_s), visits=sum(together.round_trips),
                     cpu_s=together.cpu_s)


def _server_s(rows: Sequence[IdleRow], policy: str) -> float:
    return sum(r.measured.server_s for r in rows if r.policy == policy)


def client_segments(rows: Sequence[IdleRow]) -> list[tuple[int, int]]:
    """The unit ranges [a, b) the rows' plans run on their clients (each once)."""
    return sorted({(seg.start, seg.stop) for r in rows
                   for seg in Placement(r.placement).segments() if seg.side == CLIENT})


Computing = Callable[[int, Sequence[tuple[int, int]]], contextlib.AbstractContextManager[None]]
Request = tuple[int, int, int, str]  # (class, prompt tokens, output tokens, placement)
AllAtOnce = Callable[[Sequence[Request]], Together]


@dataclass(frozen=True)
class HostProbes:
    """How the calibration runs requests on the real runtime (`loadtest_run.RealRunner`)."""

    alone: Runner  # one request by itself
    computing: Computing  # within: the clients' cores busy with these client unit ranges
    together: AllAtOnce  # requests started at once through the probes' worker threads
    poll: Callable[[], object]  # one read of the server's load, as load-aware probes read it
    clock: Callable[[], tuple[float, float]] = lambda: (time.perf_counter(),
                                                        time.process_time())  # (wall, CPU)


@dataclass(frozen=True)
class Pairs:
    """Rounds of one policy's idle-check requests, the clients' cores idle and busy."""

    idle_s: tuple[float, ...]  # the server's seconds, per round
    busy_s: tuple[float, ...]
    core_shares: tuple[float, ...]  # per busy round: the clients' process's CPU seconds per
    # wall second and core (what other work on the machine leaves it)


def _slowdown_pairs(world: World, segments: Sequence[tuple[int, int]], probes: HostProbes,
                    *, cores: int, pairs: int) -> Pairs:
    """The server's seconds for one policy's idle-check requests, the clients' cores idle and
    busy with the client unit ranges `segments`, `pairs` pairs whose order alternates (a drift
    in the machine's other load moves both sides of the median pair alike)."""
    policy = "server-only" if "server-only" in world.policies else world.policies[0]
    one = replace(world, policies=(policy,))
    idle: list[float] = []
    busy: list[float] = []
    shares: list[float] = []
    for i in range(pairs if segments else 0):
        for computing in ((False, True) if i % 2 == 0 else (True, False)):
            if not computing:
                idle.append(_server_s(idle_check(one, probes.alone), policy))
                continue
            wall_s, cpu_s = probes.clock()
            with probes.computing(cores, segments):
                busy.append(_server_s(idle_check(one, probes.alone), policy))
            (wall_end_s, cpu_end_s) = probes.clock()
            shares.append((cpu_end_s - cpu_s) / max(wall_end_s - wall_s, 1e-9) / cores)
    return Pairs(tuple(idle), tuple(busy), tuple(shares))


def retimed(world: World, fit: HostFit, probes: HostProbes) -> HostFit:
    """`fit` with `BETWEEN_PAIRS` more pairs timed now (between policies: a transient under
    the first pairs is outvoted by the later ones in the median)."""
    more = _slowdown_pairs(world, fit.segments, probes, cores=fit.cores, pairs=BETWEEN_PAIRS)
    return replace(fit, server_idle_s=fit.server_idle_s + more.idle_s,
                   server_busy_s=fit.server_busy_s + more.busy_s,
                   core_shares=fit.core_shares + more.core_shares)


def _together_samples(world: World, classes: Sequence[EmulatedClass], probes: HostProbes,
                      server_slowdown: float) -> list[CpuSample]:
    """`TOGETHER_ROUNDS` batches per policy: the world's first `TOGETHER_REQUESTS` requests
    (the probes' own, of every size) as the policy plans them at no load, all at once."""
    trace = world.trace
    assert trace is not None  # the load test's world replays recorded requests
    n = min(TOGETHER_REQUESTS, len(trace.arrived_at_s))
    requests = [(trace.type_index[i], trace.class_index[i], trace.prompt_tokens[i],
                 trace.output_tokens[i]) for i in range(n)]
    batches = []
    for policy in world.policies:
        plans = PlanPolicy(world, policy)
        batch: list[Request] = []
        unit_s: list[float] = []
        for k, c, p, g in requests:
            placement = plans.decide(k, c, p, g).placement
            instance = request_instance(world.types[k], world.clients[c], world, p, g)
            unit_s.append(evaluate(instance, placement).client_compute_s / classes[c].slowdown)
            batch.append((c, p, g, placement.sides))
        batches.append((batch, unit_s))
    return [together_sample(unit_s, probes.together(batch), server_slowdown)
            for _ in range(TOGETHER_ROUNDS) for batch, unit_s in batches]


def cpu_per_poll_s(probes: HostProbes) -> float:
    """The clients' process's CPU seconds for one read of the server's load: the mean over
    `POLLS` reads (nothing else runs in it meanwhile)."""
    _, cpu_s = probes.clock()
    for _ in range(POLLS):
        probes.poll()
    _, cpu_end_s = probes.clock()
    return (cpu_end_s - cpu_s) / POLLS


def calibrate_host(world: World, classes: Sequence[EmulatedClass],
                   rounds: Sequence[Sequence[IdleRow]], probes: HostProbes, *,
                   cores: int) -> HostFit:
    """Time the server's slowdown while the clients' cores compute (`_slowdown_pairs`), run
    batches of the idle check's requests at once (`_together_samples`), and fit the clients'
    CPU on those and on the calibration `rounds` (the idle check's rows, each alone), and time
    the CPU of a read of the server's load (`cpu_per_poll_s`)."""
    load_average = os.getloadavg()[0]  # before the batches' threads count in it
    rows = [r for found in rounds for r in found]
    segments = tuple(client_segments(rows))
    pairs = _slowdown_pairs(world, segments, probes, cores=cores, pairs=BUSY_ROUNDS)
    slowdown = median_slowdown(pair_ratios(pairs.idle_s, pairs.busy_s))
    samples = [*alone_samples(rows, classes),
               *_together_samples(world, classes, probes, slowdown)]
    unit, visit = fit_client_cpu(samples)
    return HostFit(cores=cores, cpu_per_machine_s=unit, cpu_per_visit_s=visit,
                   cpu_per_poll_s=cpu_per_poll_s(probes),
                   server_idle_s=pairs.idle_s, server_busy_s=pairs.busy_s,
                   core_shares=pairs.core_shares, load_average=load_average,
                   samples=tuple(samples), segments=segments)
