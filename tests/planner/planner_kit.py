"""Helpers of the planner tests: a random-instance generator and a brute-force oracle.

The oracle enumerates all 2^n placements at once with numpy and scores them from the spec
(the cost model of the team's design notes, ../shared/DESIGN.md beside the repository; the
docstrings of planner/network.py and planner/instance.py state it too), never through planner
internals:

- latency = client_s of C units + server_s of S units + every crossing;
- the input (input_bytes) starts on the client, the result (output_bytes) ends on the client;
  the edge into unit l carries unit l-1's out_bytes (edge 0: input_bytes, edge n: output_bytes);
- an up crossing costs passes * (rtt/2 + visit_s + server_wait_s + job_s) + bytes / uplink,
  a down crossing passes * rtt/2 + bytes / downlink;
- a placement with any S unit also pays session_open_s once (opening its server session);
- a phase limit is the same sum over its own per-unit times and bytes, with its own passes;
  a phase that holds the first token (pays_session_open) pays session_open_s too;
- server work = sum of server_work of S units + passes * job_work_s per visit (up crossing),
  client memory = sum of client_mem_bytes of C units;
- feasible: pins hold, memory <= limit (1 + 1e-12), latency <= SLA (1 + 1e-9), phases likewise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitllm.planner.instance import Instance, PhaseLimit, Unit
from splitllm.planner.network import Link

LAT_TOL = 1e-9  # relative tolerance of latency limits (the spec's)
MEM_TOL = 1e-12  # relative tolerance of the memory limit (the spec's)


def all_placements(n: int) -> np.ndarray:
    """[2^n, n] bool, True = server; row i is the binary expansion of i (unit 0 = high bit)."""
    codes = np.arange(2**n, dtype=np.int64)[:, None]  # [N, 1]
    return ((codes >> np.arange(n - 1, -1, -1)) & 1).astype(bool)  # [N, n]


def path_latency(
    on_server: np.ndarray,
    client_s: Sequence[float],
    server_s: Sequence[float],
    out_bytes: Sequence[float],
    input_bytes: float,
    output_bytes: float,
    link: Link,
    passes: int,
    server_wait_s: float,
) -> np.ndarray:
    """[N] latency of each placement row of `on_server` ([N, n] bool)."""
    rows, n = on_server.shape
    compute = np.where(on_server, np.asarray(server_s), np.asarray(client_s)).sum(axis=1)
    padded = np.zeros((rows, n + 2), dtype=bool)  # the client before unit 0 and after unit n-1
    padded[:, 1:-1] = on_server
    before, after = padded[:, :-1], padded[:, 1:]  # [N, n + 1]: sides around edge l
    carried = np.array([input_bytes, *list(out_bytes)[:-1], output_bytes])  # [n + 1]
    up_s = (passes * (link.rtt_s / 2 + link.visit_s + server_wait_s)
            + carried / link.uplink_bytes_per_s)
    down_s = passes * link.rtt_s / 2 + carried / link.downlink_bytes_per_s
    network = ((~before & after) * up_s + (before & ~after) * down_s).sum(axis=1)
    return compute + network


def _ordered_sum(on: np.ndarray, values: Sequence[float]) -> np.ndarray:
    """Sum of values[l] over the True columns, added in unit order (ties stay bit-exact)."""
    total = np.zeros(on.shape[0])
    for l, value in enumerate(values):
        total = np.where(on[:, l], total + value, total)
    return total


@dataclass(frozen=True)
class BruteForce:
    """Every placement of an instance, scored from the spec."""

    instance: Instance
    on_server: np.ndarray  # [N, n] bool
    latency_s: np.ndarray  # [N]
    server_work: np.ndarray  # [N]
    client_mem_bytes: np.ndarray  # [N]
    phase_latency_s: np.ndarray  # [phases, N]
    pins_ok: np.ndarray  # [N] bool

    def placement(self, row: int) -> str:
        return "".join("S" if s else "C" for s in self.on_server[row])

    def row_of(self, sides: str) -> int:
        return int("".join("1" if c == "S" else "0" for c in sides), 2)

    def limits_ok(self) -> np.ndarray:
        """[N] bool: pins, memory and phase limits hold (the SLA is not checked)."""
        inst = self.instance
        ok = self.pins_ok & (self.client_mem_bytes <= inst.client_mem_limit_bytes * (1 + MEM_TOL))
        for phase, lat in zip(inst.phase_limits, self.phase_latency_s, strict=True):
            ok &= lat <= phase.limit_s * (1 + LAT_TOL)
        return ok

    def feasible(self, sla_s: float | None = None) -> np.ndarray:
        """[N] bool: every limit holds at `sla_s` (default: the instance's SLA)."""
        sla = self.instance.sla_s if sla_s is None else sla_s
        return self.limits_ok() & (self.latency_s <= sla * (1 + LAT_TOL))

    def optimum(self, sla_s: float | None = None) -> tuple[float, float] | None:
        """(least server work, least latency among the plans with that work), or None."""
        ok = self.feasible(sla_s)
        if not ok.any():
            return None
        work = self.server_work[ok].min()
        ties = ok & (self.server_work <= work * (1 + 1e-9))
        return float(work), float(self.latency_s[ties].min())


def brute_force(instance: Instance) -> BruteForce:
    """Score all 2^n placements of `instance` (n <= ~16)."""
    units = instance.units
    on = all_placements(len(units))
    latency = path_latency(
        on, [u.client_s for u in units], [u.server_s for u in units],
        [u.out_bytes for u in units], instance.input_bytes, instance.output_bytes,
        instance.link, instance.passes, instance.server_wait_s + instance.job_s,
    ) + on.any(axis=1) * instance.session_open_s
    phases = np.array([
        path_latency(on, p.client_s, p.server_s, p.out_bytes, p.input_bytes, p.output_bytes,
                     instance.link, p.passes, instance.server_wait_s + instance.job_s)
        + on.any(axis=1) * (instance.session_open_s if p.pays_session_open else 0.0)
        for p in instance.phase_limits
    ]).reshape(len(instance.phase_limits), len(on))
    client_ok = np.array([u.client_ok for u in units])
    server_ok = np.array([u.server_ok for u in units])
    pins_ok = np.all(np.where(on, server_ok, client_ok), axis=1)
    visits = np.count_nonzero(on & ~np.pad(on, ((0, 0), (1, 0)))[:, :-1], axis=1)  # [N] ups
    return BruteForce(
        instance, on, latency,
        _ordered_sum(on, [u.server_work for u in units])
        + visits * instance.passes * instance.job_work_s,
        _ordered_sum(~on, [u.client_mem_bytes for u in units]),
        phases, pins_ok,
    )


def random_instance(
    rng: np.random.Generator,
    n: int,
    *,
    mem: bool = False,
    pins: bool = False,
    phases: int = 0,
    passes: int = 1,
    server_wait: bool = False,
    integer_work: bool = False,
    sla_s: float = math.inf,
) -> Instance:
    """A random instance: the server is 3-30x faster, hidden states 10 kB - 10 MB, 1-100 MB/s.

    integer_work draws server work from {0, 1, 2, 3} so that many plans tie on work
    (the tie-break, least latency, then matters); otherwise ~10% of units have zero work.
    The SLA defaults to infinity; pick one with `with_sla` once the latencies are known.
    """
    client_s = rng.uniform(0.05, 1.0, n) * rng.choice([0.1, 1.0, 10.0])
    server_s = client_s / rng.uniform(3.0, 30.0, n)
    if integer_work:
        work = rng.integers(0, 4, n).astype(float)
    else:
        work = server_s * rng.uniform(0.5, 2.0, n) * (rng.random(n) > 0.1)
    out_bytes = 10.0 ** rng.uniform(4, 7, n)
    mem_bytes = rng.uniform(1e8, 1e9, n)
    pin = rng.choice(3, n, p=[0.76, 0.12, 0.12]) if pins else np.zeros(n, dtype=int)
    client_ok, server_ok = pin != 2, pin != 1  # 1: kept on the client, 2: kept on the server
    units = tuple(
        Unit(name=f"u{i}", client_s=float(client_s[i]), server_s=float(server_s[i]),
             server_work=float(work[i]), out_bytes=float(out_bytes[i]),
             client_mem_bytes=float(mem_bytes[i]), client_ok=bool(client_ok[i]),
             server_ok=bool(server_ok[i]))
        for i in range(n)
    )
    up = 10.0 ** rng.uniform(6, 8)
    link = Link(uplink_bytes_per_s=up, downlink_bytes_per_s=up * rng.uniform(1.0, 8.0),
                rtt_s=float(rng.uniform(0.0, 0.1)))
    phase_limits = tuple(
        PhaseLimit(
            name=f"phase{k}", limit_s=math.inf,
            client_s=tuple(float(v) for v in client_s * rng.uniform(0.05, 0.5, n)),
            server_s=tuple(float(v) for v in server_s * rng.uniform(0.05, 0.5, n)),
            out_bytes=tuple(float(v) for v in out_bytes * rng.uniform(0.01, 0.5, n)),
            input_bytes=float(10.0 ** rng.uniform(2, 5)),
            output_bytes=float(10.0 ** rng.uniform(1, 4)), passes=int(rng.integers(1, 4)),
        )
        for k in range(phases)
    )
    return Instance(
        units=units,
        link=link,
        sla_s=sla_s,
        input_bytes=float(10.0 ** rng.uniform(3, 6)),
        output_bytes=float(10.0 ** rng.uniform(1, 4)),
        passes=passes,
        client_mem_limit_bytes=float(mem_bytes.sum() * rng.uniform(0.2, 0.9)) if mem else math.inf,
        phase_limits=phase_limits,
        server_wait_s=float(rng.uniform(0.001, 0.05)) if server_wait else 0.0,
    )


def with_sla(instance: Instance, sla_s: float) -> Instance:
    return dataclasses.replace(instance, sla_s=float(sla_s))


def with_phase_limits(instance: Instance, limits_s: Sequence[float]) -> Instance:
    phases = tuple(dataclasses.replace(p, limit_s=float(v))
                   for p, v in zip(instance.phase_limits, limits_s, strict=True))
    return dataclasses.replace(instance, phase_limits=phases)


def pick_limits(rng: np.random.Generator, instance: Instance, kind: str) -> Instance:
    """Set the SLA and phase limits from the instance's own latencies.

    kind: 'loose' (SLA above every latency), 'quantile' (a random quantile), 'tight' (exactly
    the latency of one random placement: a limit that binds with equality), 'infeasible'
    (just below the least latency). Phase limits are random quantiles of their latencies.
    """
    bf = brute_force(instance)
    lat = bf.latency_s
    if instance.phase_limits:
        limits = [float(np.quantile(p, rng.uniform(0.2, 1.0))) for p in bf.phase_latency_s]
        instance = with_phase_limits(instance, limits)
    if kind == "loose":
        return with_sla(instance, lat.max() * 1.01)
    if kind == "quantile":
        return with_sla(instance, np.quantile(lat, rng.uniform(0.0, 0.6)))
    if kind == "tight":
        allowed = np.flatnonzero(bf.pins_ok)
        row = int(rng.choice(allowed)) if len(allowed) else int(rng.integers(len(lat)))
        return with_sla(instance, lat[row])
    if kind == "infeasible":
        return with_sla(instance, lat.min() * (1 - 1e-6))
    raise ValueError(kind)


def hand_instance(
    units: Sequence[tuple[float, float, float, float]],
    sla_s: float,
    *,
    input_bytes: float = 0.0,
    output_bytes: float = 0.0,
    up_bytes_per_s: float = 1.0,
    down_bytes_per_s: float = 1.0,
    rtt_s: float = 0.0,
    mem: Sequence[float] | None = None,
    mem_limit: float = math.inf,
) -> Instance:
    """A small instance from (client_s, server_s, server_work, out_bytes) per unit."""
    return Instance(
        units=tuple(
            Unit(name=f"u{i}", client_s=c, server_s=s, server_work=w, out_bytes=b,
                 client_mem_bytes=0.0 if mem is None else mem[i])
            for i, (c, s, w, b) in enumerate(units)
        ),
        link=Link(uplink_bytes_per_s=up_bytes_per_s, downlink_bytes_per_s=down_bytes_per_s,
                  rtt_s=rtt_s),
        sla_s=sla_s,
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        client_mem_limit_bytes=mem_limit,
    )


KINDS = ("loose", "quantile", "tight", "infeasible")


def brute_force_case(seed: int, max_units: int = 14) -> Instance:
    """Random instance number `seed`: 1..max_units units, every kind of constraint mixed in."""
    rng = np.random.default_rng(seed)
    instance = random_instance(
        rng,
        1 + seed % max_units,
        mem=rng.random() < 0.4,
        pins=rng.random() < 0.3,
        phases=int(rng.choice([0, 0, 1, 2])),
        passes=int(rng.choice([1, 1, 3, 16])),
        server_wait=rng.random() < 0.3,
        integer_work=rng.random() < 0.3,
    )
    # A per-visit cost on some links, drawn apart so that the other draws stay as they were.
    visit = np.random.default_rng(seed + 1_000_000)
    if visit.random() < 0.3:
        link = dataclasses.replace(instance.link, visit_s=float(visit.uniform(0.001, 0.05)))
        instance = dataclasses.replace(instance, link=link)
    job = np.random.default_rng(seed + 3_000_000)  # the server's own cost per visit, apart too
    if job.random() < 0.3:
        instance = with_job_cost(job, instance)
    opening = np.random.default_rng(seed + 4_000_000)  # the session's opening, apart too
    if opening.random() < 0.3:
        instance = dataclasses.replace(instance, session_open_s=float(opening.uniform(0.001, 0.2)))
        if instance.phase_limits and opening.random() < 0.5:  # a TTFT: it waits for the opening
            first = dataclasses.replace(instance.phase_limits[0], pays_session_open=True)
            instance = dataclasses.replace(instance,
                                           phase_limits=(first, *instance.phase_limits[1:]))
    return pick_limits(rng, instance, KINDS[seed % len(KINDS)])


def with_job_cost(rng: np.random.Generator, instance: Instance) -> Instance:
    """The instance with a random server cost per visit: latency 1-50 ms, work 5-100% of a
    mean unit's."""
    work = float(np.mean([u.server_work for u in instance.units]))
    return dataclasses.replace(instance, job_s=float(rng.uniform(0.001, 0.05)),
                               job_work_s=work * float(rng.uniform(0.05, 1.0)))


def random_placement(rng: np.random.Generator, instance: Instance) -> str:
    """A random placement that respects the pins (where a unit allows either side)."""
    sides = []
    for unit in instance.units:
        allowed = [s for s, ok in (("C", unit.client_ok), ("S", unit.server_ok)) if ok]
        sides.append(str(rng.choice(allowed or ["C", "S"])))
    return "".join(sides)


def with_field(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """`data` with one field set (value None: removed); path like 'layers.0.client_s'."""
    *parents, key = path.split(".")
    target: Any = data
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is None:
        del target[key]
    else:
        target[key] = value
    return data
