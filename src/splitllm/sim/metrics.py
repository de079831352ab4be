"""What a run achieved: throughput, goodput, latency percentiles, SLA attainment, server load.

Measured requests are those arriving in the window [warm-up end, horizon). A request meets its
SLA when it finishes within `sla_s` (and its TTFT / mean TPOT within `ttft_s` / `tpot_s` when
the type sets them). Requests still running when the run ends count as misses and as infinite
latency in the percentiles. Throughput and goodput count completions inside the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitllm.placement import CLIENT
from splitllm.sim.run import RunRecord
from splitllm.sim.world import World

REL_TOL = 1e-9  # the walk and the planner sum the same times in another order
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RunMetrics:
    """The summary of one run of one policy at one arrival rate."""

    policy: str
    rate_per_s: float
    requests: int  # measured (arrived in the window)
    completed: int  # measured and finished before the run ended
    throughput_per_s: float
    goodput_per_s: float
    sla_attainment: float
    server_s_per_request: float  # server-seconds charged per completed measured request
    utilization: float
    ttft_s: tuple[float, ...]  # p50, p90, p99
    tpot_s: tuple[float, ...]
    latency_s: tuple[float, ...]
    client_unit_share: float  # share of all placement units run on the clients
    fallback_share: float  # requests whose policy found no feasible plan
    job_delay_mean_s: float
    events: int
    attainment_by_type: tuple[tuple[str, float], ...]
    server_s_by_type: tuple[tuple[str, float], ...]  # per completed measured request
    client_share_by_unit: tuple[tuple[str, tuple[float, ...]], ...]  # per request type


def sla_met(world: World, rec: RunRecord) -> np.ndarray:
    """[n] bool: each request finished within all of its type's limits."""
    latency = rec.finished_at_s - rec.arrived_at_s
    ttft = rec.first_token_at_s - rec.arrived_at_s
    tpot = _tpot(rec)
    met = np.zeros(len(latency), dtype=bool)
    for k, t in enumerate(world.types):
        mask = rec.type_index == k
        ok = latency[mask] <= t.sla_s * (1 + REL_TOL)  # nan (unfinished) compares False
        if t.ttft_s is not None:
            ok &= ttft[mask] <= t.ttft_s * (1 + REL_TOL)
        if t.tpot_s is not None:
            ok &= ~(tpot[mask] > t.tpot_s * (1 + REL_TOL))  # no TPOT for single tokens
        met[mask] = ok
    return met


def _tpot(rec: RunRecord) -> np.ndarray:
    steps = rec.output_tokens - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(steps > 0, (rec.finished_at_s - rec.first_token_at_s) / steps, np.nan)


def _percentiles(values: np.ndarray) -> tuple[float, ...]:
    if not len(values):
        return tuple(float("nan") for _ in PERCENTILES)
    finite = np.where(np.isnan(values), np.inf, values)  # unfinished: slower than any
    return tuple(float(np.percentile(finite, q, method="higher")) for q in PERCENTILES)


def _client_share_by_unit(world: World, rec: RunRecord, measured: np.ndarray
                          ) -> tuple[tuple[str, tuple[float, ...]], ...]:
    out = []
    for k, t in enumerate(world.types):
        if t.model is None:
            continue
        mine = np.bincount(rec.placement_index[measured & (rec.type_index == k)],
                           minlength=len(rec.placements))
        total = mine.sum()
        share = np.zeros(len(t.model.units))
        for index, sides in enumerate(rec.placements):
            if mine[index] and len(sides) == len(share):
                share += mine[index] * (np.frombuffer(sides.encode(), np.uint8) == ord(CLIENT))
        out.append((t.name, tuple(float(v) for v in share / max(total, 1))))
    return tuple(out)


def summarize(world: World, rec: RunRecord) -> RunMetrics:
    """The metrics of one run."""
    lo, hi = rec.window_s
    duration = hi - lo
    measured = (rec.arrived_at_s >= lo) & (rec.arrived_at_s < hi)
    finished = ~np.isnan(rec.finished_at_s)
    met = sla_met(world, rec)
    in_window = finished & (rec.finished_at_s >= lo) & (rec.finished_at_s < hi)
    n = int(measured.sum())
    done = measured & finished
    synthetic = np.array([t.model is None for t in world.types])[rec.type_index]
    placed = measured & ~synthetic
    client_units = np.array([s.count(CLIENT) / len(s) for s in rec.placements] or [0.0])
    latency = (rec.finished_at_s - rec.arrived_at_s)[measured]
    by_type = tuple(
        (t.name, float(met[measured & (rec.type_index == k)].mean()))
        for k, t in enumerate(world.types) if (measured & (rec.type_index == k)).any()
    )
    return RunMetrics(
        policy=rec.policy,
        rate_per_s=rec.rate_per_s,
        requests=n,
        completed=int(done.sum()),
        throughput_per_s=float(in_window.sum() / duration),
        goodput_per_s=float((in_window & met).sum() / duration),
        sla_attainment=float(met[measured].mean()) if n else float("nan"),
        server_s_per_request=float(rec.server_work_s[done].mean()) if done.any() else 0.0,
        utilization=rec.busy_window_s / (duration * world.server.workers),
        ttft_s=_percentiles((rec.first_token_at_s - rec.arrived_at_s)[measured]),
        tpot_s=_percentiles(_tpot(rec)[measured & (rec.output_tokens > 1)]),
        latency_s=_percentiles(latency),
        client_unit_share=float(client_units[rec.placement_index[placed]].mean())
        if placed.any() else 0.0,
        fallback_share=float((~rec.planned[measured]).mean()) if n else 0.0,
        job_delay_mean_s=rec.job_delay_mean_s,
        events=rec.events,
        attainment_by_type=by_type,
        server_s_by_type=tuple(
            (t.name, float(rec.server_work_s[done & (rec.type_index == k)].mean()))
            for k, t in enumerate(world.types) if (done & (rec.type_index == k)).any()
        ),
        client_share_by_unit=_client_share_by_unit(world, rec, measured),
    )
