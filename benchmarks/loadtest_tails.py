"""Where a load-test probe's requests lose their time: measured beside simulated, per request.

Starts a local SmolLM2 server as `splitllm loadtest` does (azure-conv x 1/64 tokens, 96
requests a probe, calibrated the same way), runs each policy's probes at the given rates (to
their end: no early stop, so every request has both sides), and splits every request's
latency into the same parts on both sides:

- units: the client's units (measured: their wall seconds, emulation included; simulated: its
  device's time);
- server: each visit's time at the server beyond the link (measured: each forward's wall
  seconds less its emulated link delay: the server's queue and compute, a visit's fixed cost,
  the client's own transport work; simulated: the server's queue and steps plus the link's
  `visit_s` a visit);
- link: the emulated crossings and the session's opening;
- rest: measured, everything else (the worker thread taking the request late, the client's
  loop between its parts); simulated, the shared client cores' queue (`sim.client_host`).

The simulated side is the world as this very probe ran it (the calibrated world at the
probe's own server and clients' speed factors, `loadtest_world.speed_factors`), at the same
rate, on the same requests with the same placements (greedy and exact do not read the load).
Per part: median / p90 on each side, the mean of measured less simulated over the same
requests, and that mean over the requests that missed their SLA measured but met it
simulated (the part whose error costs attainment). Then how close the plans sit to the SLA:
each request's idle latency (its walk on an idle server) over its SLA, and the simulated
attainment if every request took 0.1, 0.2 or 0.3 s longer; last, every 0.5 s of the probe the
clients' core busy and the requests in flight on both sides (measured: the clients' process's
CPU and its worker threads running a request; simulated: the shared cores, the requests arrived
and not finished); for a load-reading policy, the loads it planned with on both sides (its
tuned headroom, the queue wait's mean and quantile) and the share of its plans that found none
within the limits (`sim.policies.rescue`). `--trace-out FILE` times every
forward inside the server (`forward_trace.py`) and prints, per probe, each forward's hops on
one clock (the client's call, its socket, the server's message to reply, the client's read),
over all requests and over those missed measured and met simulated, and the real steps over
the step model's price grouped by how busy the clients' core was; `--gc-out DIR` logs every
garbage collection of both processes (`gc_pauses.py`) and prints each probe's. Run it under
the measurement lock:

    flock /work/measure.lock env PYTHONPATH=src python benchmarks/loadtest_tails.py \
        --device-profile device.json --policies greedy,exact --rates 6.5,7.5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

import gc_pauses
from forward_trace import lines_from, parts_table, priced_steps, steps_table
from splitllm.placement import Placement
from splitllm.planner.hardware import device_preset
from splitllm.runtime import demo, loadtest_run, remote, transport
from splitllm.runtime.client import Session
from splitllm.runtime.dialer import fetch_info
from splitllm.runtime.fidelity_run import local_server
from splitllm.runtime.loadtest import BUSY, QUEUE_WAIT, Outcome, Probe, counter_delta, probed
from splitllm.runtime.loadtest_command import _scenario, _visit_s, calibrated, calibrated_host
from splitllm.runtime.loadtest_run import RealRunner, RunnerOptions
from splitllm.runtime.loadtest_world import (
    LoadtestSpec,
    as_probed,
    loadtest_world,
    speed_factors,
)
from splitllm.runtime.models import LoadedModel, context_tokens, load_model
from splitllm.sim.client_host import SharedCores
from splitllm.sim.metrics import sla_met
from splitllm.sim.policies import Decision, Load, PlanPolicy
from splitllm.sim.run import RunRecord, run_policy
from splitllm.sim.walk import Walk, WalkBuilder
from splitllm.sim.world import World
from splitllm.stepmodel import StepModel

CURRENT = threading.local()  # the request a worker thread runs now
PARTS = ("latency_s", "units_s", "server_s", "link_s", "rest_s")
LONGER_S = (0.1, 0.2, 0.3)  # the knife-edge: simulated attainment with every request this late
TIMELINE_S = 0.5  # the clients' core and requests in flight, a value this often


@dataclass(frozen=True, kw_only=True)
class Parts:
    """Per request (arrays over the probe's requests, nan: not finished), seconds."""

    latency_s: np.ndarray
    units_s: np.ndarray
    server_s: np.ndarray
    link_s: np.ndarray
    rest_s: np.ndarray


@dataclass(frozen=True, kw_only=True)
class Exchange:
    """One message exchange of a request, as its client saw it."""

    kind: str  # "forward" or "open"
    wall_s: float
    link_s: float  # its emulated link delay
    key: str  # a forward's `session:seq`, as the server's trace names it
    start_s: float  # time.perf_counter(), the clock of the server's trace
    socket: tuple[tuple[str, float], ...]  # ("sent" | "received", when) at the socket


class Timings:
    """Per request: each message exchange, its generation and its outcome (how late its
    worker thread took it among them); and every `TIMELINE_S` the clients' process's (wall s,
    CPU s, requests in flight)."""

    def __init__(self) -> None:
        self.exchanges: dict[int, list[Exchange]] = {}
        self.generations: dict[int, Any] = {}
        self.outcomes: dict[int, Outcome] = {}
        self.samples: list[tuple[float, float, int]] = []
        self.start_s = math.nan  # the probe's clock (time.perf_counter)
        self.in_flight = 0
        self.lock = threading.Lock()
        self.loads: list[tuple[Load, bool]] = []  # what the policy planned with, and whether
        # it found a plan within the limits

    def busy_stretches(self) -> list[tuple[float, float, float]]:
        """(start, end, the clients' process's cores busy) between consecutive samples, on the
        perf counter."""
        pairs = zip(self.samples, self.samples[1:], strict=False)  # each with the next
        return [(w0, w1, (c1 - c0) / max(w1 - w0, 1e-9)) for (w0, c0, _), (w1, c1, _) in pairs]

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """Within: a thread samples the clients' process every `TIMELINE_S`."""
        stop = threading.Event()

        def sample() -> None:
            while True:
                self.samples.append((time.perf_counter(), time.process_time(), self.in_flight))
                if stop.wait(TIMELINE_S):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield
        finally:
            stop.set()
            sampler.join()

    def exchange(self, kind: str, call: Callable[[], Any], transport: Any,
                 key: Callable[[], str] = lambda: "") -> Any:
        link_before_s = getattr(transport, "delay_s", 0.0)
        start_s = time.perf_counter()
        result = call()
        self.exchanges.setdefault(getattr(CURRENT, "r", -1), []).append(Exchange(
            kind=kind, wall_s=time.perf_counter() - start_s,
            link_s=getattr(transport, "delay_s", 0.0) - link_before_s, key=key(),
            start_s=start_s, socket=tuple(getattr(CURRENT, "socket", ()))))
        return result


@contextlib.contextmanager
def instrumented(runner: RealRunner, timings: Timings) -> Iterator[None]:
    """Within: the runner's requests, sessions and server exchanges are timed, and its probes
    run to their end (no early stop)."""
    forward, opened, generate = (remote.RemoteSession.forward, remote.RemoteSession.__init__,
                                 Session.generate)
    one, failed = runner._one, loadtest_run.certainly_failed
    socket = transport.WebSocketTransport
    send, recv = socket.send, socket.recv

    def timed_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        CURRENT.socket = []
        return timings.exchange("forward", lambda: forward(self, *args, **kwargs),
                                self.transport, key=lambda: f"{self.session_id}:{self.seq}")

    def marked(call: Callable[..., Any], what: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            result = call(*args, **kwargs)
            getattr(CURRENT, "socket", []).append((what, time.perf_counter()))
            return result
        return timed

    def timed_open(self: Any, transport: Any, *args: Any, **kwargs: Any) -> None:
        timings.exchange("open", lambda: opened(self, transport, *args, **kwargs), transport)

    def timed_generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = generate(self, *args, **kwargs)
        timings.generations[getattr(CURRENT, "r", -1)] = result
        return result

    def timed_one(load: Any, r: int, *args: Any) -> Outcome:
        CURRENT.r = r
        timings.start_s = args[2]
        with timings.lock:
            timings.in_flight += 1
        try:
            timings.outcomes[r] = one(load, r, *args)
        finally:
            with timings.lock:
                timings.in_flight -= 1
        return timings.outcomes[r]

    remote.RemoteSession.forward = timed_forward  # type: ignore[method-assign]
    remote.RemoteSession.__init__ = timed_open  # type: ignore[method-assign]
    Session.generate = timed_generate  # type: ignore[method-assign]
    runner._one = timed_one  # type: ignore[method-assign,assignment]
    socket.send, socket.recv = marked(send, "sent"), marked(recv, "received")  # type: ignore
    loadtest_run.certainly_failed = lambda *_: False
    try:
        with timings.sampling(), decisions_logged(timings.loads):
            yield
    finally:
        remote.RemoteSession.forward = forward  # type: ignore[method-assign]
        remote.RemoteSession.__init__ = opened  # type: ignore[method-assign]
        Session.generate = generate  # type: ignore[method-assign]
        runner._one = one  # type: ignore[method-assign]
        socket.send, socket.recv = send, recv  # type: ignore[method-assign]
        loadtest_run.certainly_failed = failed


def measured_parts(timings: Timings, n: int) -> Parts:
    """The parts of each of the probe's `n` requests as measured."""
    parts = {name: np.full(n, math.nan) for name in PARTS}
    for r, outcome in timings.outcomes.items():
        generation = timings.generations.get(r)
        if generation is None or math.isnan(outcome.finished_s):
            continue
        exchanges = timings.exchanges.get(r, [])
        forwards = [(e.wall_s, e.link_s) for e in exchanges if e.kind == "forward"]
        opening_s = sum(e.wall_s for e in exchanges if e.kind == "open")
        parts["latency_s"][r] = outcome.finished_s
        parts["units_s"][r] = generation.client_busy_s
        parts["server_s"][r] = sum(wall - link for wall, link in forwards)
        parts["link_s"][r] = sum(link for _, link in forwards) + opening_s
        parts["rest_s"][r] = outcome.finished_s - sum(parts[p][r] for p in PARTS[1:4])
    return Parts(**parts)


def _walks(world: World, record: RunRecord) -> list[Walk]:
    builder = WalkBuilder(world)
    return [builder.walk(int(record.type_index[r]), int(record.class_index[r]),
                         int(record.prompt_tokens[r]), int(record.output_tokens[r]),
                         Placement(record.placements[record.placement_index[r]]))
            for r in range(len(record.arrived_at_s))]


def simulated_parts(world: World, record: RunRecord) -> Parts:
    """The parts of each request of a simulated run made with `log=True`."""
    n = len(record.arrived_at_s)
    at_server = np.zeros(n)
    for r, _j, arrived_s, done_s in record.job_log:
        at_server[r] += done_s - arrived_s
    walks = _walks(world, record)
    visit_s = np.array([world.clients[int(c)].link.visit_s for c in record.class_index])
    visits = np.array([w.jobs for w in walks], dtype=float)
    gaps = np.array([sum(w.gaps_s) for w in walks])
    units = np.array([sum(w.client_s) for w in walks])
    latency = record.finished_at_s - record.arrived_at_s
    return Parts(latency_s=latency, units_s=units, server_s=at_server + visits * visit_s,
                 link_s=gaps - units - visits * visit_s, rest_s=latency - gaps - at_server)


def idle_latency_s(world: World, record: RunRecord) -> np.ndarray:
    """Each request's latency on an idle server with its own device (its walk's sum)."""
    return np.array([sum(w.gaps_s) + sum(w.service_s) for w in _walks(world, record)])


def _q(values: np.ndarray, q: float) -> float:
    finite = values[~np.isnan(values)]
    return float(np.quantile(finite, q)) if len(finite) else math.nan


def comparison(measured: Parts, simulated: Parts, missed: np.ndarray) -> str:
    """Per part: median / p90 (ms) on each side, and the mean difference over the same
    requests, all of them and those in `missed`."""
    lines = ["| part | measured p50 / p90 (ms) | simulated p50 / p90 (ms) | measured - "
             "simulated, mean (ms) | ... over those missed measured, met simulated |",
             "|---|---|---|---|---|"]
    both = ~np.isnan(measured.latency_s) & ~np.isnan(simulated.latency_s)
    for name in PARTS:
        m, s = getattr(measured, name), getattr(simulated, name)
        diff = (m - s)[both]
        lost = (m - s)[both & missed]
        lines.append(f"| {name[:-2]} | {_q(m, .5) * 1e3:.0f} / {_q(m, .9) * 1e3:.0f} | "
                     f"{_q(s, .5) * 1e3:.0f} / {_q(s, .9) * 1e3:.0f} | "
                     f"{np.mean(diff) * 1e3:+.0f} | "
                     f"{np.mean(lost) * 1e3 if len(lost) else math.nan:+.0f} ({len(lost)}) |")
    return "\n".join(lines)


HOPS: dict[str, Callable[[Exchange, dict[str, Any]], float]] = {
    "client: call -> written to the socket (uplink sleep in it)":
        lambda e, t: _at(e, "sent") - e.start_s,
    "socket -> the server's message parsed": lambda e, t: t["start"] - _at(e, "sent"),
    "server: message -> reply sent": lambda e, t: t["sent"] - t["start"],
    "  of it, queue -> its first step": lambda e, t: t["step_start"][0] - t["put"],
    "server sent -> client read it": lambda e, t: _at(e, "received") - t["sent"],
    "client: read -> returned (downlink sleep in it)":
        lambda e, t: e.start_s + e.wall_s - _at(e, "received"),
    "client's oversleep and hand-offs (all client hops less the link)":
        lambda e, t: e.wall_s - (t["sent"] - t["start"]) - e.link_s,
}


def _at(exchange: Exchange, what: str) -> float:
    """When the exchange first did `what` at its socket."""
    return next((t for w, t in exchange.socket if w == what), math.nan)


def hops_table(timings: Timings, entries: Sequence[dict[str, Any]], missed: np.ndarray) -> str:
    """Where each request's forwards spent their time, the client's clock beside the server's
    trace (one machine, one perf counter): per hop the mean over requests of its sum over the
    request's forwards, over all requests and over those in `missed`, and the p99 of one
    forward."""
    traced = {e["key"]: e for e in entries if "key" in e and e.get("step_start")}
    n = len(missed)
    sums = {hop: np.full(n, math.nan) for hop in HOPS}
    every: dict[str, list[float]] = {hop: [] for hop in HOPS}
    for r, exchanges in timings.exchanges.items():
        pairs = [(e, traced[e.key]) for e in exchanges if e.kind == "forward" and e.key in traced]
        if not 0 <= r < n or not pairs:
            continue
        for hop, part in HOPS.items():
            values = [part(e, t) for e, t in pairs]
            sums[hop][r] = sum(values)
            every[hop] += values
    lines = ["| hop | mean a request (ms) | ... missed measured, met simulated | p99 a forward "
             "(ms) |", "|---|---|---|---|"]
    for hop in HOPS:
        lost = sums[hop][missed]
        lost_ms = np.nanmean(lost) * 1e3 if np.isfinite(lost).any() else math.nan
        lines.append(f"| {hop} | {np.nanmean(sums[hop]) * 1e3:.1f} | {lost_ms:.1f} "
                     f"({int(np.isfinite(lost).sum())}) | "
                     f"{_q(np.array(every[hop]), .99) * 1e3:.1f} |")
    return "\n".join(lines)


def knife_edge(world: World, record: RunRecord) -> str:
    """How close the requests' plans sit to their SLA, and what a little more latency does
    to the simulated attainment."""
    sla = np.array([world.types[int(k)].sla_s for k in record.type_index])
    share = idle_latency_s(world, record) / sla
    met = sla_met(world, record)
    longer = []
    for extra_s in LONGER_S:
        later = replace(record, finished_at_s=record.finished_at_s + extra_s)
        longer.append(f"+{extra_s:g} s: {sla_met(world, later).mean():.0%}")
    return (f"idle latency / SLA median {np.median(share):.2f}, p90 {np.quantile(share, .9):.2f}"
            f", {np.mean(share > 0.7):.0%} of requests above 0.7; simulated attainment "
            f"{met.mean():.0%}, with every request " + ", ".join(longer))


def misses_in_time(arrived_s: np.ndarray, missed: np.ndarray, bins: int = 10) -> str:
    """How the probe's misses spread over its arrivals: a count per tenth of its span (misses
    bunched in one tenth: a stall, not a steady excess)."""
    counts, _ = np.histogram(arrived_s[missed], bins=bins, range=(0.0, float(arrived_s.max())))
    return " ".join(str(int(c)) for c in counts)


def engine_line(pages: tuple[dict[str, float], dict[str, float]], record: RunRecord,
                 measured: Parts, visit_s: float) -> str:
    """The server's engine over the probe, measured (its /metrics before and after) beside
    simulated (the run's job log): steps, rows a step, seconds a step, queue wait a forward,
    and a forward's time beyond the link less its wait and its step (the server's event loop,
    both sides' transport work)."""
    before, after = pages

    def delta(name: str) -> float:
        return counter_delta(after, before, name)

    forwards = delta("splitllm_forwards_total")
    steps = delta("splitllm_engine_steps_total")
    step_s = delta("splitllm_engine_step_seconds_sum") / max(steps, 1)
    wait_s = (delta(QUEUE_WAIT + "_sum") / max(delta(QUEUE_WAIT + "_count"), 1))
    beyond_s = np.nansum(measured.server_s) / max(forwards, 1)
    done_at = np.array([done for *_, done in record.job_log])
    sim_steps = len(np.unique(done_at))
    sim_step_s = record.busy_total_s / max(sim_steps, 1)
    sim_beyond_s = float(np.mean([done - at for _, _, at, done in record.job_log])) + visit_s
    compute_cpu_s = delta("splitllm_server_cpu_seconds_total")
    wall_over_cpu = delta(BUSY) / compute_cpu_s if compute_cpu_s > 0 else math.nan
    return (f"engine (its compute's wall seconds x{wall_over_cpu:.3f} its CPU: above 1, its "
            f"core was shared), measured / simulated: {steps:.0f} / {sim_steps} steps, "
            f"{forwards / max(steps, 1):.2f} / {len(done_at) / max(sim_steps, 1):.2f} rows a "
            f"step, {step_s * 1e3:.1f} / {sim_step_s * 1e3:.1f} ms a step, queue wait "
            f"{wait_s * 1e3:.1f} / {record.job_delay_mean_s * 1e3:.1f} ms a forward; a forward "
            f"beyond the link {beyond_s * 1e3:.1f} / {sim_beyond_s * 1e3:.1f} ms, less its wait "
            f"and a step {(beyond_s - wait_s - step_s) * 1e3:.1f} / "
            f"{(sim_beyond_s - record.job_delay_mean_s - sim_step_s) * 1e3:.1f} ms")


@contextlib.contextmanager
def cores_logged(intervals: list[tuple[float, float, float]]) -> Iterator[None]:
    """Within: every stretch of the simulated clients' shared cores is logged (start s, end
    s, cores busy)."""
    progressed = SharedCores._progressed

    def logged(self: SharedCores, began_s: float, now_s: float, jobs: int) -> None:
        intervals.append((began_s, now_s, min(jobs, self.sharing.cores)))
        progressed(self, began_s, now_s, jobs)

    SharedCores._progressed = logged  # type: ignore[method-assign]
    try:
        yield
    finally:
        SharedCores._progressed = progressed  # type: ignore[method-assign]


@contextlib.contextmanager
def decisions_logged(loads: list[tuple[Load, bool]]) -> Iterator[None]:
    """Within: every plan a load-reading policy makes (`PlanPolicy.decide`), real or simulated,
    logs the load it read and whether it found a plan within the limits (else its rescue)."""
    decide = PlanPolicy.decide

    def logged(self: PlanPolicy, type_index: int, class_index: int, prompt: int, output: int,
               load: Load | None = None) -> Decision:
        decision = decide(self, type_index, class_index, prompt, output, load)
        if load is not None:
            loads.append((load, decision.planned))
        return decision

    PlanPolicy.decide = logged  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        PlanPolicy.decide = decide  # type: ignore[method-assign]


def loads_line(measured: Sequence[tuple[Load, bool]], simulated: Sequence[tuple[Load, bool]]
               ) -> str:
    """The loads a load-reading policy planned with, measured / simulated: p50 / p90 of the
    tuned headroom and the queue wait's mean and quantile, and the share of its plans that
    found none within the limits (its rescue)."""
    def side(loads: Sequence[tuple[Load, bool]]) -> str:
        if not loads:
            return "none"
        cols = np.array([(ld.tuned_headroom, ld.wait_mean_s * 1e3, ld.wait_quantile_s * 1e3)
                         for ld, _ in loads])
        q = np.percentile(cols, [50, 90], axis=0)
        rescued = 1 - float(np.mean([planned for _, planned in loads]))
        return (f"headroom {q[0, 0]:.2f} / {q[1, 0]:.2f}, wait mean {q[0, 1]:.0f} / "
                f"{q[1, 1]:.0f} ms, quantile {q[0, 2]:.0f} / {q[1, 2]:.0f} ms, "
                f"{rescued:.0%} rescued ({len(loads)} plans)")
    return (f"loads planned with (p50 / p90), measured: {side(measured)}; simulated: "
            f"{side(simulated)}")


def _binned(stretches: Sequence[tuple[float, float, float]], bins: int) -> np.ndarray:
    """Cores busy per `TIMELINE_S` bin from (start s, end s, cores) stretches."""
    busy = np.zeros(bins)
    for a, b, cores in stretches:
        for i in range(max(int(a // TIMELINE_S), 0), min(int(b // TIMELINE_S) + 1, bins)):
            overlap = min(b, (i + 1) * TIMELINE_S) - max(a, i * TIMELINE_S)
            busy[i] += max(overlap, 0.0) * cores / TIMELINE_S
    return busy


def timeline(timings: Timings, record: RunRecord, cores: list[tuple[float, float, float]]
             ) -> str:
    """The clients' core busy and the requests in flight every `TIMELINE_S` of the probe,
    measured (the clients' process's CPU, its worker threads running a request) beside
    simulated (the shared cores, the requests arrived and not finished)."""
    bins = int(np.nanmax(record.finished_at_s) // TIMELINE_S) + 1
    ends = (np.arange(bins) + 1) * TIMELINE_S
    finished = np.nan_to_num(record.finished_at_s, nan=np.inf)
    simulated = [int(((record.arrived_at_s <= t) & (finished > t)).sum()) for t in ends]
    stretches = [(w0 - timings.start_s, w1 - timings.start_s, busy)
                 for w0, w1, busy in timings.busy_stretches()]
    at = np.array([w - timings.start_s for w, _, _ in timings.samples])
    in_flight = [timings.samples[int(np.argmin(np.abs(at - t)))][2] for t in ends]

    def line(busy: np.ndarray, counts: list[int]) -> str:
        return " ".join(f"{c:.2f}/{n}" for c, n in zip(busy, counts, strict=True))

    return (f"clients' core busy / requests in flight every {TIMELINE_S:g} s, measured: "
            f"{line(_binned(stretches, bins), in_flight)}\n  simulated: "
            f"{line(_binned(cores, bins), simulated)}")


def steps_by_clients_busy(timings: Timings, entries: Sequence[dict[str, Any]],
                          model: StepModel) -> str:
    """The real steps' seconds over the step model's for their rows, grouped by how busy the
    clients' core was in the `TIMELINE_S` sample around each step's start (the model prices
    the server's slowdown while the clients compute by one calibrated factor)."""
    stretches = timings.busy_stretches()
    if not stretches:
        return "(no samples of the clients' core)"
    began = np.array([w0 for w0, _, _ in stretches])
    groups: dict[str, list[float]] = {"< 0.5": [0.0, 0.0], "0.5-0.95": [0.0, 0.0],
                                      ">= 0.95": [0.0, 0.0]}
    for start, real_s, priced_s in zip(*priced_steps(entries, model)[:3], strict=True):
        busy = stretches[int(np.clip(np.searchsorted(began, start) - 1, 0, len(began) - 1))][2]
        name = "< 0.5" if busy < 0.5 else "0.5-0.95" if busy < 0.95 else ">= 0.95"
        groups[name][0] += real_s
        groups[name][1] += priced_s
    return ("real steps over the step model by the clients' core busy: " + ", ".join(
        f"{name}: {real / priced:.2f} ({real:.2f} s)" for name, (real, priced) in groups.items()
        if priced > 0))


def report(world: World, policy: str, probe: Probe, timings: Timings,
           pages: tuple[dict[str, float], dict[str, float]],
           entries: Sequence[dict[str, Any]] = ()) -> tuple[str, dict[str, Any]]:
    """One probe measured beside its simulation at the probe's own speeds: the text, and the
    per-request parts of both sides; with the server's trace `entries`, each forward's hops."""
    factors = speed_factors(world, policy, probed([probe]))
    seen = as_probed(world, *factors).with_rate(probe.rate_per_s)
    cores: list[tuple[float, float, float]] = []
    simulated_loads: list[tuple[Load, bool]] = []
    with cores_logged(cores), decisions_logged(simulated_loads):
        record = run_policy(seen, policy, log=True)
    n = len(record.arrived_at_s)
    measured = measured_parts(timings, n)
    simulated = simulated_parts(seen, record)
    sla = np.array([world.types[int(k)].sla_s for k in record.type_index])
    measured_missed = ~(measured.latency_s <= sla)
    missed = measured_missed & sla_met(seen, record)
    picked_late_s = [timings.outcomes[r].started_late_s if r in timings.outcomes else math.nan
                     for r in range(n)]
    late = np.array([s for s in picked_late_s if not math.isnan(s)])
    m = probe.metrics
    raw = {"policy": policy, "rate_req_s": probe.rate_per_s, "factors": factors,
           "step_model": seen.server.step_model and seen.server.step_model.to_json(),
           "arrived_at_s": record.arrived_at_s.tolist(), "sla_s": sla.tolist(),
           "picked_late_s": picked_late_s,
           "idle_latency_s": idle_latency_s(seen, record).tolist(),
           "measured": {k: getattr(measured, k).tolist() for k in PARTS},
           "simulated": {k: getattr(simulated, k).tolist() for k in PARTS}}
    return (f"\n{policy} at {probe.rate_per_s:.3g} req/s: {m.sla_attainment:.0%} within SLA "
            f"measured, {sla_met(seen, record).mean():.0%} simulated (server x{factors[0]:.2f}, "
            f"clients' CPU x{factors[1]:.2f}); server busy {m.utilization:.0%}, its queue wait "
            f"{m.job_delay_mean_s * 1e3:.0f} ms a forward (simulated "
            f"{record.job_delay_mean_s * 1e3:.0f}); clients {probe.client_cores_busy:.2f} "
            f"cores; worker threads took requests {_q(late, .5) * 1e3:.0f} / "
            f"{_q(late, .9) * 1e3:.0f} ms late (median / p90)\n"
            + comparison(measured, simulated, missed) + "\n" + knife_edge(seen, record)
            + "\n" + engine_line(pages, record, measured, world.clients[0].link.visit_s)
            + "\nmissed measured, per tenth of the arrivals: "
            + misses_in_time(record.arrived_at_s, measured_missed)
            + "; simulated: " + misses_in_time(record.arrived_at_s, ~sla_met(seen, record))
            + "\n" + timeline(timings, record, cores)
            + ("\n" + loads_line(timings.loads, simulated_loads)
               if timings.loads or simulated_loads else "")
            + ("\n" + hops_table(timings, entries, missed) if entries else "")), raw


@contextlib.contextmanager
def server_setup(setup: str) -> Iterator[None]:
    """Within: the local server runs these Python statements first (`demo.start_server`)."""
    start = demo.start_server

    def started(model: str, port: int, log_path: Path, threads: int = 1) -> Any:
        return start(model, port, log_path, threads, setup=setup)

    demo.start_server = started  # type: ignore[assignment]
    try:
        yield
    finally:
        demo.start_server = start


def setup_line(switch_interval_ms: float | None, trace_out: Path | None,
               gc_log: Path | None) -> str:
    """The server child's first statements: its thread switch interval, the forwards' trace,
    its garbage collections' log."""
    line = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
    if switch_interval_ms is not None:
        line += f"sys.setswitchinterval({switch_interval_ms / 1e3!r}); "
    if trace_out is not None:
        line += f"import forward_trace; forward_trace.install({str(trace_out)!r}); "
    if gc_log is not None:
        line += f"import gc_pauses; gc_pauses.install({str(gc_log)!r}); "
    return line


def local_runner(stack: contextlib.ExitStack, loaded: LoadedModel, device_profile: str, *,
                 fleet: bool, scenario: str = "azure-conv", length_scale: float = 1 / 64
                 ) -> tuple[World, RealRunner]:
    """A local SmolLM2 server (closed with `stack`) and a runner of its load test as
    `splitllm loadtest` starts them (96 requests a probe), and the world calibrated on it (the
    clients' host too, unless `fleet`)."""
    spec = LoadtestSpec(requests=96, length_scale=length_scale, sla_factor=3.0)
    url = stack.enter_context(local_server("smollm2", 1))
    info = fetch_info(url, None)
    world, classes = loadtest_world(
        _scenario(scenario), config=loaded.model.config.to_dict(),
        context_tokens=context_tokens(loaded.model.config),
        this_machine=device_preset(device_profile),
        step=StepModel.from_json(info["step_model"]), spec=spec,
        visit_s=_visit_s(url, None, int(info["n_units"])))
    runner = RealRunner(loaded, world, classes, RunnerOptions(server=url, fleet=fleet))
    stack.callback(runner.close)
    world, rounds = calibrated(world, runner, url, None)
    if not fleet:
        world, _ = calibrated_host(world, runner, rounds, classes)
    return world, runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device-profile", required=True)
    parser.add_argument("--policies", default="greedy,exact")
    parser.add_argument("--rates", default="6.5,7.5")
    parser.add_argument("--scenario", default="azure-conv", help="as `splitllm loadtest`")
    parser.add_argument("--length-scale", type=float, default=1 / 64,
                        help="as `splitllm loadtest` (default 1/64)")
    parser.add_argument("--clients", choices=("here", "fleet"), default="here",
                        help="as `splitllm loadtest --clients`")
    parser.add_argument("--switch-intervals-ms", default="",
                        help="run every probe once at each of these Python thread switch "
                        "intervals of the clients' process (default: as it is, 5 ms)")
    parser.add_argument("--server-switch-interval-ms", type=float, default=None,
                        help="the server process's Python thread switch interval (default: "
                        "as it is, 5 ms)")
    parser.add_argument("--out", type=Path, help="write every probe's per-request parts here "
                        "(JSON)")
    parser.add_argument("--trace-out", type=Path, default=None,
                        help="time every forward inside the server (benchmarks/forward_trace.py) "
                        "into this file, and print each probe's parts")
    parser.add_argument("--gc-out", type=Path, default=None,
                        help="log every garbage collection of the clients' process and the "
                        "server's into this folder (benchmarks/gc_pauses.py), and print each "
                        "probe's")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    loaded = load_model("smollm2")
    with contextlib.ExitStack() as stack:
        if args.trace_out is not None:
            args.trace_out.unlink(missing_ok=True)
        gc_logs = None
        if args.gc_out is not None:
            args.gc_out.mkdir(parents=True, exist_ok=True)
            gc_logs = {side: args.gc_out / f"{name}.log"
                       for side, name in (("clients'", "clients"), ("server's", "server"))}
            for log in gc_logs.values():
                log.unlink(missing_ok=True)
            gc_pauses.install(str(gc_logs["clients'"]))
        stack.enter_context(server_setup(setup_line(
            args.server_switch_interval_ms, args.trace_out,
            None if gc_logs is None else gc_logs["server's"])))
        world, runner = local_runner(stack, loaded, args.device_profile,
                                     fleet=args.clients == "fleet", scenario=args.scenario,
                                     length_scale=args.length_scale)
        probes = []
        for policy in args.policies.split(","):
            intervals: list[float | None] = [float(i) for i in
                                             args.switch_intervals_ms.split(",") if i]
            for rate, interval_ms in product((float(r) for r in args.rates.split(",")),
                                             intervals or [None]):
                if interval_ms is not None:
                    sys.setswitchinterval(interval_ms / 1e3)
                    print(f"\nthe clients' process switches threads every {interval_ms:g} ms")
                timings = Timings()
                before = runner.metrics()
                traced = (args.trace_out.stat().st_size  # the server is idle between probes
                          if args.trace_out is not None and args.trace_out.exists() else 0)
                start = time.time()
                with instrumented(runner, timings):
                    probe = runner.probe(policy, rate)
                end = time.time()
                entries = []
                if args.trace_out is not None:
                    time.sleep(0.5)  # the server appends a forward's line after its reply
                    entries = lines_from(args.trace_out, traced)
                text, raw = report(world, policy, probe, timings, (before, runner.metrics()),
                                   entries)
                print(text, flush=True)
                if gc_logs is not None:
                    time.sleep(gc_pauses.FLUSH_S * 1.5)  # the logs flushed past the probe's end
                    for side, log in gc_logs.items():
                        print(f"garbage collections in the {side} process during the probe: "
                              + gc_pauses.pauses_line(log, start, end), flush=True)
                if entries:
                    print(parts_table(entries), flush=True)
                    if raw["step_model"] is not None:  # the steps' own part of its job_s
                        model = StepModel.from_json(raw["step_model"])
                        outside_s = np.nan_to_num(probe.server_job_s)  # its CPU outside them
                        model = replace(model, job_s=max(model.job_s - outside_s, 0.0))
                        print(steps_table(entries, model), flush=True)
                        print(steps_by_clients_busy(timings, entries, model), flush=True)
                probes.append(raw)
                if args.out is not None:
                    args.out.write_text(json.dumps(probes))


if __name__ == "__main__":
    main()
