"""Server counters, rendered in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

import bisect
import itertools
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from splitllm.stepmodel import QUEUE_WAIT_BOUNDS_S

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Histogram:
    """A Prometheus histogram: bucket counts (each value counted once, in the first bucket that
    holds it: one search per value; cumulated at render), sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # [len(bounds) + 1]: the last is +Inf
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def samples(self) -> list[tuple[str, float]]:
        """The cumulative buckets (value <= bound), +Inf last."""
        counts = itertools.accumulate(self.counts or [0] * (len(self.bounds) + 1))
        buckets = [(_le(b), c) for b, c in zip(self.bounds, counts, strict=False)]
        return [*buckets, (_le(math.inf), self.n)]


def _le(bound: float) -> str:
    return 'le="+Inf"' if bound == math.inf else f'le="{_number(bound)}"'


def bucket_counts(page: dict[str, float], name: str,
                  bounds: Sequence[float]) -> list[float] | None:
    """A histogram's count in each of its buckets (+Inf last), from a parsed /metrics page
    (`parse_metrics`): its cumulative buckets taken apart; None where the page lacks one of
    them (a server whose histogram has other bounds)."""
    keys = [f"{name}_bucket{{{_le(b)}}}" for b in (*bounds, math.inf)]
    if any(key not in page for key in keys):
        return None
    cumulative = [page[key] for key in keys]
    return [c - below for c, below in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)]


SECONDS_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COUNT_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Lap(Protocol):
    """Units that ran together in a step (runtime/lane.py's Lap): alike, equal shares."""

    @property
    def units(self) -> range: ...
    @property
    def wall_s(self) -> float: ...
    @property
    def cpu_s(self) -> float: ...
    @property
    def tokens(self) -> int: ...


@dataclass
class LapTotals:
    """What every step's lap over the same units added up to."""

    busy_s: float = 0.0
    tokens: int = 0
    steps: int = 0


@dataclass
class ServerMetrics:
    """Totals since the server started; gauges come from callbacks at render time."""

    unit_names: Sequence[str]
    sessions_opened: int = 0
    sessions_closed: Counter[str] = field(default_factory=Counter)  # by reason
    tokens_processed: int = 0
    tokens_sampled: int = 0
    forwards: int = 0
    verified_positions: int = 0  # speculative decoding: positions the head verified...
    rolled_back_positions: int = 0  # ... and those a later forward rolled back (rejected)
    busy_s: float = 0.0
    cpu_s: float = 0.0
    # per run of units that ran together (a decode step's blocks: one entry, not 30): spread
    # over the units at render time, so a step costs a few dict operations, not ~100
    lap_totals: dict[range, LapTotals] = field(default_factory=dict)
    bytes_received: int = 0
    bytes_sent: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # by code
    steps: int = 0
    step_s: Histogram = field(default_factory=lambda: Histogram(SECONDS_BOUNDS))
    step_rows: Histogram = field(default_factory=lambda: Histogram(COUNT_BOUNDS))
    step_tokens: Histogram = field(default_factory=lambda: Histogram(COUNT_BOUNDS))
    queue_wait_s: Histogram = field(default_factory=lambda: Histogram(QUEUE_WAIT_BOUNDS_S))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_forward(self, tokens: int, sampled: bool) -> None:
        """Account one finished forward message."""
        with self.lock:
            self.forwards += 1
            self.tokens_processed += tokens
            self.tokens_sampled += int(sampled)

    def record_step(self, laps: Sequence[Lap], *, rows: int, tokens: int, wall_s: float,
                    cpu_s: float, queue_waits_s: Sequence[float]) -> None:
        """Account one engine step: its time, its batch, the units it ran (by laps)."""
        with self.lock:
            self.steps += 1
            self.step_s.observe(wall_s)
            self.step_rows.observe(rows)
            self.step_tokens.observe(tokens)
            for wait_s in queue_waits_s:
                self.queue_wait_s.observe(wait_s)
            self.cpu_s += cpu_s
            for lap in laps:
                totals = self.lap_totals.get(lap.units)
                if totals is None:
                    totals = self.lap_totals[lap.units] = LapTotals()
                totals.busy_s += lap.wall_s
                totals.tokens += lap.tokens
                totals.steps += 1
                self.busy_s += lap.wall_s

    def unit_busy_s(self) -> dict[str, float]:
        """Seconds each unit computed (a lap's units alike: equal shares)."""
        busy: dict[str, float] = {}
        for units, totals in self.lap_totals.items():
            for unit in units:
                name = self.unit_names[unit]
                busy[name] = busy.get(name, 0.0) + totals.busy_s / len(units)
        return busy

    def unit_counts(self) -> tuple[Counter[str], Counter[str]]:
        """Token positions each unit processed, and the steps that ran it."""
        tokens: Counter[str] = Counter()
        steps: Counter[str] = Counter()
        for units, totals in self.lap_totals.items():
            for unit in units:
                tokens[self.unit_names[unit]] += totals.tokens
                steps[self.unit_names[unit]] += totals.steps
        return tokens, steps

    def record_bytes(self, received: int = 0, sent: int = 0) -> None:
        with self.lock:
            self.bytes_received += received
            self.bytes_sent += sent

    def record_error(self, code: str) -> None:
        with self.lock:
            self.errors[code] += 1

    def record_speculation(self, *, verified: int, rolled_back: int) -> None:
        """Account positions verified in one pass and rolled back (rejected) before one."""
        with self.lock:
            self.verified_positions += verified
            self.rolled_back_positions += rolled_back

    def record_close(self, reason: str) -> None:
        with self.lock:
            self.sessions_closed[reason] += 1

    def record_open(self) -> None:
        with self.lock:
            self.sessions_opened += 1

    def render(self, open_sessions: int, cache_bytes: int,
               extra: Callable[[], list[str]] | None = None) -> str:
        """The /metrics page."""
        with self.lock:
            lines: list[str] = []
            _metric(lines, "splitllm_open_sessions", "gauge", "Sessions open now.",
                    [("", open_sessions)])
            _metric(lines, "splitllm_kv_cache_bytes", "gauge",
                    "Bytes of KV cache held by open sessions.", [("", cache_bytes)])
            _metric(lines, "splitllm_sessions_opened_total", "counter", "Sessions opened.",
                    [("", self.sessions_opened)])
            _metric(lines, "splitllm_sessions_closed_total", "counter",
                    "Sessions ended, by reason (close, disconnect, idle_timeout, error).",
                    [(f'reason="{r}"', n) for r, n in sorted(self.sessions_closed.items())])
            _metric(lines, "splitllm_tokens_processed_total", "counter",
                    "Token positions that went through server units.",
                    [("", self.tokens_processed)])
            _metric(lines, "splitllm_tokens_sampled_total", "counter",
                    "Next tokens sampled on the server (head on the server).",
                    [("", self.tokens_sampled)])
            _metric(lines, "splitllm_forwards_total", "counter", "Forward messages served.",
                    [("", self.forwards)])
            _metric(lines, "splitllm_speculative_verified_positions_total", "counter",
                    "Positions the server's head verified (a last token and its drafts).",
                    [("", self.verified_positions)])
            _metric(lines, "splitllm_speculative_accepted_positions_total", "counter",
                    "Verified positions never rolled back (rejected drafts are).",
                    [("", self.verified_positions - self.rolled_back_positions)])
            _metric(lines, "splitllm_server_busy_seconds_total", "counter",
                    "Seconds the server spent computing units.", [("", self.busy_s)])
            _metric(lines, "splitllm_server_cpu_seconds_total", "counter",
                    "CPU seconds of the compute threads while computing units (all of the "
                    "compute with one torch thread; a lower bound with more).", [("", self.cpu_s)])
            _metric(lines, "process_cpu_seconds_total", "counter",
                    "CPU seconds of the whole server process (every thread: compute, event "
                    "loop, framing).", [("", time.process_time())])
            busy = self.unit_busy_s()
            unit_tokens, unit_steps = self.unit_counts()
            _metric(lines, "splitllm_unit_busy_seconds_total", "counter",
                    "Seconds the server spent computing each unit.",
                    [(f'unit="{u}"', busy.get(u, 0.0)) for u in self.unit_names])
            _metric(lines, "splitllm_unit_tokens_total", "counter",
                    "Token positions each unit processed on the server.",
                    [(f'unit="{u}"', unit_tokens.get(u, 0)) for u in self.unit_names])
            _metric(lines, "splitllm_wire_bytes_received_total", "counter",
                    "Bytes of WebSocket messages received.", [("", self.bytes_received)])
            _metric(lines, "splitllm_wire_bytes_sent_total", "counter",
                    "Bytes of WebSocket messages sent.", [("", self.bytes_sent)])
            _metric(lines, "splitllm_errors_total", "counter",
                    "Error messages sent to clients, by code.",
                    [(f'code="{c}"', n) for c, n in sorted(self.errors.items())])
            self._render_engine(lines, unit_steps)
        if extra is not None:
            lines.extend(extra())
        return "\n".join(lines) + "\n"

    def _render_engine(self, lines: list[str], unit_steps: Counter[str]) -> None:
        _metric(lines, "splitllm_engine_steps_total", "counter", "Batched engine steps run.",
                [("", self.steps)])
        _histogram(lines, "splitllm_engine_step_seconds", "Wall seconds of one engine step.",
                   self.step_s)
        _histogram(lines, "splitllm_engine_step_rows", "Forwards (rows) in one engine step.",
                   self.step_rows)
        _histogram(lines, "splitllm_engine_step_tokens",
                   "Token positions in one engine step (all rows).", self.step_tokens)
        _histogram(lines, "splitllm_engine_queue_wait_seconds",
                   "Seconds a forward waited in the queue before its first step.",
                   self.queue_wait_s)
        _metric(lines, "splitllm_engine_unit_steps_total", "counter",
                "Engine steps that ran each unit (the batch's units).",
                [(f'unit="{u}"', unit_steps.get(u, 0)) for u in self.unit_names])


def _histogram(lines: list[str], name: str, help_text: str, histogram: Histogram) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} histogram")
    for labels, value in histogram.samples():
        lines.append(f"{name}_bucket{{{labels}}} {_number(value)}")
    lines.append(f"{name}_sum {_number(histogram.total)}")
    lines.append(f"{name}_count {_number(histogram.n)}")


def gauge(name: str, help_text: str, samples: list[tuple[str, float]]) -> list[str]:
    """The /metrics lines of one gauge (for `render`'s `extra`)."""
    lines: list[str] = []
    _metric(lines, name, "gauge", help_text, samples)
    return lines


def _metric(lines: list[str], name: str, kind: str, help_text: str,
            samples: list[tuple[str, float]]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        label_text = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}{label_text} {_number(value)}")


def _number(value: float) -> str:
    return str(int(value)) if isinstance(value, int) else repr(float(value))


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name (with labels) -> value, from a Prometheus text page (for tests and tools)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
