"""The resolved scenario the simulator runs: plain frozen values, no file formats."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from splitllm.planner.costs import ModelCosts
from splitllm.planner.hardware import DeviceProfile
from splitllm.planner.network import Link
from splitllm.planner.speculation import Speculation
from splitllm.sim.client_host import ClientHost
from splitllm.sim.dists import Dist
from splitllm.stepmodel import StepModel

DEFAULT_POLICIES = ("server-only", "greedy", "best-single-cut", "exact", "exact-load-aware",
                    "exact-quantile", "exact-tuned", "frontier-priced")


@dataclass(frozen=True)
class ServerSpec:
    """The shared server: its device and how it schedules the jobs queued on it."""

    device: DeviceProfile
    scheduler: str = "fcfs"  # fcfs | ps | batched
    workers: int = 1  # fcfs: jobs served at once, each at full speed
    max_batch: int = 32  # batched: sessions served by one step
    step_model: StepModel | None = None  # batched: a real engine's measured steps (else roofline)


@dataclass(frozen=True)
class ClientClass:
    """A kind of client: its device, its link to the server, its share of the requests."""

    name: str
    device: DeviceProfile
    link: Link
    share: float = 1.0


@dataclass(frozen=True)
class RequestType:
    """A kind of request: a model with token-count distributions and latency limits.

    A synthetic type has no model: it is one server job of `service_s` seconds (with the
    link's round trip around it), for checking the server queue against queueing theory.
    """

    name: str
    sla_s: float
    model: ModelCosts | None = None
    prompt_tokens: Dist = field(default_factory=lambda: Dist("fixed", (128,)))
    output_tokens: Dist = field(default_factory=lambda: Dist("fixed", (1,)))
    ttft_s: float | None = None
    tpot_s: float | None = None
    share: float = 1.0
    keep_on_client: frozenset[str] = frozenset()
    keep_on_server: frozenset[str] = frozenset()
    service_s: Dist | None = None
    speculation: Speculation | None = None  # its clients decode speculatively (measured rate)

    @property
    def decoder(self) -> bool:
        return self.model is not None and self.model.config.kind == "decoder"


@dataclass(frozen=True)
class Trace:
    """Recorded arrivals: times and request types, optionally client classes and token counts.

    A negative entry in an optional column means "not recorded: sample it".
    """

    arrived_at_s: tuple[float, ...]
    type_index: tuple[int, ...]
    class_index: tuple[int, ...] = ()
    prompt_tokens: tuple[int, ...] = ()
    output_tokens: tuple[int, ...] = ()

    @property
    def period_s(self) -> float:
        """How long one replay of the trace lasts: its span plus one mean gap (0: one instant)."""
        n = len(self.arrived_at_s)
        span = self.arrived_at_s[-1] - self.arrived_at_s[0] if n else 0.0
        return span * n / (n - 1) if n > 1 and span > 0 else 0.0

    @property
    def natural_rate_per_s(self) -> float:
        """Requests per second when the trace is replayed in a loop at its own speed."""
        return len(self.arrived_at_s) / self.period_s if self.period_s > 0 else math.inf


@dataclass(frozen=True)
class SweepSpec:
    """Arrival rates for the goodput curves and the goodput-capacity search settings."""

    rates_per_s: tuple[float, ...] = ()  # empty: chosen from the capacities found
    target_attainment: float = 0.9
    rel_tol: float = 0.03
    max_rate_per_s: float = 1e4
    capacity: bool = True
    min_requests: int = 200  # a low rate runs longer, so attainment is measured on enough


@dataclass(frozen=True)
class World:
    """Everything one simulation run needs except the policy and the arrival rate."""

    name: str
    server: ServerSpec
    clients: tuple[ClientClass, ...]
    types: tuple[RequestType, ...]
    duration_s: float
    warmup_s: float = 0.0
    seed: int = 0
    rate_per_s: float = 1.0  # Poisson rate; for a trace, its time axis is scaled to this rate
    trace: Trace | None = None
    policies: tuple[str, ...] = DEFAULT_POLICIES
    wait_tau_s: float = 2.0  # the server's recent-delay estimates forget over this time
    wait_quantile: float = 0.9  # the quantile of recent job delays quantile policies plan for
    plan_headroom: float = 0.0  # policies plan against (1 - headroom) x each latency limit
    headroom_target: float = 0.99  # the SLA attainment self-tuning headroom steers toward
    sweep: SweepSpec = field(default_factory=SweepSpec)
    client_host: ClientHost | None = None  # every client on one machine (the load test's
    # EMULATED clients); None: each client its own device (a real fleet)

    def with_rate(self, rate_per_s: float) -> World:
        """The same world at another arrival rate, run long enough for the sweep's minimum
        number of requests."""
        duration_s = max(self.duration_s, self.sweep.min_requests / rate_per_s)
        return replace(self, rate_per_s=rate_per_s, duration_s=duration_s)

    @property
    def horizon_s(self) -> float:
        """Arrivals stop here; requests that arrived before are followed until they finish."""
        return self.warmup_s + self.duration_s

    @property
    def max_sla_s(self) -> float:
        return max(t.sla_s for t in self.types)
