"""The load test's report: measured and simulated capacity side by side, what was emulated,
and whether splitting paid (report.md, results.json, the `--json` document)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from splitllm.runtime.loadtest import FOREIGN_CORES, PolicyResult, Probe
from splitllm.runtime.loadtest_world import EmulatedClass
from splitllm.sim.capacity import Bracket
from splitllm.sim.metrics import RunMetrics
from splitllm.sim.world import World

SERVER_ONLY = "server-only"
CAPACITY_TARGET = 0.15  # the simulated capacity should be within 15% of the measured one


def _num(value: float) -> float | None:
    """JSON has no inf or nan."""
    return float(value) if math.isfinite(value) else None


def _rel_err(simulated: float, measured: float) -> float:
    if measured > 0 and math.isfinite(simulated):
        return (simulated - measured) / measured
    return math.nan


def _pct(err: float | None) -> str:
    return "n/a" if err is None else f"{err:+.0%}"


def _bracket(b: Bracket) -> str:
    """A search's last bracket, good rate (attainment) to bad rate (attainment)."""
    if not 0 < b.good_per_s < b.bad_per_s < math.inf:
        return ""
    return (f"[{b.good_per_s:.3g} ({b.good_attainment:.0%}) - {b.bad_per_s:.3g} "
            f"({b.bad_attainment:.0%})]")


def _lost(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%} lost"


def _metrics_json(m: RunMetrics) -> dict[str, Any]:
    return {"rate_req_s": m.rate_per_s, "requests": m.requests, "completed": m.completed,
            "attainment": _num(m.sla_attainment), "throughput_req_s": m.throughput_per_s,
            "goodput_req_s": m.goodput_per_s,
            **{f"{name}_p{q}_s": _num(v) for name, values in
               (("ttft", m.ttft_s), ("tpot", m.tpot_s), ("latency", m.latency_s))
               for q, v in zip((50, 90, 99), values, strict=True)},
            "server_s_per_request": m.server_s_per_request, "utilization": m.utilization,
            "client_unit_share": m.client_unit_share, "queue_wait_mean_s": m.job_delay_mean_s,
            "fallback_share": m.fallback_share}


def _probe_json(p: Probe) -> dict[str, Any]:
    return {**_metrics_json(p.metrics), "wall_s": p.wall_s, "stopped_early": p.stopped_early,
            "server_process_cpu_s_per_request": _num(p.process_cpu_s_per_request),
            "server_job_s": _num(p.server_job_s), "client_cores_busy": _num(p.client_cores_busy),
            "server_wall_s_per_request": _num(p.server_wall_s_per_request),
            "server_visits_per_request": _num(p.server_visits_per_request),
            "foreign_cores": _num(p.foreign_cores),
            "started_late_p90_s": _num(p.started_late_p90_s), "repeated": p.repeated}


def policy_json(r: PolicyResult) -> dict[str, Any]:
    """One policy's entry of `--json` and results.json."""
    at = r.at_capacity
    m = at.metrics if at is not None else None
    return {
        "capacity_req_s": r.measured_per_s,
        "bracket": r.measured.bracket.to_json(),
        "lowest_failed_req_s": _num(r.measured.lowest_failed_per_s),
        "search_cut_short": r.measured.cut_short,
        "attainment": _num(r.measured.attainment) if m else None,  # its probes pooled
        "goodput_req_s": m.goodput_per_s if m else None,
        "throughput_req_s": m.throughput_per_s if m else None,
        "ttft_p50_s": _num(m.ttft_s[0]) if m else None,
        "ttft_p90_s": _num(m.ttft_s[1]) if m else None,
        "ttft_p99_s": _num(m.ttft_s[2]) if m else None,
        "tpot_p50_s": _num(m.tpot_s[0]) if m else None,
        "tpot_p90_s": _num(m.tpot_s[1]) if m else None,
        "tpot_p99_s": _num(m.tpot_s[2]) if m else None,
        "server_cpu_s_per_request": _num(at.process_cpu_s_per_request) if at else None,
        "simulated_capacity_req_s": _num(r.simulated_per_s),
        "simulated_bracket": r.simulated.bracket.to_json(),
        "simulated_on": "its probes' speeds" if r.simulated_on_probes else "start-of-run",
        "server_speed_factor": _num(r.server_factor),
        "client_cpu_factor": _num(r.client_factor),
        "simulated_search_cut_short": r.simulated.cut_short,
        "capacity_rel_err": _num(_rel_err(r.simulated_per_s, r.measured_per_s)),
        "simulated_start_capacity_req_s": _num(r.simulated_start.crossing_per_s),
        "start_capacity_rel_err": _num(_rel_err(r.simulated_start.crossing_per_s,
                                                r.measured_per_s)),
        "simulated_fleet_capacity_req_s": _num(r.simulated_fleet_per_s),
        "simulated_unslowed_capacity_req_s": _num(r.simulated_unslowed_per_s),
        "colocation_cost": _num(colocation_cost(r)),
        "simulated_at_capacity": (_metrics_json(r.simulated_at_capacity)
                                  if r.simulated_at_capacity else None),
        "probe_attainment_err": _errors_json(r.probe_errors()),
        "probe_verdicts": _verdicts_json(r.probe_verdicts()),
        "probes": [{**_probe_json(p),
                    "simulated_attainment": _num(sim.sla_attainment) if sim else None,
                    "simulated_fallback_share": _num(sim.fallback_share) if sim else None}
                   for p, sim in zip(r.measured.probes, r.probes_simulated, strict=True)],
    }


def _verdicts_json(verdicts: Sequence[tuple[float, bool, bool]]) -> dict[str, Any] | None:
    """How many probes' verdicts (target met or not) the simulation shares, and the rates of
    those it does not: where the simulated passed and the measured failed, and the reverse."""
    if not verdicts:
        return None
    return {"agree": sum(m == s for _, m, s in verdicts), "probes": len(verdicts),
            "only_simulated_passed_req_s": [r for r, m, s in verdicts if s and not m],
            "only_measured_passed_req_s": [r for r, m, s in verdicts if m and not s]}


def _errors_json(errors: Sequence[float]) -> dict[str, Any] | None:
    """Simulated minus measured attainment over probes: median, largest in size, count."""
    if not errors:
        return None
    return {"median": statistics.median(errors), "max_abs": max(abs(e) for e in errors),
            "probes": len(errors)}


def colocation_cost(r: PolicyResult) -> float:
    """The share of a fleet's simulated capacity lost by clients that share one machine (as
    the load test's EMULATED clients do), both on the start-of-run model: 1 - co-located /
    fleet (nan: not simulated)."""
    fleet, here = r.simulated_fleet_per_s, r.simulated_start.crossing_per_s
    if math.isfinite(fleet) and fleet > 0 and math.isfinite(here):
        return 1.0 - here / fleet
    return math.nan


def verdict(results: list[PolicyResult], classes: tuple[EmulatedClass, ...] = ()) -> str:
    """One paragraph: the best splitting policy's measured capacity against server-only, why
    (`classes`: the emulated clients, whose slowness is one reason)."""
    by_name = {r.policy: r for r in results}
    base = by_name.get(SERVER_ONLY)
    splits = [r for r in results if r.policy != SERVER_ONLY]
    if base is None or not splits:
        return "No comparison with server-only (both it and a splitting policy must run)."
    best = max(splits, key=lambda r: r.measured_per_s)
    ours, theirs = best.measured_per_s, base.measured_per_s
    ratio = f"{ours / theirs:.2f}x" if theirs > 0 else "n/a"
    head = (f"The best splitting policy, `{best.policy}`, measured {ours:.3g} req/s against "
            f"server-only's {theirs:.3g} req/s ({ratio}).")
    if ours >= theirs:
        return head + " Splitting did not lose capacity."
    b, s = best.at_capacity, base.at_capacity
    reasons = []
    if b is not None and s is not None:
        cpu_b, cpu_s = b.process_cpu_s_per_request, s.process_cpu_s_per_request
        share = b.metrics.client_unit_share
        if share < 0.02:
            reasons.append(f"its plans left almost every unit on the server ({share:.1%} of "
                           "units on the clients), so there was little work to take off it")
        if math.isfinite(cpu_b) and math.isfinite(cpu_s) and cpu_b >= cpu_s:
            reasons.append(f"it did not save server CPU: {cpu_b:.3g} s per request against "
                           f"{cpu_s:.3g} s (each visit to the server costs a message's fixed "
                           "overhead, and batched steps share weight reads among requests)")
        elif math.isfinite(cpu_b) and math.isfinite(cpu_s):
            reasons.append(f"it saved only {1 - cpu_b / cpu_s:.0%} of the server's CPU per "
                           f"request ({cpu_b:.3g} s against {cpu_s:.3g} s at their capacities)")
        if classes and share >= 0.02:
            slow = sorted(e.slowdown for e in classes)
            reasons.append(f"the clients are EMULATED {slow[0]:.3g}-{slow[-1]:.3g}x slower "
                           "than this server, so a unit moved to one costs that many times its "
                           "server time in latency: the SLA's slack paid for "
                           f"{share:.0%} of the units on the clients")
        if b.metrics.ttft_s[2] > s.metrics.ttft_s[2]:
            reasons.append(f"its requests were slower (TTFT p99 {b.metrics.ttft_s[2]:.3g} s "
                           f"against {s.metrics.ttft_s[2]:.3g} s): the clients' units and the "
                           "link's round trips spend the SLA that queueing needs")
    if not reasons:
        reasons.append("the probes' noise on a shared machine is as large as the difference")
    return head + " **Splitting is below server-only here**: " + "; ".join(reasons) + "."


def budget_note(results: list[PolicyResult]) -> str:
    """Which searches the time budget (--max-minutes) ended early, or that none was."""
    cut = []
    for r in results:
        kinds = [kind for kind, on in (("measured", r.measured.cut_short),
                                       ("simulated", r.simulated.cut_short)) if on]
        if kinds:
            cut.append(f"`{r.policy}` ({', '.join(kinds)})")
    if not cut:
        return "Every search ended within the time budget (--max-minutes).\n"
    return ("**The time budget (--max-minutes) ended these searches early**: " + ", ".join(cut)
            + "; their capacities are the best rates found before it, brackets wider than "
            "--rel-tol.\n")


def disturbance_note(results: list[PolicyResult]) -> str:
    """How much other work on this machine took during the probes, and which it disturbed."""
    probes = [p for r in results for p in r.measured.probes]
    known = [p.foreign_cores for p in probes if not math.isnan(p.foreign_cores)]
    if not known:
        return "Other work on this machine during the probes: not known (no /proc/stat).\n"
    text = (f"Other work on this machine took at most {max(known):.2f} cores during a probe "
            f"(its CPU less this load test's own processes'); ")
    disturbed = [p for p in probes if p.disturbed]
    if not disturbed:
        return text + f"no probe was disturbed (> {FOREIGN_CORES:g} cores).\n"
    repeated = sum(p.repeated for p in disturbed)
    return (text + f"**{len(disturbed)} probe(s) disturbed** (> {FOREIGN_CORES:g} cores): "
            f"{repeated} that did not pass were run again (they count for nothing), "
            f"{len(disturbed) - repeated} count as measured.\n")


def header_text(world: World, classes: tuple[EmulatedClass, ...], *, scenario: str,
                length_scale: float, model: str, where: str, fleet: bool = False) -> str:
    """What ran, and what was EMULATED, for the top of every report (`fleet`: the clients'
    units only timed, `--clients fleet`)."""
    lines = [f"Scenario `{scenario}` on model {model}, {where}. Each probe replays the "
             f"scenario's first {world.sweep.min_requests} requests (seeded; the same requests "
             "in every probe and in the simulator), its time axis scaled to the probe's rate, "
             f"in a loop until arrivals span {world.duration_s:.3g} s (3 x the longest SLA) "
             "and all of them have arrived; a probe whose attainment is within the noise of "
             "its requests (one binomial standard error) is repeated and judged pooled. "
             f"Token counts are scaled by {length_scale:g} (the served model's context and this "
             "CPU's speed; at least 1 token each). SLA per request type: "
             + ", ".join(f"{t.name} {t.sla_s:.3g} s" for t in world.types)
             + f"; goodput capacity: the highest rate with >= "
             f"{world.sweep.target_attainment:.0%} of requests within it.", "",
             "EMULATED per client class (links: delay and bandwidth shaping in the client's "
             "transport; devices: this machine's profile slowed by the scenario's client/server "
             "speed ratio on the served model, and the client's units "
             + ("are NOT computed (`--clients fleet`): each pass sleeps what that profile says "
                "and sends stand-ins of the right shape (the tokens' embeddings; token 0 where "
                "a client holds the head), so the server does the work a fleet of real devices "
                "would give it, but the tokens are not the model's"
                if fleet else "are computed for real and take what that profile says")
             + ": the planner's own client time):", ""]
    for e in classes:
        lines.append(f"- {e.name}: link {e.link.name} (rtt {e.link.rtt_s * 1e3:.3g} ms, up "
                     f"{e.link.uplink_bytes_per_s * 8e-6:.3g} Mbit/s, down "
                     f"{e.link.downlink_bytes_per_s * 8e-6:.3g} Mbit/s), device "
                     f"{e.scenario_device} as this machine x{e.slowdown:.3g} slower")
    lines += ["", "Every client runs in this one process (threads, one connection each), "
              "pinned apart from a local server where the OS allows"
              + ("; their transport shares the client's cores. " if fleet else
                 "; their compute shares the client's cores. ") + _host_text(world)
              + " The simulator's prediction: "
              "the same world, batched server "
              "with the step model the server announced (/v1/info: refitted on its engine's "
              "steps) after three rounds of the idle check's requests at the run's start (where "
              "each search starts), and again at the speeds each policy's probes measured "
              "(the machine's other load and the clients' real compute, which shares its "
              "memory, move them between minutes). A visit "
              "to the "
              f"server costs {world.clients[0].link.visit_s * 1e3:.3g} ms beyond its round trip "
              "(measured on the idle server at start; the planner and the simulator charge it "
              f"per pass and visit). The server spends {_job_s(world) * 1e3:.3g} ms per forward "
              "beyond its units: a visit's fixed part of its engine steps (the step model's "
              "own, fitted live) and its CPU outside them (framing, sampling, hand-offs, "
              "sessions opened and closed; the median of those rounds: the process's CPU less "
              "the steps'; under load, over each policy's probes), "
              "which the simulator charges per job beside each step and both planners per "
              "visit and pass."]
    return "\n".join(lines)


def report_md(results: list[PolicyResult], header: str, idle: str = "",
              classes: tuple[EmulatedClass, ...] = (), fleet: bool = False) -> str:
    """The whole report: the verdict first, what ran, the idle check, the capacities
    (`fleet`: the clients' units only timed, each client its own device)."""
    clients = ("each EMULATED client its own device (`--clients fleet`: the units only timed)"
               if fleet else
               "its EMULATED clients sharing this machine's client cores (their real CPU "
               "there, the server slowed while those compute)")
    lines = ["# Load test: measured against simulated goodput capacity\n",
             verdict(results, classes), "",
             header, "", idle, "## Goodput capacity per policy", "",
             "Every capacity, measured and simulated, is the rate where the attainment crosses "
             "the target, interpolated within its search's last bracket (the highest rate "
             "that met it and the lowest above it that did not; geometric in rate, linear in "
             f"attainment). Simulated: the prediction for the world measured here, {clients}, "
             "at the speeds the policy's probes that ran "
             "to their end measured: the start-of-run step model times the median ratio of "
             "the server's seconds per request (its share of the steps' wall seconds and its "
             "forwards' CPU outside them, as the simulator charges them) measured to "
             "simulated at the probes' rates with each probe's placements replayed (the same "
             "work), "
             "and the clients' CPU times the same ratio of the client process's CPU (this "
             "machine's other load moves both between minutes; a profile of the machine, not "
             "its capacity). On the start-of-run model: the same world as calibrated before "
             "the search (where it started). Fleet: that with every client its own device (a "
             "real fleet; what the co-location costs).", "",
             "| policy | capacity measured (req/s) [bracket] | simulated [bracket] | sim error | "
             "on the start-of-run model (error) | fleet (co-location's cost) | "
             "shared cores, server not slowed | "
             "attainment | goodput (req/s) | TTFT p50 / p90 / p99 (s) | "
             "TPOT p50 / p90 / p99 (s) | server CPU s / request | probes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        j = policy_json(r)
        cut = " (cut short)" if r.measured.cut_short else ""
        sim_cut = " (cut short)" if r.simulated.cut_short else ""
        ttft = " / ".join(f"{j[f'ttft_p{q}_s'] or math.nan:.3g}" for q in (50, 90, 99))
        tpot = " / ".join(f"{j[f'tpot_p{q}_s'] or math.nan:.3g}" for q in (50, 90, 99))
        lines.append(
            f"| {r.policy} | {r.measured_per_s:.3g} {_bracket(r.measured.bracket)}{cut} | "
            f"{r.simulated_per_s:.3g} {_bracket(r.simulated.bracket)}{sim_cut} | "
            f"{_pct(j['capacity_rel_err'])} | {r.simulated_start.crossing_per_s:.3g} "
            f"({_pct(j['start_capacity_rel_err'])}) | "
            f"{r.simulated_fleet_per_s:.3g} ({_lost(j['colocation_cost'])}) | "
            f"{r.simulated_unslowed_per_s:.3g} | "
            f"{j['attainment'] or 0:.0%} | {j['goodput_req_s'] or 0:.3g} | {ttft} | {tpot} | "
            f"{j['server_cpu_s_per_request'] or math.nan:.3g} | {len(r.measured.probes)} |")
    lines += ["", budget_note(results), disturbance_note(results),
              f"Simulated capacity within {CAPACITY_TARGET:.0%} of measured: "
              + _target_verdict(results, lambda r: r.simulated_per_s) + " at the probes' "
              "speeds (read after the probes); "
              + _target_verdict(results, lambda r: r.simulated_start.crossing_per_s)
              + " on the start-of-run model (a prediction before any probe).",
              "", _probes_note(results),
              "", "Every probe (measured; simulated: the same requests at its rate, at the "
              "probes' speeds):", "",
              "| policy | rate (req/s) | within SLA | simulated | no plan within SLA "
              "(simulated) | done | TTFT p99 (s) | server busy | server CPU s / req | "
              "EMULATED clients' cores busy | started late p90 (ms) | other work (cores) | "
              "wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for p, sim in zip(r.measured.probes, r.probes_simulated, strict=True):
            m = p.metrics
            lines.append(f"| {r.policy} | {m.rate_per_s:.3g} | {m.sla_attainment:.0%}"
                         f"{' (stopped early)' if p.stopped_early else ''} | "
                         f"{'-' if sim is None else f'{sim.sla_attainment:.0%}'} | "
                         f"{m.fallback_share:.0%}"
                         f"{'' if sim is None else f' ({sim.fallback_share:.0%})'} | "
                         f"{m.completed}/{m.requests} | {m.ttft_s[2]:.3g} | "
                         f"{m.utilization:.0%} | {p.process_cpu_s_per_request:.3g} | "
                         f"{p.client_cores_busy:.2f} | {p.started_late_p90_s * 1e3:.0f} | "
                         f"{p.foreign_cores:.2f}"
                         f"{' (run again)' if p.repeated else ''} | {p.wall_s:.0f} |")
    return "\n".join(lines) + "\n"


def _probes_note(results: Sequence[PolicyResult]) -> str:
    """Per policy, the simulation at the rates its probes ran: do the verdicts agree, and by
    how much the attainments differ."""
    parts = []
    for r in results:
        v = _verdicts_json(r.probe_verdicts())
        if v is None:
            continue
        part = f"{r.policy}: the verdicts agree at {v['agree']} of {v['probes']} probes"
        for key, which in (("only_simulated_passed_req_s", "only the simulated passed"),
                           ("only_measured_passed_req_s", "only the measured passed")):
            if v[key]:
                part += f" ({which} at {', '.join(f'{x:.3g}' for x in v[key])} req/s)"
        e = _errors_json(r.probe_errors())
        if e is not None:
            part += (f"; simulated minus measured attainment where both ran to their end, "
                     f"median {100 * e['median']:+.0f} points, largest "
                     f"{100 * e['max_abs']:.0f} ({e['probes']} probes)")
        parts.append(part)
    if not parts:
        return "No probe was simulated at its rate."
    return ("At each probe's rate (its requests), simulated against measured, the verdict "
            f"(>= {results[0].measured.target:.0%} within SLA; a probe stopped early failed) "
            "and the attainment: " + "; ".join(parts) + ". Where the attainment changes "
            "slowly with the rate, a few points of it move the capacity's crossing far.")


def _target_verdict(results: Sequence[PolicyResult],
                    simulated: Callable[[PolicyResult], float]) -> str:
    """'met' or 'missed' for the capacity target, with the worst error."""
    errors = [abs(e) for r in results
              if (e := _rel_err(simulated(r), r.measured_per_s)) == e]
    if not errors:
        return "no capacity measured"
    return f"{'met' if max(errors) <= CAPACITY_TARGET else '**missed**'} (worst {max(errors):.0%})"


def _host_text(world: World) -> str:
    """What the simulated world knows of the clients' shared machine."""
    host = world.client_host
    if host is None:
        return "The simulated world gives each client its own device."
    per_class = ", ".join(f"{c.name} {f * 1e3:.3g} ms" for c, f in
                          zip(world.clients, host.cpu_per_client_s, strict=True))
    return (f"The simulated world shares them too: {host.cores:g} processor-shared core(s), "
            f"each client pass's real CPU there (per second of its emulated time: {per_class}; "
            f"{host.cpu_per_visit_s * 1e3:.3g} ms per visit; fitted on the calibration's "
            "requests alone and in batches at once), a pass lasting its emulated time or, if "
            "longer, until its CPU is done; while a policy that reads the server's load runs, "
            f"{host.cpu_per_poll_s * 1e3:.3g} ms of CPU there every {host.poll_s:g} s (one "
            "read, timed at the start) until its last request is done; "
            f"and the server's steps x{host.server_slowdown:.3g} while those cores are all "
            "busy computing units (timed on server-only's idle-check requests with the "
            "clients' cores running the split plans' client units, in pairs at the start and "
            "before each policy, pooled), in proportion between, "
            "and a pass's units that start while the server computes x that CPU alike.")


def _job_s(world: World) -> float:
    step = world.server.step_model
    return step.job_s if step is not None else 0.0


def study_json(results: list[PolicyResult], world: World, classes: tuple[EmulatedClass, ...],
               *, scenario: str, length_scale: float, idle: list[dict[str, Any]] | None = None,
               client_host: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `--json` document (results.json holds the same)."""
    return {"policies": {r.policy: policy_json(r) for r in results}, "idle": idle or [],
            "client_host": client_host,
            "scenario": scenario, "length_scale": length_scale,
            "requests_per_probe": world.sweep.min_requests,
            "sla_s": {t.name: t.sla_s for t in world.types},
            "visit_s": world.clients[0].link.visit_s, "server_job_s": _job_s(world),
            "step_model": (world.server.step_model.to_json()
                           if world.server.step_model is not None else None),
            "emulated": [{**asdict(e), "link": asdict(e.link)} for e in classes],
            "verdict": verdict(results, classes)}


def write_report(out: Path, markdown: str, document: dict[str, Any]) -> None:
    """report.md and results.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    (out / "results.json").write_text(json.dumps(document, indent=1) + "\n")
