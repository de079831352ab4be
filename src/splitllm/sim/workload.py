"""The request stream of a world: arrival times, request types, client classes, token counts.

Each attribute has its own random stream (spawned from the world's seed) drawn in fixed-size
chunks, so request i is the same request at every arrival rate and in every policy's run; only
the arrival times scale with the rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitllm.sim.world import RequestType, Trace, World

CHUNK = 4096
STREAMS = ("arrivals", "type", "client", "prompt", "output", "service")


@dataclass(frozen=True)
class Workload:
    """Requests arriving before the horizon, in arrival order (arrays of equal length)."""

    arrived_at_s: np.ndarray  # [n] float
    type_index: np.ndarray  # [n] int
    class_index: np.ndarray  # [n] int
    prompt_tokens: np.ndarray  # [n] int
    output_tokens: np.ndarray  # [n] int (1 for encoders)
    service_s: np.ndarray  # [n] float: drawn service of synthetic types, else 0

    def __len__(self) -> int:
        return len(self.arrived_at_s)


def _streams(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return {name: np.random.default_rng(s) for name, s in zip(STREAMS, children, strict=True)}


def _uniforms(rng: np.random.Generator, n: int) -> np.ndarray:
    chunks = -(-n // CHUNK)
    return np.concatenate([rng.random(CHUNK) for _ in range(chunks)])[:n] if n else np.zeros(0)


def _poisson_times(rng: np.random.Generator, rate_per_s: float, horizon_s: float) -> np.ndarray:
    parts: list[np.ndarray] = []
    last = 0.0
    while last <= horizon_s * rate_per_s:  # unit-rate arrival times, then scaled
        gaps = rng.standard_exponential(CHUNK)
        parts.append(last + np.cumsum(gaps))
        last = float(parts[-1][-1])
    unit = np.concatenate(parts)
    times = unit / rate_per_s
    return times[times < horizon_s]


def _pick(shares: list[float], u: np.ndarray) -> np.ndarray:
    cum = np.cumsum(shares) / np.sum(shares)
    return np.minimum(np.searchsorted(cum, u, side="right"), len(shares) - 1)


def _per_type(types: tuple[RequestType, ...], index: np.ndarray, u: np.ndarray,
              attr: str) -> np.ndarray:
    out = np.zeros(len(index), dtype=np.int64)
    for k, t in enumerate(types):
        mask = index == k
        if mask.any():
            out[mask] = getattr(t, attr).quantile(u[mask])
    return out


def _trace_times(trace: Trace, rate_per_s: float, horizon_s: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Arrival times and trace rows: the trace replayed in a loop, one replay per n / rate s."""
    base = np.asarray(trace.arrived_at_s)
    n = len(base)
    period = trace.period_s
    phase = base / period if period > 0 else np.zeros(n)  # position within one replay
    copies = int(np.ceil(horizon_s * rate_per_s / n)) + 1
    times = ((np.arange(copies)[:, None] + phase[None, :]) * (n / rate_per_s)).ravel()
    rows = np.tile(np.arange(n), copies)
    keep = times < horizon_s
    return times[keep], rows[keep]


def sample_workload(world: World) -> Workload:
    """The requests of `world` at its arrival rate, before its horizon."""
    rng = _streams(world.seed)
    trace = world.trace
    if trace is None:
        times = _poisson_times(rng["arrivals"], world.rate_per_s, world.horizon_s)
        n = len(times)
        types = _pick([t.share for t in world.types], _uniforms(rng["type"], n))
    else:
        times, rows = _trace_times(trace, world.rate_per_s, world.horizon_s)
        n = len(times)
        types = np.asarray(trace.type_index, dtype=np.int64)[rows]
    classes = _pick([c.share for c in world.clients], _uniforms(rng["client"], n))
    prompt = _per_type(world.types, types, _uniforms(rng["prompt"], n), "prompt_tokens")
    output = _per_type(world.types, types, _uniforms(rng["output"], n), "output_tokens")
    if trace is not None:
        for column, arr in ((trace.class_index, classes), (trace.prompt_tokens, prompt),
                            (trace.output_tokens, output)):
            if not column:
                continue
            recorded = np.asarray(column, dtype=np.int64)[rows]
            arr[recorded >= 0] = recorded[recorded >= 0]
    service = np.zeros(n)
    u_service = _uniforms(rng["service"], n)
    for k, t in enumerate(world.types):
        mask = types == k
        if t.service_s is not None and mask.any():
            service[mask] = t.service_s.quantile(u_service[mask])
        if not t.decoder:  # encoders (and synthetic jobs) make exactly one pass
            output[mask] = 1
    return Workload(times, types.astype(np.int64), classes.astype(np.int64),
                    np.maximum(prompt, 1), np.maximum(output, 0), service)
