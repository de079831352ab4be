"""One request on one client: per-unit times and bytes, the link and the SLA (the planner's input).

Latency of a placement = unit times on their sides + every crossing (`network.crossing_s`): a
generation of G tokens makes G forward passes (one prefill, G - 1 decode steps) and each pass
pays the one-way delay at every switch, while the bytes already total what crosses over all
passes; a placement that runs any unit on the server also opens its session there once
(`session_open_s`, counted in its network seconds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated

import numpy as np
from pydantic import ConfigDict, Field, with_config

from splitllm.errors import UserError
from splitllm.placement import CLIENT, SERVER, Placement
from splitllm.planner.costs import ModelCosts
from splitllm.planner.hardware import DeviceProfile
from splitllm.planner.network import (
    Link,
    Switches,
    carried_bytes,
    path_network_s,
    session_open_s,
    switch_costs,
    visits,
)
from splitllm.planner.speculation import Speculation, decode_passes, pass_contexts

REL_TOL = 1e-9  # limits hold up to this relative slack: sums in another order differ by ulps

# What an instance file may hold (pydantic reads these when `instance_file` validates one; values
# built in code are not checked): a number is a finite JSON number (true is not 1.0, "2" not 2.0).
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
AtLeastOne = Annotated[int, Field(ge=1)]


@with_config(ConfigDict(extra="forbid"))
@dataclass(frozen=True, kw_only=True)
class Unit:
    """Costs of one placement unit (embedding, a block, or final norm + head) for one request."""

    name: str
    client_s: NonNegative
    server_s: NonNegative
    server_work: NonNegative
    out_bytes: NonNegative
    client_mem_bytes: NonNegative = 0.0
    client_ok: bool = True
    server_ok: bool = True


@with_config(ConfigDict(extra="forbid"))
@dataclass(frozen=True, kw_only=True)
class PhaseLimit:
    """An extra latency limit on one phase (TTFT: the prefill pass; TPOT: one decode step).

    The phase has its own per-unit times and bytes on the same units and link. A phase that
    holds the first token (`pays_session_open`: TTFT) also waits for the server session's
    opening where the plan opens one (`Instance.session_open_s`).
    """

    name: str
    limit_s: Positive
    client_s: tuple[NonNegative, ...]
    server_s: tuple[NonNegative, ...]
    out_bytes: tuple[NonNegative, ...]
    input_bytes: NonNegative
    output_bytes: NonNegative
    passes: AtLeastOne = 1
    pays_session_open: bool = False


@dataclass(frozen=True)
class Instance:
    """Everything the planner needs about one request on one client."""

    units: tuple[Unit, ...]
    link: Link
    sla_s: float
    input_bytes: float
    output_bytes: float
    passes: int = 1
    client_mem_limit_bytes: float = math.inf
    phase_limits: tuple[PhaseLimit, ...] = field(default=())
    server_wait_s: float = 0.0  # expected queueing delay per visit to the server, per pass
    # The server's own seconds per visit (one forward message) per pass beyond its units:
    # framing, decoding, sampling, the engine's hand-offs (`StepModel.job_s`); in latency
    # (job_s, beside the queueing delay) and in server work (job_work_s).
    job_s: float = 0.0
    job_work_s: float = 0.0
    # Seconds of opening the request's server session (`network.session_open_s`), once per
    # request that runs any unit on the server: latency, not server work.
    session_open_s: float = 0.0

    def __len__(self) -> int:
        return len(self.units)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.units)

    @cached_property
    def switches(self) -> Switches:
        """What a switch costs on each edge of the end-to-end path (once per instance)."""
        carried = carried_bytes(self.input_bytes, [u.out_bytes for u in self.units],
                                self.output_bytes)
        return switch_costs(self.link, carried, self.passes, self.server_wait_s + self.job_s)

    @cached_property
    def phase_switches(self) -> tuple[Switches, ...]:
        """The same for each phase limit, with its own bytes and passes."""
        return tuple(
            switch_costs(self.link, carried_bytes(p.input_bytes, p.out_bytes, p.output_bytes),
                         p.passes, self.server_wait_s + self.job_s)
            for p in self.phase_limits
        )


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A placement with what it costs on one instance."""

    placement: Placement
    latency_s: float
    server_work: float
    client_mem_bytes: float
    client_compute_s: float
    server_compute_s: float
    network_s: float
    phase_latency_s: tuple[float, ...]
    feasible: bool
    violation: str | None


def _path_latency(
    sides: str, client_s: Sequence[float], server_s: Sequence[float], edges: Switches
) -> tuple[float, float, float]:
    """(client compute, server compute, network) seconds of one path through the units."""
    client = sum(c for c, s in zip(client_s, sides, strict=True) if s == CLIENT)
    server = sum(t for t, s in zip(server_s, sides, strict=True) if s == SERVER)
    return client, server, path_network_s(_on_server(sides), edges)


def _on_server(sides: str) -> np.ndarray:
    """[L] bool: where a path runs each unit on the server."""
    return np.frombuffer(sides.encode(), dtype=np.uint8) == ord(SERVER)


def evaluate(instance: Instance, placement: Placement) -> Plan:
    """Latency, server work, client memory and feasibility of a placement."""
    sides = placement.sides
    units = instance.units
    client, server, network = _path_latency(
        sides, [u.client_s for u in units], [u.server_s for u in units], instance.switches)
    opening_s = instance.session_open_s if SERVER in sides else 0.0
    phases = tuple(
        math.fsum((*_path_latency(sides, p.client_s, p.server_s, edges),
                   opening_s if p.pays_session_open else 0.0))
        for p, edges in zip(instance.phase_limits, instance.phase_switches, strict=True)
    )
    network += opening_s
    latency = client + server + network
    work = (sum(u.server_work for u, s in zip(units, sides, strict=True) if s == SERVER)
            + visits(_on_server(sides)) * instance.passes * instance.job_work_s)
    mem = sum(u.client_mem_bytes for u, s in zip(units, sides, strict=True) if s == CLIENT)
    violation = _violation(instance, sides, latency, mem, phases)
    return Plan(
        placement=placement, latency_s=latency, server_work=work, client_mem_bytes=mem,
        client_compute_s=client, server_compute_s=server, network_s=network,
        phase_latency_s=phases, feasible=violation is None, violation=violation,
    )


def _violation(
    instance: Instance, sides: str, latency_s: float, mem_bytes: float, phases: tuple[float, ...]
) -> str | None:
    for unit, side in zip(instance.units, sides, strict=True):
        if side == CLIENT and not unit.client_ok:
            return f"unit {unit.name} may not run on the client"
        if side == SERVER and not unit.server_ok:
            return f"unit {unit.name} may not run on the server"
    if mem_bytes > instance.client_mem_limit_bytes * (1 + REL_TOL):
        return f"client memory {mem_bytes:.4g} B > limit {instance.client_mem_limit_bytes:.4g} B"
    if latency_s > instance.sla_s * (1 + REL_TOL):
        return f"latency {latency_s:.4g} s > SLA {instance.sla_s:.4g} s"
    for phase, value in zip(instance.phase_limits, phases, strict=True):
        if value > phase.limit_s * (1 + REL_TOL):
            return f"{phase.name} {value:.4g} s > limit {phase.limit_s:.4g} s"
    return None


@dataclass(frozen=True, kw_only=True)
class Request:
    """One request: P prompt tokens (or patches), G output tokens, latency limits (none: inf)."""

    prompt_tokens: int
    output_tokens: int
    sla_s: float = math.inf
    ttft_s: float | None = None
    tpot_s: float | None = None
    speculation: Speculation | None = None  # speculative decoding: fewer, wider decode passes

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 0:
            raise UserError("a request needs prompt_tokens >= 1 and output_tokens >= 0")
        if not self.sla_s > 0:  # inf: no end-to-end limit
            raise UserError(f"sla_s must be a positive number, got {self.sla_s}")
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise UserError(f"{name} must be a positive number, got {value}")


@dataclass(frozen=True)
class PhaseTimes:
    """Seconds of each unit on one device: the prefill, and each decode step after it."""

    prefill_s: np.ndarray  # [units]
    decode_s: np.ndarray  # [units, decode passes]; G - 1 without speculation, pass k at P + k


def phase_times(model: ModelCosts, device: DeviceProfile, request: Request) -> PhaseTimes:
    """Roofline time of every unit on `device` for the prefill and each decode step."""
    p = request.prompt_tokens
    causal = model.config.kind == "decoder"
    decode_tokens = max(request.output_tokens - 1, 0) if causal else 0
    ctx = pass_contexts(p, decode_tokens, request.speculation)  # [passes]
    width = request.speculation.positions_per_pass if request.speculation else 1
    prefill = np.array([device.time_s(u.prefill_flops(p, causal), u.prefill_bytes(p))
                        for u in model.units])
    # A pass over `width` positions: FLOPs per position, weights and KV cache read once.
    decode = np.array([device.time_s(width * u.decode_flops(ctx), u.decode_bytes(ctx))
                       for u in model.units]).reshape(len(model.units), len(ctx))
    return PhaseTimes(prefill, decode)


def _floats(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def build_instance(
    model: ModelCosts,
    client: DeviceProfile,
    server: DeviceProfile,
    link: Link,
    request: Request,
    keep_on_client: frozenset[str] = frozenset(),
    keep_on_server: frozenset[str] = frozenset(),
) -> Instance:
    """The planner's instance for one request of `model` from `client` over `link`."""
    names = model.config.unit_names
    for pinned in keep_on_client | keep_on_server:
        if pinned not in names:
            raise UserError(f"unknown unit {pinned!r}: units are embed, block0..block"
                            f"{len(names) - 3}, head")
    decoder = model.config.kind == "decoder"
    p, g = request.prompt_tokens, request.output_tokens if decoder else 0
    decode = decode_passes(max(g - 1, 0), request.speculation)
    width = request.speculation.positions_per_pass if request.speculation else 1
    passes = 1 + decode if g > 0 else 1
    tokens_crossing = p + decode * width  # every prompt token once, then each pass's positions
    on_client, on_server = phase_times(model, client, request), phase_times(model, server, request)
    client_s = on_client.prefill_s + on_client.decode_s.sum(axis=1)
    server_s = on_server.prefill_s + on_server.decode_s.sum(axis=1)
    input_bytes = model.input_bytes_per_token * tokens_crossing
    output_bytes = model.output_bytes_per_token * passes
    units = tuple(
        Unit(
            name=u.name,
            client_s=float(client_s[i]),
            server_s=float(server_s[i]),
            server_work=float(server_s[i]),
            out_bytes=output_bytes if u.name == "head" else u.out_bytes_per_token * tokens_crossing,
            client_mem_bytes=u.weight_bytes + u.kv_bytes(p + g),
            client_ok=u.name not in keep_on_server,
            server_ok=u.name not in keep_on_client,
        )
        for i, u in enumerate(model.units)
    )
    phases: list[PhaseLimit] = []
    per_token_out = tuple(u.out_bytes_per_token for u in model.units)
    if request.ttft_s is not None:
        phases.append(PhaseLimit(
            name="ttft", limit_s=request.ttft_s, client_s=_floats(on_client.prefill_s),
            server_s=_floats(on_server.prefill_s),
            out_bytes=tuple(float(b * p) for b in per_token_out),
            input_bytes=model.input_bytes_per_token * p,
            output_bytes=model.output_bytes_per_token, pays_session_open=True,
        ))
    if request.tpot_s is not None and decoder and g > 1:
        # The last decode step is the slowest (longest context): bound it.
        phases.append(PhaseLimit(
            name="tpot", limit_s=request.tpot_s, client_s=_floats(on_client.decode_s[:, -1]),
            server_s=_floats(on_server.decode_s[:, -1]), out_bytes=per_token_out,
            input_bytes=model.input_bytes_per_token, output_bytes=model.output_bytes_per_token,
        ))
    return Instance(
        units=units,
        link=link,
        sla_s=request.sla_s,
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        passes=passes,
        client_mem_limit_bytes=client.mem_capacity_bytes,
        phase_limits=tuple(phases),
        session_open_s=session_open_s(link),
    )
