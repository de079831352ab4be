"""The load test's idle check: each policy's plan for the largest request of each request type
and client class, run alone on an idle server, its predicted latency beside the measured one,
part by part.

A plan that misses its SLA with the server idle cannot keep it under load, so the check says,
before any capacity is searched, whether the planner's model of a request holds:
- client: the units on the (EMULATED) client, predicted by its device profile; measured as
  the time the client's units took (the emulation sleeps to what the profile says);
- server: the units on the server, predicted by this machine's device profile; measured as the
  server's compute time for the session;
- other: crossings of the (EMULATED) link, the per-visit cost, the client's loop and the
  opening of the server's session (`Instance.session_open_s`); measured as the rest of the
  request's latency (arrival to its last token).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitllm.planner.instance import Plan, evaluate
from splitllm.sim.policies import PlanPolicy, request_instance
from splitllm.sim.world import World


@dataclass(frozen=True, kw_only=True)
class Parts:
    """A request's latency in parts (seconds)."""

    client_s: float
    server_s: float
    other_s: float  # crossings, visits, the client's loop, the session's opening

    @property
    def latency_s(self) -> float:
        return self.client_s + self.server_s + self.other_s


@dataclass(frozen=True, kw_only=True)
class Alone:
    """What one request run alone measured."""

    latency_s: float  # to its last token
    ttft_s: float
    client_busy_s: float  # the client's units, emulation included
    server_busy_s: float  # the server's compute for this session
    round_trips: int
    client_cpu_s: float = math.nan  # the client process's CPU seconds for it (units, transport)


@dataclass(frozen=True, kw_only=True)
class IdleRow:
    """One policy's plan for one kind of request: predicted and measured, part by part."""

    request_type: str
    client_class: str
    policy: str
    placement: str
    planned: bool  # False: the policy found no plan within the SLA (its fallback ran)
    prompt_tokens: int
    output_tokens: int
    sla_s: float
    predicted: Parts
    measured: Parts
    ttft_s: float
    round_trips: int
    client_cpu_s: float = math.nan  # measured: the client process's CPU seconds for it

    @property
    def met(self) -> bool:
        """The request, alone on an idle server, met its SLA."""
        return self.measured.latency_s <= self.sla_s


def predicted_parts(plan: Plan) -> Parts:
    """The planner's latency of a plan, in parts."""
    return Parts(client_s=plan.client_compute_s, server_s=plan.server_compute_s,
                 other_s=plan.network_s)


def measured_parts(alone: Alone) -> Parts:
    """A measured request's latency in the same parts: the rest is everything but compute."""
    return Parts(client_s=alone.client_busy_s, server_s=alone.server_busy_s,
                 other_s=alone.latency_s - alone.client_busy_s - alone.server_busy_s)


Runner = Callable[[int, int, int, str], Alone]  # (class, prompt, output tokens, sides) -> Alone


def idle_check(world: World, run_alone: Runner) -> list[IdleRow]:
    """Every policy of `world` on the largest request of each type from each client class
    (its SLA's reference request), each run alone by `run_alone`."""
    rows = []
    trace = world.trace
    assert trace is not None  # the load test's world replays recorded requests
    kinds = np.asarray(trace.type_index)
    for k, rtype in enumerate(world.types):
        mine = kinds == k
        if not mine.any():
            continue
        p = int(np.asarray(trace.prompt_tokens)[mine].max())
        g = int(np.asarray(trace.output_tokens)[mine].max())
        for c, client in enumerate(world.clients):
            instance = request_instance(rtype, client, world, p, g)
            for policy in world.policies:
                decision = PlanPolicy(world, policy).decide(k, c, p, g)
                sides = decision.placement.sides
                alone = run_alone(c, p, g, sides)
                rows.append(IdleRow(
                    request_type=rtype.name, client_class=client.name, policy=policy,
                    placement=sides, planned=decision.planned, prompt_tokens=p, output_tokens=g,
                    sla_s=rtype.sla_s, predicted=predicted_parts(evaluate(instance,
                                                                          decision.placement)),
                    measured=measured_parts(alone), ttft_s=alone.ttft_s,
                    round_trips=alone.round_trips, client_cpu_s=alone.client_cpu_s))
    return rows


def _parts(p: Parts) -> str:
    return f"{p.client_s:.3g} / {p.server_s:.3g} / {p.other_s:.3g} = {p.latency_s:.3g}"


def _sides(placement: str) -> str:
    """CCSSS... as counts: '2 C, 30 S'."""
    on_client = placement.count("C")
    return f"{on_client} C, {len(placement) - on_client} S"


def idle_md(rows: list[IdleRow]) -> str:
    """The idle check as a report section."""
    missed = [r for r in rows if not r.met]
    lines = ["## Alone on an idle server: predicted against measured", "",
             "Each policy's plan for the largest request of each type from each client class, "
             "run alone before the search. Parts: client units / server units / other "
             "(crossings, visits, the client's loop, the session's opening) = latency to the "
             "last token, seconds.", "",
             "| type | client | policy | units | SLA (s) | predicted | measured | met |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.request_type} | {r.client_class} | {r.policy} | {_sides(r.placement)}"
              f"{'' if r.planned else ' (no plan: fallback)'} | {r.sla_s:.3g} | "
              f"{_parts(r.predicted)} | {_parts(r.measured)} | {'yes' if r.met else '**no**'} |"
              for r in rows]
    lines += ["", "Every request met its SLA alone on the idle server." if not missed else
              f"**{len(missed)} of {len(rows)} missed their SLA alone on the idle server** "
              "(no rate can keep them within it): " + ", ".join(
                  f"`{r.policy}` from {r.client_class} ({r.measured.latency_s:.3g} s against "
                  f"{r.sla_s:.3g} s)" for r in missed) + ".", ""]
    return "\n".join(lines)


def idle_json(rows: list[IdleRow]) -> list[dict[str, Any]]:
    """The idle check for results.json and `--json`."""
    def parts(p: Parts) -> dict[str, float]:
        return {"client_s": p.client_s, "server_s": p.server_s, "other_s": p.other_s,
                "latency_s": p.latency_s}

    return [{"request_type": r.request_type, "client_class": r.client_class,
             "policy": r.policy, "placement": r.placement, "planned": r.planned,
             "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
             "sla_s": r.sla_s, "met": r.met, "predicted": parts(r.predicted),
             "measured": parts(r.measured), "ttft_s": r.ttft_s, "round_trips": r.round_trips,
             "client_cpu_s": r.client_cpu_s if math.isfinite(r.client_cpu_s) else None}
            for r in rows]
