"""The load test's world: a simulator scenario resolved for the model a real server serves.

One `World` drives both the real load test (its policies plan with it) and the simulated
prediction (the batched server with the real server's measured step model), so the two run the
same requests with the same decisions. From the scenario:
- its first `requests` requests (Poisson draws or trace rows, seeded) become a recorded trace:
  every probe replays them, its time axis scaled to the probe's arrival rate, in a loop until
  arrivals have spanned `window_slas` x the longest SLA (so a burst cannot pass for a rate);
- every request type runs on the served model (fp32 weights and wire); prompt and output token
  counts are multiplied by `length_scale` (at least 1, within the model's context);
- every client class keeps its link (EMULATED in the client's transport) and is EMULATED as many
  times slower than this server as the scenario's client device is than the scenario's server
  device on the served model's median request (at least 1x);
- every class's link in the world also carries `visit_s`, the fixed cost of one visit to the
  real server measured at start (`link_probe.measure_visit_s`): the planner and the simulator
  charge it per pass and visit (`network.crossing_s`); the emulated link does not add it (the
  real visit pays it);
- the server is this machine: its fitted device profile (what the planner sees) and the
  engine's measured step model, scheduler `batched` (what the simulator runs);
- each type's SLA: `sla_factor` x the idle server-only latency of its largest request over the
  slowest link on this machine's device profile (a file: the same world in every run; from the
  step model the server timed at its start it read 1.97 and 2.68 s in two runs minutes apart),
  or `sla_s` if given; the scenario's TTFT / TPOT limits are dropped (they were set for its own
  model and server).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from splitllm.errors import UserError
from splitllm.placement import SERVER, Placement
from splitllm.planner.configs import ModelConfig
from splitllm.planner.costs import ModelCosts, model_costs
from splitllm.planner.hardware import DeviceProfile
from splitllm.planner.instance import Request, build_instance, evaluate
from splitllm.planner.network import Link
from splitllm.sim.dists import Dist
from splitllm.sim.metrics import summarize
from splitllm.sim.run import run_policy
from splitllm.sim.workload import Workload, sample_workload
from splitllm.sim.world import ClientClass, RequestType, ServerSpec, SweepSpec, Trace, World
from splitllm.stepmodel import StepModel, UnitFit

FP32_BYTES = 4


@dataclass(frozen=True, kw_only=True)
class LoadtestSpec:
    """How a scenario is turned into the load test's world."""

    requests: int = 96  # per probe, at least: the scenario's first this many requests (24
    # replayed: 2 of them, 8% of every probe, sat at the SLA, so 1-2 more late ones decided it)
    length_scale: float = 1.0  # token counts times this (a small model's context, a slow CPU)
    sla_factor: float = 2.0  # SLA: this x the largest request's idle server-only latency
    sla_s: float | None = None  # or this SLA for every request type
    policies: tuple[str, ...] = ("server-only", "greedy", "exact", "exact-load-aware",
                                 "frontier-priced")
    rel_tol: float = 0.1  # the capacity search stops when its bracket is this narrow
    window_slas: float = 3.0  # arrivals span at least this many of the longest SLA (requests
    # replayed in a loop): a burst of `requests` that the server absorbs within the SLA is no
    # capacity, a steady arrival rate it keeps up with is
    max_batch_rows: int = 64  # the server's rows per step (the simulator's max batch)


@dataclass(frozen=True)
class EmulatedClass:
    """A client class as the real load test runs it: its emulated link and slowdown."""

    name: str
    link: Link
    slowdown: float  # the client's units take this many times longer than on this machine
    scenario_device: str


def served_costs(config: dict[str, object]) -> ModelCosts:
    """The cost model of the served model (a Hugging Face config dict), fp32 weights and wire."""
    return model_costs(ModelConfig.from_hf_dict(config), FP32_BYTES, FP32_BYTES)


def scenario_requests(world: World, n: int) -> Workload:
    """The scenario's first `n` requests at its own rate (seeded: the same every time)."""
    if any(t.model is None for t in world.types):
        raise UserError(f"scenario {world.name}: synthetic request types (service_s) cannot be "
                        "load-tested on a real server")
    long_enough = replace(world, warmup_s=0.0, duration_s=4.0 * n / world.rate_per_s + 60.0)
    load = sample_workload(long_enough)
    if len(load) < n:
        raise UserError(f"scenario {world.name}: only {len(load)} requests, {n} asked for")
    return first_requests(load, n)


def first_requests(load: Workload, n: int) -> Workload:
    """The first `n` requests of a workload."""
    return Workload(*(np.asarray(getattr(load, f))[:n] for f in Workload.__dataclass_fields__))


def scaled_trace(load: Workload, scale: float, context_tokens: int) -> Trace:
    """The requests as a recorded trace, token counts times `scale` (>= 1, within context)."""
    if not scale > 0:
        raise UserError("--length-scale must be > 0")
    output = np.clip(np.rint(load.output_tokens * scale), 1, max(context_tokens // 2, 1))
    prompt = np.clip(np.rint(load.prompt_tokens * scale), 1, context_tokens - output)
    return Trace(arrived_at_s=tuple(float(t) for t in load.arrived_at_s - load.arrived_at_s[0]),
                 type_index=tuple(int(t) for t in load.type_index),
                 class_index=tuple(int(c) for c in load.class_index),
                 prompt_tokens=tuple(int(p) for p in prompt),
                 output_tokens=tuple(int(g) for g in output))


def emulated_slowdown(costs: ModelCosts, client: DeviceProfile, server: DeviceProfile,
                      prompt_tokens: int, output_tokens: int) -> float:
    """How many times longer the whole request takes on `client` than on `server` (>= 1)."""
    request = Request(prompt_tokens=prompt_tokens, output_tokens=output_tokens, sla_s=1.0)
    link = Link(name="none", uplink_bytes_per_s=1e12, downlink_bytes_per_s=1e12, rtt_s=0.0)
    instance = build_instance(costs, client, server, link, request)
    on_client = sum(u.client_s for u in instance.units)
    on_server = sum(u.server_s for u in instance.units)
    return max(on_client / on_server, 1.0)


def roofline_clock(costs: ModelCosts, device: DeviceProfile
                   ) -> Callable[[int, int, int, int], float]:
    """Seconds of units [a, b) on `device` for a pass over positions [start, start + T), called
    as (a, b, start, T): the planner's own phase times (`build_instance`: a prefill from
    position 0, else T positions at a context of start + T), so an EMULATED client that takes
    them is the device the planner planned for."""
    causal = costs.config.kind == "decoder"

    def seconds(a: int, b: int, start: int, tokens: int) -> float:
        units = costs.units[a:b]
        if start == 0:
            return sum(float(device.time_s(u.prefill_flops(tokens, causal),
                                           u.prefill_bytes(tokens))) for u in units)
        context = start + tokens
        return sum(float(device.time_s(tokens * u.decode_flops(context),
                                       u.decode_bytes(context))) for u in units)

    return seconds


def slower(device: DeviceProfile, factor: float, name: str) -> DeviceProfile:
    """`device` with both roofline peaks divided by `factor`."""
    return replace(device, name=name, peak_flops_per_s=device.peak_flops_per_s / factor,
                   mem_bandwidth_bytes_per_s=device.mem_bandwidth_bytes_per_s / factor)


def idle_server_only_s(costs: ModelCosts, device: DeviceProfile, link: Link,
                       prompt_tokens: int, output_tokens: int) -> float:
    """Server-only latency on an idle server of `device` (the planner's own phase times): the
    session's opening, every unit of every pass, a round trip per pass."""
    request = Request(prompt_tokens=prompt_tokens, output_tokens=output_tokens, sla_s=1.0)
    instance = build_instance(costs, device, device, link, request)
    return evaluate(instance, Placement(SERVER * len(instance.units))).latency_s


def _types(world: World, trace: Trace, costs: ModelCosts, device: DeviceProfile,
           slowest: Link, spec: LoadtestSpec) -> tuple[RequestType, ...]:
    types = []
    kinds = np.asarray(trace.type_index)
    prompts, outputs = np.asarray(trace.prompt_tokens), np.asarray(trace.output_tokens)
    for k, t in enumerate(world.types):
        mine = kinds == k
        p_max = int(prompts[mine].max()) if mine.any() else 1
        g_max = int(outputs[mine].max()) if mine.any() else 1
        sla_s = spec.sla_s or spec.sla_factor * idle_server_only_s(costs, device, slowest,
                                                                   p_max, g_max)
        types.append(RequestType(
            name=t.name, sla_s=sla_s, model=costs, share=t.share,
            prompt_tokens=Dist("uniform", low=1, high=p_max),
            output_tokens=Dist("uniform", low=1, high=g_max)))
    return tuple(types)


def loadtest_world(scenario: World, *, config: dict[str, object], context_tokens: int,
                   this_machine: DeviceProfile, step: StepModel, spec: LoadtestSpec,
                   visit_s: float = 0.0) -> tuple[World, tuple[EmulatedClass, ...]]:
    """The world the load test and its simulated prediction share, and the emulated clients
    (`visit_s`: the measured fixed cost of one visit to the server, in the world's links)."""
    if spec.requests < 2:
        raise UserError("--requests must be >= 2")
    costs = served_costs(config)
    trace = scaled_trace(scenario_requests(scenario, spec.requests), spec.length_scale,
                         context_tokens)
    p_median = int(np.median(trace.prompt_tokens))
    g_median = int(np.median(trace.output_tokens))
    emulated = tuple(EmulatedClass(
        name=c.name, link=c.link, scenario_device=c.device.name,
        slowdown=emulated_slowdown(costs, c.device, scenario.server.device, p_median, g_median))
        for c in scenario.clients)
    clients = tuple(ClientClass(
        name=c.name, link=replace(e.link, visit_s=visit_s), share=c.share,
        device=slower(this_machine, e.slowdown, f"{c.device.name}: this machine / "
                      f"{e.slowdown:.3g} (EMULATED)"))
        for c, e in zip(scenario.clients, emulated, strict=True))
    slowest = max((c.link for c in scenario.clients), key=lambda link: link.rtt_s)
    types = _types(scenario, trace, costs, this_machine, slowest, spec)
    world = World(
        name=scenario.name,
        server=ServerSpec(device=this_machine, scheduler="batched", workers=1,
                          max_batch=spec.max_batch_rows, step_model=step),
        clients=clients, types=types,
        duration_s=spec.window_slas * max(t.sla_s for t in types), seed=scenario.seed,
        rate_per_s=1.0, trace=trace,
        policies=spec.policies, wait_tau_s=scenario.wait_tau_s,
        wait_quantile=scenario.wait_quantile, plan_headroom=scenario.plan_headroom,
        headroom_target=scenario.headroom_target,
        sweep=SweepSpec(target_attainment=scenario.sweep.target_attainment,
                        rel_tol=spec.rel_tol, min_requests=spec.requests))
    return world, emulated


def with_step_model(world: World, step: StepModel) -> World:
    """The world whose batched server runs `step` (its SLAs stay as they were set)."""
    return replace(world, server=replace(world.server, step_model=step))



def scaled_step_model(step: StepModel, factor: float) -> StepModel:
    """`step` with every unit's seconds and its seconds per job times `factor`."""
    def times(fit: UnitFit) -> UnitFit:
        return UnitFit(points=tuple((tokens, seconds * factor) for tokens, seconds in fit.points))

    return replace(step, embed=times(step.embed), block=times(step.block),
                   head=times(step.head), job_s=step.job_s * factor)


@dataclass(frozen=True, kw_only=True)
class Probed:
    """What one probe that ran to its end measured of the machine."""

    rate_per_s: float
    server_s_per_request: float  # `loadtest.Probe.server_s_per_request` (nan: none)
    client_cpu_s: float  # the clients' process CPU seconds over the probe (nan: none)
    placements: tuple[str, ...] = ()  # the sides each of its requests ran with (the world's
    # workload at its rate, in order; empty: not recorded)


def speed_factors(world: World, policy: str, probes: Sequence[Probed]) -> tuple[float, float]:
    """(server, clients): the median, over `probes`, of the server's seconds per request as
    the simulator charges them (its steps' wall seconds, which a server core shared with
    other work stretches and its CPU seconds not, and its forwards' CPU outside the steps)
    and of the clients' CPU measured, each over what `world` gives at the probe's rate (1:
    none to compare) for the same work: the probe's own placements replayed. A load-reading
    policy's simulated choices at a rate differ from the real ones (a busier simulated server
    offloads more): `frontier-priced` read x1.76 with its own choices, where the server was
    no slower (docs/measurements.md)."""
    server, clients = [], []
    for p in probes:
        at_rate = world.with_rate(p.rate_per_s)
        record = run_policy(at_rate, policy, replayed=p.placements or None)
        simulated = summarize(at_rate, record).server_s_per_request
        if simulated > 0 and p.server_s_per_request > 0:
            server.append(p.server_s_per_request / simulated)
        if record.client_cores_busy_s > 0 and p.client_cpu_s > 0:
            clients.append(p.client_cpu_s / record.client_cores_busy_s)
    return (statistics.median(server) if server else 1.0,
            statistics.median(clients) if clients else 1.0)


def as_probed(world: World, server_factor: float, client_factor: float) -> World:
    """`world` with its server's step model and its clients' CPU scaled by these factors."""
    step = world.server.step_model
    host = world.client_host
    return replace(world, server=replace(world.server, step_model=step and scaled_step_model(
        step, server_factor)), client_host=host and host.scaled_cpu(client_factor))
