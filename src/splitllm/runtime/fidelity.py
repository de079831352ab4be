"""Predicted against measured: the planner's promise for a placement beside what the runtime did.

A grid of points (emulated condition x prompt/output length x placement) runs through a `Bench`:
it gives the planner's instances for a request (the whole generation, and its first token
alone) and measures generations with a fixed placement in rounds. The arithmetic here
(predictions from instances, relative errors, their summary, a split's saving and its interval,
which splits get more rounds) is pure, so it is tested on a fake bench whose times are known.
"""

from __future__ import annotations

import itertools
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from splitllm.placement import CLIENT, SERVER, Placement
from splitllm.planner.instance import Instance, evaluate
from splitllm.planner.network import Link, carried_bytes, crossing_s
from splitllm.runtime.autoplace import MEASURED
from splitllm.runtime.wire_bytes import NO_SESSION, SessionBytes, session_bytes

if TYPE_CHECKING:
    from splitllm.runtime.client import Session

METRICS = ("ttft_s", "tpot_s", "e2e_s", "server_cpu_s", "wire_bytes", "server_busy_s")
PLACEMENT_KINDS = ("server-only", "best-single-cut", "exact", "multi-switch")
SAVING_CONFIDENCE = 0.95
TARGET_SAVING_POINTS = 3.0  # a split's measured saving within this of its plan
VERDICTS = ("within", "missed", "undecided")  # what a saving's interval says (`Saving.verdict`)


@dataclass(frozen=True, kw_only=True)
class Rounds:
    """How many paired rounds a point gets: `first` of every placement, then rounds of
    server-only and the splits whose saving's interval is still wider than
    `half_width_points` (each stops once it is not), up to `most` in all (the defaults and why:
    `splitllm fidelity --help`, README)."""

    first: int
    most: int
    half_width_points: float


@dataclass(frozen=True)
class Saving:
    """A split's server-work saving: the mean of its rounds' paired savings and the half-width
    of its Student t interval (SAVING_CONFIDENCE; inf with fewer than two rounds)."""

    estimate: float
    half_width: float
    rounds: int

    def verdict(self, planned: float) -> str:
        """Whether the interval excludes a miss of the target ('within'), excludes meeting it
        ('missed'), or neither ('undecided')."""
        target, gap = TARGET_SAVING_POINTS / 100, self.estimate - planned
        low, high = gap - self.half_width, gap + self.half_width
        if -target < low and high < target:
            return "within"
        if high < -target or low > target:
            return "missed"
        return "undecided"


@dataclass(frozen=True)
class Figures:
    """What one generation costs, predicted or measured."""

    ttft_s: float
    tpot_s: float
    e2e_s: float
    server_cpu_s: float  # CPU seconds of the server's compute (robust to other load)
    wire_bytes: float
    server_busy_s: float  # wall seconds of the server's compute (what the profile times)


@dataclass(frozen=True)
class Condition:
    """What is emulated at a point: the link shaping (None: the real loopback) and slowdown."""

    link: str | None = None
    client_slowdown: float = 1.0

    @property
    def label(self) -> str:
        link = f"EMULATED {self.link}" if self.link else "loopback"
        slow = f", EMULATED client x{self.client_slowdown:g}" if self.client_slowdown > 1 else ""
        return link + slow


@dataclass(frozen=True)
class Point:
    """One measured placement of one request under one condition."""

    condition: Condition
    prompt_tokens: int
    new_tokens: int
    kinds: tuple[str, ...]  # which planner choices this placement is (e.g. exact and best cut)
    placement: str
    sla_s: float


@dataclass(frozen=True)
class Result:
    """A point with the planner's prediction and the runtime's measurement: every round's
    figures (in round order) and their medians."""

    point: Point
    predicted: Figures
    runs: tuple[Figures, ...]

    @property
    def measured(self) -> Figures:
        """Each metric's median over the rounds."""
        return median_figures(self.runs)

    def rel_err(self, metric: str) -> float:
        """(predicted - measured) / measured for one metric."""
        return rel_err(getattr(self.predicted, metric), getattr(self.measured, metric))


class Bench(Protocol):
    """A runtime the grid measures: the planner's view of a request and a real generation."""

    def instances(self, condition: Condition, prompt_tokens: int, new_tokens: int
                  ) -> tuple[Instance, Instance]:
        """(the whole generation, its first token alone), both without an SLA."""

    def session_bytes(self, condition: Condition, prompt_tokens: int, new_tokens: int,
                      placement: str) -> SessionBytes:
        """The messages that open and close the server's session for this placement."""

    def measure(self, condition: Condition, prompt_tokens: int, new_tokens: int,
                placements: Sequence[str], rounds: int) -> dict[str, list[Figures]]:
        """Generations of exactly new_tokens tokens with each placement in rounds (every
        placement once per round, so that a slow minute falls on all of them alike): per
        placement, its figures in round order."""


def rel_err(predicted: float, measured: float) -> float:
    """Relative error of a prediction; 0 when both are 0, inf when only the measurement is."""
    if measured == 0:
        return 0.0 if predicted == 0 else math.inf
    return (predicted - measured) / measured


def wire_bytes(instance: Instance, placement: Placement) -> float:
    """Bytes a placement sends over the wire in the whole request (both directions)."""
    carried = carried_bytes(instance.input_bytes, [u.out_bytes for u in instance.units],
                            instance.output_bytes)  # [L + 1]
    on_server = [side == SERVER for side in placement.sides]
    sides = np.array([False, *on_server, False])  # [L + 2]: starts and ends on the client
    return float(carried[sides[:-1] != sides[1:]].sum())


def close_s(link: Link, session: SessionBytes) -> float:
    """Seconds of the round trip that closes the server's session (a visit): the generation
    ends after it. Its opening is the instance's (`Instance.session_open_s`, in every plan)."""
    if session.total == 0:
        return 0.0
    return float(crossing_s(link, True, float(session.close_up))
                 + crossing_s(link, False, float(session.close_down)))


def predict(whole: Instance, first: Instance, placement: Placement, new_tokens: int,
            session: SessionBytes = NO_SESSION) -> Figures:
    """The planner's figures for a placement: first token from `first`, the rest from `whole`
    (both open the session, as every plan that visits the server does); the session's closing
    (`session`, once per generation) after its last pass. The server's busy seconds are its
    units' and, per visit and pass, the fixed part of its steps (`whole.job_s`), which the
    engine's busy seconds hold as its CPU seconds hold `job_work_s`."""
    plan = evaluate(whole, placement)
    ttft_s = evaluate(first, placement).latency_s
    e2e_s = plan.latency_s + close_s(whole.link, session)
    tpot_s = (e2e_s - ttft_s) / (new_tokens - 1) if new_tokens > 1 else 0.0
    return Figures(ttft_s=ttft_s, tpot_s=tpot_s, e2e_s=e2e_s,
                   server_cpu_s=plan.server_work,
                   wire_bytes=wire_bytes(whole, placement) + session.total,
                   server_busy_s=plan.server_compute_s
                   + placement.server_visits * whole.passes * whole.job_s)


def promised(session: Session, placement: Placement, prompt_tokens: int, new_tokens: int, *,
             whole: Instance | None = None, client_device: str = MEASURED,
             server_device: str | None = None) -> Figures:
    """What a placement promises for a generation of exactly new_tokens tokens on this
    session: its passes from the planner's instance (`whole`, else this request's), the first
    token from the instance of one token (each opens the server's session), and its closing."""
    if whole is None:
        whole, _ = session.instance(prompt_tokens, new_tokens, client_device, server_device)
    first, _ = session.instance(prompt_tokens, 1, client_device, server_device)
    opened = session_bytes(placement, session.stack.names, wire_dtype=session.wire_dtype,
                           prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    return predict(whole, first, placement, new_tokens, opened)


def multi_switch(n_units: int) -> Placement:
    """A fixed plan with four switches: C | S first half of the blocks | C | S | C head."""
    blocks = n_units - 2
    half, three_quarters = blocks // 2, (3 * blocks) // 4
    sides = [CLIENT] + [SERVER if b < half or b >= three_quarters else CLIENT
                        for b in range(blocks)] + [CLIENT]
    return Placement("".join(sides))


def grid_placements(instance: Instance, sla_s: float) -> dict[str, tuple[str, ...]]:
    """Placement -> the planner choices it stands for (server-only, best cut, exact, multi)."""
    from splitllm.planner.solvers import solve

    n = len(instance)
    constrained = _with_sla(instance, sla_s)
    chosen = {"server-only": Placement(SERVER * n), "multi-switch": multi_switch(n)}
    for solver in ("best-single-cut", "exact"):
        plan = solve(constrained, solver=solver)
        if plan is not None:
            chosen[solver] = plan.placement
    kinds: dict[str, tuple[str, ...]] = {}
    for kind in PLACEMENT_KINDS:
        if kind in chosen:
            key = str(chosen[kind])
            kinds[key] = (*kinds.get(key, ()), kind)
    return kinds


def _with_sla(instance: Instance, sla_s: float) -> Instance:
    from dataclasses import replace

    return replace(instance, sla_s=sla_s)


def median_figures(runs: Sequence[Figures]) -> Figures:
    """Each metric's median over repeated runs (robust to a run disturbed by other load)."""
    return Figures(**{metric: statistics.median(getattr(run, metric) for run in runs)
                      for metric in METRICS})


def run_grid(bench: Bench, *, conditions: Sequence[Condition],
             lengths: Sequence[tuple[int, int]], sla_factor: float,
             rounds: Rounds) -> list[Result]:
    """Every condition x (prompt, output) length x grid placement: predicted and measured.

    The SLA of a point is sla_factor times the faster uniform placement's predicted latency,
    so that the exact plan has room to move units to the client.
    """
    from splitllm.runtime.autoplace import fastest_uniform_s

    results = []
    for condition in conditions:
        for prompt_tokens, new_tokens in lengths:
            whole, first = bench.instances(condition, prompt_tokens, new_tokens)
            sla_s = sla_factor * fastest_uniform_s(whole)
            placements = grid_placements(whole, sla_s)
            measured = measure_point(bench, condition, prompt_tokens=prompt_tokens,
                                     new_tokens=new_tokens, placements=list(placements),
                                     rounds=rounds)
            for placement, kinds in placements.items():
                point = Point(condition=condition, prompt_tokens=prompt_tokens,
                              new_tokens=new_tokens, kinds=kinds, placement=placement,
                              sla_s=sla_s)
                session = bench.session_bytes(condition, prompt_tokens, new_tokens, placement)
                predicted = predict(whole, first, Placement(placement), new_tokens, session)
                results.append(Result(point=point, predicted=predicted,
                                      runs=tuple(measured[placement])))
    return results


def measure_point(bench: Bench, condition: Condition, *, prompt_tokens: int, new_tokens: int,
                  placements: Sequence[str], rounds: Rounds) -> dict[str, list[Figures]]:
    """`rounds.first` rounds of every placement of a point, then paired rounds of server-only
    and the splits whose saving's interval is wider than wanted, until none is or `rounds.most`
    rounds ran, and a last server-only run after them all (`round_savings`: each split's round
    between two). A split that stops never resumes: its rounds are always the point's first
    ones, paired by index with server-only's."""
    where = f"{condition.label}, P={prompt_tokens} G={new_tokens}"
    progress(f"{where}: {len(placements)} placement(s) x {rounds.first} rounds")
    args = (condition, prompt_tokens, new_tokens)
    runs = bench.measure(*args, placements, rounds.first)
    base = SERVER * len(placements[0])

    def half_width_points(split: str) -> float:
        return 100 * saving(round_savings(runs[split], runs[base])).half_width

    wide = [p for p in placements if p != base and half_width_points(p) > rounds.half_width_points]
    while wide and len(runs[base]) < rounds.most:
        for placement, figures in bench.measure(*args, [base, *wide], 1).items():
            runs[placement].extend(figures)
        widths = [half_width_points(p) for p in wide]
        progress(f"{where}: round {len(runs[base])} of at most {rounds.most}: "
                 f"{len(wide)} split(s), widest ±{max(widths):.1f} points (wanted "
                 f"±{rounds.half_width_points:g})")
        wide = [p for p, w in zip(wide, widths, strict=True) if w > rounds.half_width_points]
    runs[base] += bench.measure(*args, [base], 1)[base]
    return runs


def progress(line: str) -> None:
    """A progress line of the grid on stderr."""
    print(f"splitllm fidelity: {line}", file=sys.stderr, flush=True)


def summarize(results: Sequence[Result]) -> dict[str, Any]:
    """`{"points": N, "metrics": {metric: {"median_abs_rel_err", "max_abs_rel_err"}},
    "saving_verdicts": {"splits", "within_target", "within", "missed", "undecided"}}`: the
    last, how many splits' estimates are within the target and what their intervals say."""
    metrics = {}
    for metric in METRICS:
        errors = [abs(r.rel_err(metric)) for r in results
                  if not (metric == "tpot_s" and r.point.new_tokens < 2)]
        metrics[metric] = {"median_abs_rel_err": statistics.median(errors) if errors else 0.0,
                           "max_abs_rel_err": max(errors, default=0.0)}
    rows = saving_gap(results)
    verdicts = {"splits": len(rows),
                "within_target": sum(abs(r["gap_points"]) <= TARGET_SAVING_POINTS for r in rows),
                **{v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}}
    return {"points": len(results), "metrics": metrics, "saving_verdicts": verdicts}


def saving_gap(results: Sequence[Result]) -> list[dict[str, Any]]:
    """Per split point: the server-work saving against server-only, planned and measured.

    The measured saving is the mean of the rounds' paired savings (`round_savings`: each split's
    run against server-only's just before and after it, so that they share their minute's
    conditions), with its interval (`saving`) and what it says of the target (`Saving.verdict`).
    """
    rows = []
    for r in results:
        if "server-only" in r.point.kinds:
            continue
        base = next((b for b in results if "server-only" in b.point.kinds
                     and (b.point.condition, b.point.prompt_tokens, b.point.new_tokens)
                     == (r.point.condition, r.point.prompt_tokens, r.point.new_tokens)), None)
        if base is None or base.predicted.server_cpu_s <= 0:
            continue
        per_round = round_savings(r.runs, base.runs)
        if not per_round:
            continue
        planned = 1 - r.predicted.server_cpu_s / base.predicted.server_cpu_s
        measured = saving(per_round)
        rows.append({"placement": r.point.placement, "kinds": list(r.point.kinds),
                     "condition": r.point.condition.label,
                     "prompt_tokens": r.point.prompt_tokens, "new_tokens": r.point.new_tokens,
                     "planned_saving": planned,
                     "measured_saving": measured.estimate, "round_savings": per_round,
                     "gap_points": 100 * (measured.estimate - planned),
                     "rounds": measured.rounds,
                     "half_width_points": 100 * measured.half_width,
                     "verdict": measured.verdict(planned)})
    return rows


def round_savings(split: Sequence[Figures], base: Sequence[Figures]) -> list[float]:
    """1 - the split's server CPU seconds / the mean of server-only's just before and after it
    (its round's and the next's), round by round. The noise drifts over neighbouring
    generations: on the four full grids this cut the sd of a round's log ratio from 0.080 (its
    round's server-only alone) to 0.061. A round whose next server-only run is still to come,
    or whose server-only runs had no server CPU, is left out."""
    flanks = itertools.pairwise(base)  # [rounds of server-only - 1]
    return [1 - s.server_cpu_s / mean for s, (before, after) in zip(split, flanks, strict=False)
            if (mean := (before.server_cpu_s + after.server_cpu_s) / 2) > 0]


def saving(per_round: Sequence[float]) -> Saving:
    """The mean of a split's paired round savings and its Student t interval's half-width.

    The mean, not the median: drawn from the four full grids' pooled rounds (109 splits), 8
    rounds' mean spreads as little as a 20% trimmed mean or the ratio of summed CPU seconds
    (sd 1.38 points), their median 9% more; its t interval covered 93-95% of draws at 9-40
    rounds (README, "How precise a saving is"; benchmarks/fidelity_rounds.py).
    """
    from scipy.stats import t

    n = len(per_round)
    mean = statistics.fmean(per_round) if per_round else math.nan
    if n < 2:
        return Saving(estimate=mean, half_width=math.inf, rounds=n)
    quantile = float(t.ppf(0.5 + SAVING_CONFIDENCE / 2, n - 1))
    return Saving(estimate=mean, half_width=quantile * statistics.stdev(per_round) / math.sqrt(n),
                  rounds=n)


def visit_residual_s(result: Result) -> float | None:
    """Unexplained e2e seconds per visit to the server per pass (None without a visit).

    A fixed cost per message (framing, thread hand-offs, a process woken on a loaded machine)
    would show as the same residual at every point.
    """
    visits = Placement(result.point.placement).server_visits
    if not visits:
        return None
    passes = max(result.point.new_tokens, 1)
    return (result.measured.e2e_s - result.predicted.e2e_s) / (visits * passes)


def results_json(results: Sequence[Result]) -> dict[str, Any]:
    """The whole grid as one JSON document: summary, savings and every point."""
    points = [{**asdict(r.point), "condition_label": r.point.condition.label,
               "predicted": asdict(r.predicted), "measured": asdict(r.measured),
               "runs": [asdict(run) for run in r.runs],
               "rel_err": {m: r.rel_err(m) for m in METRICS},
               "visit_residual_s": visit_residual_s(r)} for r in results]
    return {**summarize(results), "savings": saving_gap(results), "results": points}
