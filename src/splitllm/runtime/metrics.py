"""Server counters, rendered in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class ServerMetrics:
    """Totals since the server started; gauges come from callbacks at render time."""

    unit_names: Sequence[str]
    sessions_opened: int = 0
    sessions_closed: Counter[str] = field(default_factory=Counter)  # by reason
    tokens_processed: int = 0
    tokens_sampled: int = 0
    forwards: int = 0
    busy_s: float = 0.0
    cpu_s: float = 0.0
    unit_busy_s: dict[str, float] = field(default_factory=dict)
    unit_tokens: Counter[str] = field(default_factory=Counter)
    bytes_received: int = 0
    bytes_sent: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # by code
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_forward(self, units: tuple[int, int], tokens: int, unit_seconds: Sequence[float],
                       sampled: bool, cpu_s: float = 0.0) -> None:
        """Account one forward: busy seconds per unit, tokens through the server."""
        with self.lock:
            self.forwards += 1
            self.cpu_s += cpu_s
            self.tokens_processed += tokens
            self.tokens_sampled += int(sampled)
            for index, seconds in zip(range(*units), unit_seconds, strict=False):
                name = self.unit_names[index]
                self.unit_busy_s[name] = self.unit_busy_s.get(name, 0.0) + seconds
                self.unit_tokens[name] += tokens
                self.busy_s += seconds

    def record_bytes(self, received: int = 0, sent: int = 0) -> None:
        with self.lock:
            self.bytes_received += received
            self.bytes_sent += sent

    def record_error(self, code: str) -> None:
        with self.lock:
            self.errors[code] += 1

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
            _metric(lines, "splitllm_server_busy_seconds_total", "counter",
                    "Seconds the server spent computing units.", [("", self.busy_s)])
            _metric(lines, "splitllm_server_cpu_seconds_total", "counter",
                    "CPU seconds of the compute threads while computing units (all of the "
                    "compute with one torch thread; a lower bound with more).", [("", self.cpu_s)])
            _metric(lines, "splitllm_unit_busy_seconds_total", "counter",
                    "Seconds the server spent computing each unit.",
                    [(f'unit="{u}"', self.unit_busy_s.get(u, 0.0)) for u in self.unit_names])
            _metric(lines, "splitllm_unit_tokens_total", "counter",
                    "Token positions each unit processed on the server.",
                    [(f'unit="{u}"', self.unit_tokens.get(u, 0)) for u in self.unit_names])
            _metric(lines, "splitllm_wire_bytes_received_total", "counter",
                    "Bytes of WebSocket messages received.", [("", self.bytes_received)])
            _metric(lines, "splitllm_wire_bytes_sent_total", "counter",
                    "Bytes of WebSocket messages sent.", [("", self.bytes_sent)])
            _metric(lines, "splitllm_errors_total", "counter",
                    "Error messages sent to clients, by code.",
                    [(f'code="{c}"', n) for c, n in sorted(self.errors.items())])
        if extra is not None:
            lines.extend(extra())
        return "\n".join(lines) + "\n"


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
