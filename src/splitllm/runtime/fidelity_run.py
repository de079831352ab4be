"""`splitllm fidelity` on the real runtime: a server, real split sessions, and the report.

Predictions come from the same instance `placement="auto"` plans on (`Session.instance`: the
client's measured profile times its emulated slowdown, the server's published profile, the
link measured through any emulation); measurements from real generations of exactly the
requested number of tokens with the placement fixed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from splitllm.errors import UserError
from splitllm.placement import Placement
from splitllm.planner.instance import Instance
from splitllm.runtime.client import Session, connect
from splitllm.runtime.fidelity import (
    METRICS,
    SAVING_CONFIDENCE,
    TARGET_SAVING_POINTS,
    VERDICTS,
    Condition,
    Figures,
    Result,
    Rounds,
    multi_switch,
    progress,
    results_json,
    run_grid,
    saving_gap,
    summarize,
    visit_residual_s,
)
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.wire_bytes import SessionBytes, session_bytes

QUICK_CONDITIONS = (Condition(), Condition(link="wifi", client_slowdown=2.0))
FULL_CONDITIONS = (Condition(), Condition(client_slowdown=2.0), Condition(link="wifi"),
                   Condition(link="wifi", client_slowdown=2.0), Condition(link="4g"))
QUICK_LENGTHS = ((32, 8),)
FULL_LENGTHS = ((16, 8), (64, 16), (128, 8))
TARGET_MEDIAN, TARGET_MAX = 0.10, 0.25
SERVER_START_S = 600.0
WARM_UP_TOKENS = 16  # server-only tokens each connection generates before planning, then
WARM_UP_ROUNDS = 2  # unmeasured rounds of `warm_up_placements` at each of the grid's lengths:
# 6 prefills of each prompt length, so the live step model holds a point of its own there
# (live_steps.MIN_SAMPLES), not the start-up curve's (4 rows of 8 tokens at 32 tokens)


@dataclass(frozen=True, kw_only=True)
class FidelityOptions:
    """What `splitllm fidelity` runs."""

    server: str
    token: str | None = None
    quick: bool = False
    rounds: Rounds
    sla_factor: float = 1.3
    threads: int = 1


class RealBench:
    """The real runtime as a `Bench`: one connection per emulated condition."""

    def __init__(self, loaded: LoadedModel, opts: FidelityOptions) -> None:
        self.loaded = loaded
        self.opts = opts
        self.lengths = QUICK_LENGTHS if opts.quick else FULL_LENGTHS
        self._sessions: dict[Condition, Session] = {}
        self._sources: dict[Condition, str] = {}  # where each condition's predictions came from

    def session(self, condition: Condition) -> Session:
        """The connection of a condition (opened, warmed up and its link measured once)."""
        if condition not in self._sessions:
            progress(f"{condition.label}: connecting, warming up")
            session = connect(self.opts.server, self.loaded, token=self.opts.token,
                              emulate_link=condition.link,
                              emulate_client_slowdown=condition.client_slowdown)
            n = session.stack.n_units
            # warm up; the server-only steps also give the server's live step model its
            # first samples at one row (live_steps.MIN_SAMPLES) before the first prediction
            session.generate(self.prompt(8), WARM_UP_TOKENS, placement="S" * n, chat=False,
                             stop_at_eos=False)
            session.generate(self.prompt(8), 2, placement="C" * n, chat=False)
            for _ in range(WARM_UP_ROUNDS):
                for prompt_tokens, new_tokens in self.lengths:
                    for placement in warm_up_placements(n):
                        session.generate(self.prompt(prompt_tokens), new_tokens,
                                         placement=placement, chat=False, stop_at_eos=False)
            self._sessions[condition] = session
        return self._sessions[condition]

    def prompt(self, prompt_tokens: int) -> list[int]:
        """A deterministic prompt of exactly this many tokens (ids of the vocabulary's middle)."""
        vocab = self.loaded.model.config.vocab_size
        return [(vocab // 3 + 7 * i) % vocab for i in range(prompt_tokens)]

    def instances(self, condition: Condition, prompt_tokens: int, new_tokens: int
                  ) -> tuple[Instance, Instance]:
        session = self.session(condition)
        whole, source = session.instance(prompt_tokens, new_tokens)
        first, _ = session.instance(prompt_tokens, 1)
        self._sources.setdefault(condition, source)
        return whole, first

    def session_bytes(self, condition: Condition, prompt_tokens: int, new_tokens: int,
                      placement: str) -> SessionBytes:
        session = self.session(condition)
        return session_bytes(Placement(placement), session.stack.names,
                             wire_dtype=session.wire_dtype, prompt_tokens=prompt_tokens,
                             new_tokens=new_tokens)

    def measure(self, condition: Condition, prompt_tokens: int, new_tokens: int,
                placements: Sequence[str], rounds: int) -> dict[str, list[Figures]]:
        session = self.session(condition)
        runs: dict[str, list[Figures]] = {placement: [] for placement in placements}
        for _ in range(rounds):  # rounds of every placement in turn
            for placement, figures in runs.items():
                run = session.generate(self.prompt(prompt_tokens), new_tokens,
                                       placement=placement, chat=False, stop_at_eos=False)
                figures.append(Figures(ttft_s=run.ttft_s, tpot_s=run.tpot_s, e2e_s=run.wall_s,
                                       server_cpu_s=run.server_cpu_s,
                                       wire_bytes=float(run.bytes_sent + run.bytes_received),
                                       server_busy_s=run.server_busy_s))
        return runs

    def fixed_costs(self) -> list[str]:
        """What each condition's planning measured beside the units: the link and the fixed
        costs of a visit to the server and of a pass of the client's loop."""
        lines = []
        for condition, session in self._sessions.items():
            link, loop_s = session.measure_link(), session.client_profile().pass_s
            lines.append(f"{condition.label}: RTT {link.rtt_s * 1e3:.2f} ms, a visit "
                         f"{link.visit_s * 1e3:.2f} ms beyond it, the client loop "
                         f"{loop_s * 1e3:.2f} ms per pass; predicted from "
                         f"{self._sources.get(condition, 'nothing')}")
        return lines

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()


def warm_up_placements(n_units: int) -> tuple[str, ...]:
    """What each connection runs, unmeasured, at every length of its grid before it plans:
    server-only, its blocks alone and the multi-switch plan, so that the server's live step
    model holds steps of the grid's sizes, and one row's steps through server segments 8 to 30
    blocks long (what a visit costs beyond its units: `live_steps.job_s`)."""
    return ("S" * n_units, "C" + "S" * (n_units - 2) + "C", str(multi_switch(n_units)))


def run_fidelity(loaded: LoadedModel, opts: FidelityOptions) -> tuple[list[Result], list[str]]:
    """The grid on a running server (quick: 2 conditions x 1 length; full: 5 x 3), and the
    fixed costs each condition measured (`RealBench.fixed_costs`)."""
    if opts.rounds.first < 1 or opts.sla_factor < 1:
        raise UserError("--repeats must be >= 1 and --sla-factor >= 1")
    bench = RealBench(loaded, opts)
    try:
        results = run_grid(bench, conditions=QUICK_CONDITIONS if opts.quick else FULL_CONDITIONS,
                           lengths=bench.lengths, sla_factor=opts.sla_factor,
                           rounds=opts.rounds)
        return results, bench.fixed_costs()
    finally:
        bench.close()


@contextlib.contextmanager
def local_server(model: str, threads: int) -> Iterator[str]:
    """A `splitllm serve` child process pinned to the last core (the client keeps the others)."""
    import tempfile

    from splitllm.runtime.demo import free_port, start_server, stop_server, wait_healthy

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc = start_server(model, port, log, threads)
        try:
            _pin_apart(proc.pid)
            # The server times its units and its engine's steps at start: minutes when loaded.
            wait_healthy(f"http://127.0.0.1:{port}", proc, log, timeout_s=SERVER_START_S)
            yield f"ws://127.0.0.1:{port}"
        finally:
            stop_server(proc)


def _pin_apart(server_pid: int) -> None:
    """Server on the last core, this process on the rest, where the OS lets us pin."""
    if not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return
    with contextlib.suppress(OSError):
        os.sched_setaffinity(server_pid, {cores[-1]})
        os.sched_setaffinity(0, set(cores[:-1]))


def write_report(results: list[Result], out: Path, header: str) -> None:
    """report.md, results.json and the plots into out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results_json(results), indent=1))
    plots = _plots(results, out)
    (out / "report.md").write_text(report_md(results, header, plots))


def report_md(results: list[Result], header: str, plots: list[str]) -> str:
    """The fidelity report: what was emulated, the error summary against targets, every point."""
    summary = summarize(results)
    busy_s = sum(r.measured.server_busy_s for r in results)
    share = sum(r.measured.server_cpu_s for r in results) / busy_s if busy_s else 0.0
    lines = ["# Fidelity: the planner's predictions against the real runtime\n", header, "",
             f"Contention: while it computed, the server's thread got {share:.0%} of a core "
             "(its CPU seconds over its busy wall seconds). Latencies are predicted from wall "
             "seconds measured at each side's start, the server's work from CPU seconds.", "",
             "| metric | median abs rel err | max abs rel err | target (<= 10% / <= 25%) |",
             "|---|---|---|---|"]
    for metric in METRICS:
        med, worst = (summary["metrics"][metric][key]
                      for key in ("median_abs_rel_err", "max_abs_rel_err"))
        ok = "met" if med <= TARGET_MEDIAN and worst <= TARGET_MAX else "**missed**"
        lines.append(f"| {metric} | {med:.1%} | {worst:.1%} | {ok} |")
    rows, verdicts = saving_gap(results), summary["saving_verdicts"]
    lines += ["", "Server-work saving of each split against server-only (server CPU s), "
              f"target: within {TARGET_SAVING_POINTS:g} points of the plan. Measured: the mean "
              "of the rounds' paired savings (each split's run against the mean of server-only's "
              "runs just before and after it) and its "
              f"{SAVING_CONFIDENCE:.0%} Student t interval; the interval's verdict: `within` "
              f"when it excludes a miss of {TARGET_SAVING_POINTS:g} points, `missed` when it "
              "excludes meeting the target, else `undecided`. "
              f"{verdicts['within_target']} of {verdicts['splits']} estimates within the target; "
              "their intervals: " + ", ".join(f"{verdicts[v]} {v}" for v in VERDICTS) + ".", "",
              "| condition | P / G | placement | planned | measured (mean ± 95%) | rounds | "
              "lowest / highest round | gap (points) | interval |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        rounds = row["round_savings"]
        lines.append(f"| {row['condition']} | {row['prompt_tokens']} / {row['new_tokens']} | "
                     f"{'/'.join(row['kinds'])} `{row['placement']}` | "
                     f"{row['planned_saving']:.1%} | {row['measured_saving']:.1%} "
                     f"± {row['half_width_points']:.1f} | {row['rounds']} | "
                     f"{min(rounds):.1%} / {max(rounds):.1%} | {row['gap_points']:+.1f} | "
                     f"{row['verdict']} |")
    lines += ["", "Every point (predicted / measured), and the e2e residual per visit to the "
              "server per pass (measured - predicted):", "",
              "| condition | P | G | kinds | " + " | ".join(METRICS) + " | residual/visit |",
              "|---|---|---|---|" + "---|" * (len(METRICS) + 1)]
    for r in results:
        cells = [f"{getattr(r.predicted, m):.4g} / {getattr(r.measured, m):.4g}" for m in METRICS]
        residual = visit_residual_s(r)
        cells.append("" if residual is None else f"{residual * 1e3:+.1f} ms")
        lines.append(f"| {r.point.condition.label} | {r.point.prompt_tokens} | "
                     f"{r.point.new_tokens} | {'/'.join(r.point.kinds)} | " + " | ".join(cells)
                     + " |")
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(lines)


def _plots(results: list[Result], out: Path) -> list[str]:
    """predicted_vs_measured.png (one panel per metric) and errors.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4))
    for ax, metric in zip(axes, METRICS, strict=True):
        xs = [getattr(r.measured, metric) for r in results]
        ys = [getattr(r.predicted, metric) for r in results]
        ax.scatter(xs, ys, s=14)
        top = max([*xs, *ys, 1e-9])
        ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
        ax.set(title=metric, xlabel="measured", ylabel="predicted")
    fig.tight_layout()
    fig.savefig(out / "predicted_vs_measured.png", dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot([[100 * r.rel_err(m) for r in results] for m in METRICS], tick_labels=list(METRICS))
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(ylabel="(predicted - measured) / measured, %", title="error per metric")
    fig.tight_layout()
    fig.savefig(out / "errors.png", dpi=90)
    plt.close(fig)
    return ["predicted_vs_measured.png", "errors.png"]


def header_text(model: str, opts: FidelityOptions, server_started: bool,
                fixed_costs: Sequence[str] = ()) -> str:
    """What ran and what was emulated (and the fixed costs measured), for the top of a report."""
    where = "a local `splitllm serve` child process pinned to its own core" if server_started \
        else f"the server at {opts.server}"
    return (f"Model {model}; {where}; the client in this process "
            f"({os.cpu_count()} cores, shared with other work). EMULATED: the links (delay and "
            "bandwidth shaping in the client's transport) and client slowdowns (the client "
            "sleeps its layers' time times the factor) named per condition; `loopback` is the "
            "real local socket. Each figure is the median of its rounds (the placements of a "
            f"point measured in turn in each round: {opts.rounds.first} rounds of each, then "
            "paired rounds of server-only and the splits whose saving's "
            f"{SAVING_CONFIDENCE:.0%} interval is wider than "
            f"±{opts.rounds.half_width_points:g} points, up to {opts.rounds.most} rounds); a "
            "split's saving is the mean of its rounds' savings, each against the mean of "
            "server-only's runs before and after it (its round's and the next's); the SLA of a "
            f"point is {opts.sla_factor:g}x the faster uniform placement's predicted latency. "
            "Predictions: `Session.instance` (what placement=auto plans on)."
            + "".join(f"\n\n- measured: {line}" for line in fixed_costs))

