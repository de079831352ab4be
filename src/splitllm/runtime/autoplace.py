"""`--placement auto`: the planner's instance for this request, from device profiles and the link
measured at connect time, then the planner's exact solution.

Two sources of per-unit times: measured profiles (the server times its units at start and
reports them in /v1/info; the client times its own, times any emulated slowdown), or the
planner's device presets (roofline estimates) when a device name is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from splitllm.errors import UserError
from splitllm.placement import CLIENT, SERVER, Placement
from splitllm.planner.instance import Instance, Plan, Request, Unit, evaluate
from splitllm.planner.network import Link
from splitllm.runtime.profile import UnitProfile

MEASURED = "measured"
HEADER_BYTES_PER_MESSAGE = 160  # JSON header + WebSocket framing of one tensor message
TOKEN_REPLY_BYTES = 96  # the `token` reply of a pass whose head runs on the server
DEFAULT_SLA_SLACK = 1.5  # default SLA: this many times the faster of all-client / all-server


def measured_instance(client: UnitProfile, server: UnitProfile, link: Link, request: Request,
                      hidden_bytes_per_token: float, sla_s: float = math.inf,
                      client_mem_bytes: Sequence[float] | None = None) -> Instance:
    """The planner's instance from measured per-unit times (and the wire format's sizes)."""
    if client.names != server.names:
        raise UserError("client and server profiles cover different units (another model?)")
    g = max(request.output_tokens, 1)
    passes = g  # one prefill, then g - 1 decode steps
    tokens_crossing = request.prompt_tokens + g - 1
    client_prefill = client.prefill_at(request.prompt_tokens)
    server_prefill = server.prefill_at(request.prompt_tokens)
    units = []
    head = len(client.names) - 1
    for i, name in enumerate(client.names):
        client_s = client_prefill[i] + (g - 1) * client.decode_s[i]
        server_s = server_prefill[i] + (g - 1) * server.decode_s[i]
        if i == head:
            out_bytes = float(TOKEN_REPLY_BYTES * passes)
        else:
            out_bytes = hidden_bytes_per_token * tokens_crossing + HEADER_BYTES_PER_MESSAGE * passes
        mem = client_mem_bytes[i] if client_mem_bytes is not None else 0.0
        units.append(Unit(name=name, client_s=client_s, server_s=server_s, server_work=server_s,
                          out_bytes=out_bytes, client_mem_bytes=mem))
    return Instance(
        units=tuple(units), link=link, sla_s=sla_s,
        input_bytes=8.0 * tokens_crossing + HEADER_BYTES_PER_MESSAGE * passes,
        output_bytes=float(TOKEN_REPLY_BYTES * passes), passes=passes,
    )


def preset_instance(config: dict[str, Any], client_device: str, server_device: str, link: Link,
                    request: Request, weight_bytes: float, wire_bytes: float,
                    sla_s: float = math.inf) -> Instance:
    """The planner's instance from its roofline device presets."""
    from splitllm.planner.configs import ModelConfig
    from splitllm.planner.costs import model_costs
    from splitllm.planner.hardware import device_preset
    from splitllm.planner.instance import build_instance

    costs = model_costs(ModelConfig.from_hf_dict(config), weight_bytes=weight_bytes,
                        wire_bytes=wire_bytes)
    planned = replace(request, output_tokens=max(request.output_tokens, 1), sla_s=sla_s)
    return build_instance(costs, device_preset(client_device), device_preset(server_device),
                          link, planned)


def with_sla(instance: Instance, sla_s: float) -> Instance:
    """The same instance under another SLA."""
    return replace(instance, sla_s=sla_s)


def fastest_uniform_s(instance: Instance) -> float:
    """Latency of the faster uniform placement (all-client or all-server)."""
    n = len(instance)
    return min(evaluate(instance, Placement(side * n)).latency_s for side in (CLIENT, SERVER))


def default_sla_s(instance: Instance) -> float:
    """A default SLA: 1.5 x the latency of the faster uniform placement (all-C or all-S)."""
    return DEFAULT_SLA_SLACK * fastest_uniform_s(instance)


def plan_placement(instance: Instance, solver: str = "exact") -> Plan:
    """The least-server-work placement within the SLA; UserError if none meets it."""
    from splitllm.planner.solvers import solve

    plan = solve(instance, solver=solver)
    if plan is None:
        raise UserError(f"no placement meets the SLA of {instance.sla_s:.3g} s (all-client or "
                        f"all-server take {fastest_uniform_s(instance):.3g} s at best): "
                        "raise --sla-s")
    return plan


DEMO_SOLVERS = ("exact", "greedy", "best-single-cut", "server-only", "client-only")


def compare_plans(instance: Instance, solvers: Sequence[str] = DEMO_SOLVERS
                  ) -> dict[str, Plan | None]:
    """What each solver picks on this instance (for the demo's plan table)."""
    from splitllm.planner.solvers import solve

    return {name: solve(instance, solver=name) for name in solvers}
