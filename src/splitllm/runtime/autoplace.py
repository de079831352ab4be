"""`placement="auto"`: the planner's instance for this request, from device profiles, the link
measured at connect time and the wire format's real message sizes, then the planner's exact
solution.

Two sources of per-unit times: measured ones, or the planner's device presets (roofline
estimates) when a device name is given. Measured: the client times its own units (times any
emulated slowdown) and its loop's cost per pass; the server's come from what /v1/info publishes,
the engine's own step model (wall seconds for latency, CPU seconds for the server's work, at the
rows per step the server reports) or, from an older server, its unit profile.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from splitllm.errors import UserError
from splitllm.placement import CLIENT, SERVER, Placement
from splitllm.planner.instance import Instance, Plan, Request, Unit, evaluate
from splitllm.planner.network import Link, session_open_s
from splitllm.planner.speculation import Speculation, decode_passes, pass_contexts
from splitllm.runtime import protocol as wire
from splitllm.runtime.profile import UnitProfile
from splitllm.runtime.units import UnitStack
from splitllm.runtime.wire_bytes import RequestBytes, WireFormat, request_bytes, session_bytes
from splitllm.stepmodel import StepModel

MEASURED = "measured"
DEFAULT_SLA_SLACK = 1.5  # default SLA: this many times the faster of all-client / all-server
DEFAULT_HEADROOM = 0.1  # auto placement plans within (1 - this) x the SLA: a plan that sat on
# its SLA missed it by 6-25% (the example, quiet machine): steps vary, means exceed medians


@dataclass(frozen=True)
class AutoPlan:
    """What `placement="auto"` decided, and on which instance."""

    plan: Plan
    instance: Instance  # under the request's SLA
    source: str  # "measured" or "presets client/server"
    headroom: float = 0.0  # the plan's latency is within (1 - headroom) x the SLA


@dataclass(frozen=True)
class ServerTimes:
    """Seconds per unit of one request on the server: its latency (wall) and its work (CPU)."""

    latency_s: tuple[float, ...]
    work_s: tuple[float, ...]
    source: str  # where they come from, in words
    job_s: float = 0.0  # the server's own seconds per visit per pass, beyond the units...
    job_work_s: float = 0.0  # ... and its work (the step models' job_s, wall and CPU)


def profile_server_times(server: UnitProfile, request: Request) -> ServerTimes:
    """From the server's unit profile: wall seconds for latency, CPU seconds for work."""
    g = max(request.output_tokens, 1)  # passes: one prefill, then g - 1 decode steps
    p = request.prompt_tokens

    def total(profile: UnitProfile) -> tuple[float, ...]:
        return tuple(np.add(profile.prefill_at(p),
                            decode_s(profile, p, g - 1, request.speculation)).tolist())

    return ServerTimes(total(server), total(server.cpu()), "the server's unit profile")


def step_model_server_times(wall: StepModel, cpu: StepModel, request: Request, *,
                            rows: float = 1.0, profile: UnitProfile | None = None,
                            fit: str = "") -> ServerTimes:
    """From the engine's own step model at `rows` rows per decode step (the server's load).

    A decode step of `rows` rows takes a unit's step time (latency) and costs this request its
    share of the step's CPU seconds (work); the KV reads the step model, measured at short
    contexts, lacks come from the unit profile. The prefill, per unit, is the step model's
    curve at P tokens where the engine has run steps that long (its own steps: their packing,
    caches and hand-offs, which the profile's bare `stack.run` misses); beyond its longest, the
    slower of the curve's extension and the unit profile's P-token prefill (a long prompt's
    attention, which the curve's straight extension misses). Within the curve the profile is
    no better: it was timed once at start and is announced at the blocks' live speed, a ratio
    the decode steps set (memory-bound, where a prefill is compute-bound).
    `fit` says which model it is (timed at start, or live), in words.
    """
    g = max(request.output_tokens, 1)
    p, c = request.prompt_tokens, max(rows, 1.0)
    passes = decode_passes(g - 1, request.speculation)
    spec = request.speculation
    positions = spec.positions_per_pass if spec is not None else 1  # per row of a decode step

    def total(model: StepModel, share: float, unit_profile: UnitProfile | None
              ) -> tuple[float, ...]:
        fits = (model.embed, *[model.block] * model.n_blocks, model.head)
        prefill = np.array([fit.seconds(p) for fit in fits[:-1]] + [model.head.seconds(1)])
        reads = np.zeros(len(fits))
        if unit_profile is not None:
            beyond = np.array([p > fit.longest_tokens for fit in fits[:-1]] + [False])
            prefill = np.where(beyond, np.maximum(prefill, unit_profile.prefill_at(p)), prefill)
            reads = np.array(unit_profile.kv_reads_s(p, g - 1))
        step = np.array([fit.seconds(c * positions) for fit in fits])  # a step of c rows
        return tuple((prefill + passes * step * share + reads).tolist())

    return ServerTimes(total(wall, 1.0, profile), total(cpu, 1.0 / c, profile and profile.cpu()),
                       f"the server's engine step model{fit} at {c:.3g} rows per step"
                       + (" (a prefill beyond its longest step: the slower of it and the "
                          "unit profile)" if profile else ""),
                       job_s=wall.job_s, job_work_s=cpu.job_s)


def measured_instance(client: UnitProfile, server: ServerTimes, link: Link, request: Request,
                      wire_bytes: RequestBytes, *, sla_s: float = math.inf,
                      client_mem_bytes: Sequence[float] | None = None) -> Instance:
    """The planner's instance from measured per-unit times and the wire format's real sizes.

    The client loop's own cost per pass (`client.pass_s`) is paid by every placement: it is
    added to the first unit's latency on both sides (never to the server's work). The server's
    own seconds per visit (`server.job_s`, `job_work_s`) are charged per visit and pass, and
    opening the server session once (`session_open_s`, its messages' bytes left to the caller).
    """
    if len(client.names) != len(server.latency_s):
        raise UserError("client and server profiles cover different units (another model?)")
    g = max(request.output_tokens, 1)  # passes: one prefill, then g - 1 decode steps
    p = request.prompt_tokens
    passes = 1 + decode_passes(g - 1, request.speculation)
    loop_s = np.zeros(len(client.names))
    loop_s[0] = client.pass_s * passes
    decode = decode_s(client, p, g - 1, request.speculation)
    client_s = np.add(client.prefill_at(p), decode) + loop_s
    server_s = np.add(server.latency_s, loop_s)
    out_bytes = (*wire_bytes.hidden, wire_bytes.token_down)  # the head's output is the token
    mem = client_mem_bytes if client_mem_bytes is not None else [0.0] * len(client.names)
    units = tuple(Unit(name=name, client_s=float(client_s[i]), server_s=float(server_s[i]),
                       server_work=float(server.work_s[i]), out_bytes=out_bytes[i],
                       client_mem_bytes=float(mem[i])) for i, name in enumerate(client.names))
    return Instance(units=units, link=link, sla_s=sla_s, input_bytes=wire_bytes.ids_up,
                    output_bytes=wire_bytes.token_down, passes=passes,
                    job_s=server.job_s, job_work_s=server.job_work_s,
                    session_open_s=session_open_s(link))


def decode_s(profile: UnitProfile, prompt_tokens: int, decode_tokens: int,
             speculation: Speculation | None) -> np.ndarray:
    """[units] seconds of the decode passes that yield `decode_tokens` tokens.

    A speculative pass is a decode step at its context plus the compute of its k drafts,
    taken from the prefill fit (k + 1 positions against one): weights are read once per pass.
    """
    if speculation is None:
        return np.array(profile.decode_steps_s(prompt_tokens, decode_tokens))
    contexts = pass_contexts(prompt_tokens, decode_tokens, speculation)  # [passes]
    steps = np.sum([profile.decode_at(int(c)) for c in contexts], axis=0)  # [units]
    drafts = np.subtract(profile.prefill_at(speculation.positions_per_pass), profile.prefill_at(1))
    return steps + len(contexts) * np.maximum(drafts, 0.0)


def server_times(server_info: dict[str, Any], request: Request, rows: float = 1.0
                 ) -> ServerTimes:
    """The server's unit times from /v1/info: its engine step model where it publishes one
    (wall and CPU), else its unit profile."""
    profile = UnitProfile.from_json(server_info["profile"]) if server_info.get("profile") else None
    if server_info.get("step_model") and server_info.get("step_model_cpu"):
        return step_model_server_times(StepModel.from_json(server_info["step_model"]),
                                       StepModel.from_json(server_info["step_model_cpu"]),
                                       request, rows=rows, profile=profile,
                                       fit=fit_words(server_info.get("step_model_fit")))
    if profile is None:
        raise UserError("the server publishes no measured profile: pass device presets "
                        "(--client-device and --server-device)")
    return profile_server_times(profile, request)


def fit_words(fit: dict[str, Any] | None) -> str:
    """/v1/info's `step_model_fit` in words: " (live, refitted on N steps, X ms of CPU per
    visit, Y ms wall)" or " (start-up)"."""
    if not fit:
        return ""
    if fit.get("source") == "live":
        job_s = fit.get("job_s") or [0.0, 0.0]
        return (f" (live, refitted on {int(fit.get('steps', 0))} steps, "
                f"{1e3 * float(job_s[-1]):.2g} ms of CPU per visit, "
                f"{1e3 * float(job_s[0]):.2g} ms wall)")
    return f" ({fit.get('source', 'start-up')})"


def request_instance(*, stack: UnitStack, model_config: dict[str, Any], link: Link,
                     request: Request, wire_dtype: str, server_info: dict[str, Any],
                     client_profile: Callable[[], UnitProfile], client_device: str = MEASURED,
                     server_device: str | None = None, server_rows: float = 1.0
                     ) -> tuple[Instance, str]:
    """The planner's instance for a request (no SLA yet) and where its times come from.

    Both devices measured: the client's profile (measured on first use) and the server's
    engine step model at `server_rows` rows per step (or its unit profile) from /v1/info;
    otherwise both are device presets. Either way the session's opening pays its real messages.
    """
    server_device = server_device or str(server_info.get("device") or MEASURED)
    wire_itemsize = wire.WIRE_DTYPES[wire_dtype].itemsize
    if client_device == MEASURED and server_device == MEASURED:
        server = server_times(server_info, request, server_rows)
        context = request.prompt_tokens + request.output_tokens
        memory = [float(stack.parameter_bytes(u) + stack.kv_bytes(u, context))
                  for u in range(stack.n_units)]
        fmt = WireFormat(n_units=stack.n_units, hidden_size=stack.hidden_size,
                         wire_dtype=wire_dtype, vocab_size=stack.vocab_size)
        sizes = request_bytes(fmt, request.prompt_tokens, request.output_tokens,
                              speculation=request.speculation)
        instance = measured_instance(client_profile(), server, link, request, sizes,
                                     client_mem_bytes=memory)
        source = f"{MEASURED}; server: {server.source}"
        return _opening(instance, stack, wire_dtype, request), source
    if MEASURED in (client_device, server_device):
        raise UserError("mixing a measured profile with a device preset is not supported: "
                        "name presets for both --client-device and --server-device")
    instance = preset_instance(model_config, client_device=client_device,
                               server_device=server_device, link=link, request=request,
                               weight_bytes=stack.dtype.itemsize, wire_bytes=wire_itemsize)
    source = f"presets {client_device}/{server_device}"
    return _opening(instance, stack, wire_dtype, request), source


def _opening(instance: Instance, stack: UnitStack, wire_dtype: str, request: Request
             ) -> Instance:
    """The instance with its session's opening over its link, paying the real `open` and
    `opened` messages (those of the server-only plan: other plans' differ by a few bytes)."""
    opened = session_bytes(Placement.all_on(SERVER, stack.n_units), stack.names,
                           wire_dtype=wire_dtype, prompt_tokens=request.prompt_tokens,
                           new_tokens=request.output_tokens)
    return replace(instance, session_open_s=session_open_s(instance.link, opened.open_up,
                                                           opened.open_down))


def preset_instance(config: dict[str, Any], *, client_device: str, server_device: str,
                    link: Link, request: Request, weight_bytes: float, wire_bytes: float,
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


def plan_request(instance: Instance, source: str, sla_s: float | None = None,
                 headroom: float = DEFAULT_HEADROOM) -> AutoPlan:
    """The least-server-work placement of an instance within (1 - headroom) x sla_s (default
    SLA: `default_sla_s`); where none is that fast, the least server work within the SLA."""
    if not 0.0 <= headroom < 1.0:
        raise UserError(f"the headroom must be in [0, 1), got {headroom:g}")
    whole = with_sla(instance, sla_s if sla_s is not None else default_sla_s(instance))
    try:
        return AutoPlan(plan_placement(with_sla(whole, (1.0 - headroom) * whole.sla_s)), whole,
                        source, headroom)
    except UserError:
        return AutoPlan(plan_placement(whole), whole, source)


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
