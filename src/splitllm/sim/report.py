"""Reports of studies: rich summary tables, a Markdown file, JSON results and PNG plots.

matplotlib is imported inside the plotting functions (Agg backend), so importing this module
stays cheap and `splitllm --help` fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.table import Table

from splitllm.sim import plots
from splitllm.sim.paper import POLICIES, PaperGrid, exact_over_greedy, reductions, summarize_model
from splitllm.sim.study import PaperStudy, SimStudy
from splitllm.sim.world import World


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.1%}"


def _num(x: float, digits: int = 3) -> str:
    if math.isnan(x):
        return "n/a"
    return "inf" if math.isinf(x) else f"{x:.{digits}g}"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def write_json(path: Path, value: Any) -> None:
    """Results as JSON (NaN and Infinity spelled as JavaScript does)."""
    path.write_text(json.dumps(_jsonable(value), indent=1, sort_keys=True) + "\n")


# ---- simulated scenarios ------------------------------------------------------------------

def _capacities(study: SimStudy) -> dict[str, float]:
    return {c.policy: c.rate_per_s for c in study.capacities}


def _ratio(value: float, base: float) -> str:
    return (_num(value / base) + "x" if 0 < base < math.inf and math.isfinite(value)
            and not math.isnan(value) else "n/a")


def verdict_lines(study: SimStudy) -> list[str]:
    """The report's first lines: the best splitting policy, and any below server-only."""
    caps = _capacities(study)
    base = caps.get("server-only")
    if base is None or not 0 < base < math.inf:
        return ["No comparison with server-only: it is not among the policies or has no "
                "finite capacity here."]
    split = {p: c for p, c in caps.items() if p not in ("server-only", "client-only")}
    lines = []
    if split:
        best = max(split, key=lambda p: split[p])
        lines.append(f"Best splitting policy: {best}, goodput capacity {_num(split[best])} "
                     f"req/s = {_ratio(split[best], base)} server-only's {_num(base)} req/s.")
    below = [p for p, c in caps.items() if c < base]
    lines.append("Below server-only's capacity: " + ", ".join(
        f"{p} ({_ratio(caps[p], base)})" for p in below) + "." if below
        else "No policy falls below server-only's capacity.")
    if split and study.world.server.scheduler == "batched":
        lines.append(_batched_line(study, max(split, key=lambda p: split[p])))
    return lines


def _batched_line(study: SimStudy, best: str) -> str:
    """Why splitting gains little work on a batched server, in the numbers of this study."""
    low = {m.policy: m for m in study.at(0)}
    ref, won = low.get("server-only"), low[best]
    work = (f": {_num(won.server_s_per_request)} server-s per request against server-only's "
            f"{_num(ref.server_s_per_request)} at {_num(study.rates_per_s[0])} req/s"
            if ref else "")
    return (f"Batched server: a step reads each unit's weights once for all its rows, so a "
            f"split saves the server only a request's own FLOPs and KV reads (the load-reading "
            f"policies price plans at that marginal cost){work}.")


def capacity_rows(study: SimStudy) -> list[list[str]]:
    """Per policy: capacity, its ratio to server-only, and low-load costs against server-only."""
    base = _capacities(study).get("server-only", 0.0)
    low = {m.policy: m for m in study.at(0)}
    ref = low.get("server-only")
    rows = []
    for k, policy in enumerate(study.world.policies):
        cap = study.capacities[k].rate_per_s if study.capacities else math.nan
        m = low[policy]
        shown = ("unbounded" if math.isinf(cap) else
                 f">= {_num(cap)} (max rate)" if cap >= study.world.sweep.max_rate_per_s
                 else _num(cap))

        def against(value: float, reference: float | None) -> str:
            return _num(value) + (f" ({_ratio(value, reference)})" if reference else "")

        rows.append([
            policy, shown, _ratio(cap, base),
            against(m.server_s_per_request, ref.server_s_per_request if ref else None),
            against(m.latency_s[0], ref.latency_s[0] if ref else None),
            against(m.latency_s[2], ref.latency_s[2] if ref else None),
            against(m.ttft_s[0], ref.ttft_s[0] if ref else None),
            against(m.ttft_s[2], ref.ttft_s[2] if ref else None),
            _pct(m.client_unit_share), _pct(m.sla_attainment), _pct(m.fallback_share),
        ])
    return rows


CAPACITY_HEADERS = ["policy", "goodput capacity (req/s)", "vs server-only",
                    "server s/request *", "p50 latency s *", "p99 latency s *", "p50 TTFT s *",
                    "p99 TTFT s *", "units on clients *", "SLA attainment *", "fallback *"]
# the terminal's table: the rest is in report.md
CLI_HEADERS = ["policy", "goodput capacity (req/s)", "vs server-only", "server s/request *",
               "p50 latency s *", "p99 latency s *", "p50 TTFT s *", "SLA attainment *"]
LOW_RATE_NOTE = ("at {rate:.3g} req/s, the lowest rate of the curve; in brackets: against "
                 "server-only at that rate")


def sim_summary_table(study: SimStudy) -> Table:
    """The rich table the CLI prints."""
    table = Table(title=f"{study.world.name}: goodput capacity (>= "
                        f"{study.world.sweep.target_attainment:.0%} of requests in SLA)")
    shown = [CAPACITY_HEADERS.index(c) for c in CLI_HEADERS]
    for column in CLI_HEADERS:
        table.add_column(column, justify="left" if column == "policy" else "right",
                         no_wrap=column == "policy")
    for row in capacity_rows(study):
        table.add_row(*[row[i] for i in shown])
    table.caption = ("* " + LOW_RATE_NOTE.format(rate=study.rates_per_s[0]) + "\n"
                     + " ".join(verdict_lines(study)))
    return table


def _curve_rows(study: SimStudy) -> list[list[str]]:
    rows = []
    for i, rate in enumerate(study.rates_per_s):
        for m in study.at(i):
            rows.append([
                _num(rate), m.policy, _pct(m.sla_attainment), _num(m.goodput_per_s),
                _num(m.throughput_per_s), _pct(m.utilization), _num(m.server_s_per_request),
                _num(m.latency_s[0]), _num(m.latency_s[2]), _num(m.ttft_s[0]), _num(m.tpot_s[0]),
            ])
    return rows


def _world_section(world: World) -> str:
    s = world.server
    lines = [
        f"Server: `{s.device.name}` ({s.device.peak_flops_per_s / 1e12:g} TFLOP/s, "
        f"{s.device.mem_bandwidth_bytes_per_s / 1e9:g} GB/s, efficiency "
        f"{s.device.efficiency:g}), scheduler `{s.scheduler}`"
        + (f", {s.workers} worker(s)" if s.scheduler == "fcfs" else "")
        + (f", max batch {s.max_batch}, step times from "
           + ("a measured step model" if s.step_model else "the roofline")
           if s.scheduler == "batched" else "") + ".",
        f"Duration {world.duration_s:g} s after a {world.warmup_s:g} s warm-up (longer at low "
        f"rates: at least {world.sweep.min_requests} requests), seed {world.seed}, arrivals "
        + ("Poisson." if world.trace is None else "from a trace (time axis scaled per rate)."),
        "",
        md_table(["client class", "device", "link", "share"],
                 [[c.name, c.device.name, c.link.name, f"{c.share:g}"] for c in world.clients]),
        "",
        md_table(["request type", "model", "prompt tokens", "output tokens", "SLA s", "share"],
                 [[t.name, t.model.config.name if t.model else "synthetic",
                   _num(t.prompt_tokens.mean()), _num(t.output_tokens.mean()) if t.decoder
                   else "-", f"{t.sla_s:g}", f"{t.share:g}"] for t in world.types]),
        "",
        "Token columns are means of the distributions.",
    ]
    return "\n".join(lines)


SIM_NOTES = """\
How to read this: a request meets its SLA when it finishes within `sla_s` (and TTFT/TPOT
limits where set); requests still running at the end count as misses. Goodput counts requests
finishing in the measurement window within their SLA, per second. The goodput capacity is the
highest arrival rate with SLA attainment >= the target, found by bracketing and bisection over
rates on the same request sequence. Load-aware policies re-plan every request with the
server's recently measured delay per job added to every visit to the server: its mean
(`exact-load-aware`) or a high quantile (`exact-quantile`, `exact-tuned`, `frontier-priced`);
`exact-tuned` and `frontier-priced` keep a headroom that tunes itself toward the target
attainment, and `frontier-priced` trades server work against latency at a price that falls
as the server fills up. A policy with no feasible plan falls back (server-only: all on the
server; zero-load policies: the fastest placement; load-aware: the fastest placement if it
can still meet the limits, else the least server work) and counts the request as a miss if
it misses. Client compute and links never queue (one request per client device)."""


def sim_markdown(study: SimStudy, pictures: list[str]) -> str:
    """The Markdown report of a simulated study."""
    world = study.world
    parts = [
        f"# splitllm simulation: {world.name}", "", *verdict_lines(study), "",
        _world_section(world), "",
        "## Goodput capacity", "", md_table(CAPACITY_HEADERS, capacity_rows(study)), "",
        "\\* " + LOW_RATE_NOTE.format(rate=study.rates_per_s[0]) + ".", "",
        "## Policies against arrival rate", "",
        md_table(["rate/s", "policy", "SLA att.", "goodput/s", "throughput/s", "util.",
                  "server s/req", "p50 latency s", "p99 latency s", "p50 TTFT s", "p50 TPOT s"],
                 _curve_rows(study)), "",
        "## Plots", "", *[f"![{p}]({p})" for p in pictures], "",
        "## Notes", "", SIM_NOTES, "",
    ]
    return "\n".join(parts)


def write_sim_report(study: SimStudy, out: Path, document: dict[str, Any]) -> Path:
    """Markdown, JSON, plots and the effective scenario of a simulated study, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    pictures = plots.sim_plots(study, out)
    (out / "scenario.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    write_json(out / "results.json", {"capacities": study.capacities,
                                      "rates_per_s": study.rates_per_s, "curve": study.curve})
    path = out / "report.md"
    path.write_text(sim_markdown(study, pictures))
    return path


# ---- the paper grid -----------------------------------------------------------------------

PAPER_HEADERS = ["model", "points", *[f"{p} vs server-only" for p in POLICIES[1:]],
                 "exact vs greedy", "exact < greedy at"]


def paper_rows(study: PaperStudy) -> list[list[str]]:
    """Per model: mean server workload reduction of each policy, exact over greedy."""
    rows = []
    for model in study.grid.models:
        pts = [p for p in study.points if p.model == model]
        s = summarize_model(model, pts)
        rows.append([model, str(s.points), *[_pct(v) for v in s.reduction_vs_server_only[1:]],
                     _pct(s.exact_vs_greedy), f"{s.exact_beats_greedy} pts"])
    pts = list(study.points)
    rows.append(["all models", str(len(pts)),
                 *[_pct(v) for v in reductions(pts).mean(axis=0)[1:]],
                 _pct(float(exact_over_greedy(pts).mean())), ""])
    split = [p for p in pts if p.server_work_s[POLICIES.index("exact")] > 0]
    if split:  # without the points where the whole model moves to the client
        rows.append(["all, exact uses the server", str(len(split)),
                     *[_pct(v) for v in reductions(split).mean(axis=0)[1:]],
                     _pct(float(exact_over_greedy(split).mean())), ""])
    return rows


def paper_summary_table(study: PaperStudy) -> Table:
    """The rich table the CLI prints for the paper grid."""
    table = Table(title="Server workload reduction at zero load (mean over grid points)")
    for column in PAPER_HEADERS:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in paper_rows(study):
        table.add_row(*row)
    return table


def _grid_section(grid: PaperGrid) -> str:
    return "\n".join([
        f"- models: {', '.join(grid.models)}",
        f"- sequence length (prompt tokens; ViT patches): {list(grid.prompt_tokens)}; "
        f"ViT {list(grid.vit_patches)}; decoders generate {grid.output_tokens} tokens",
        f"- SLA = slack x the server-only latency of the request, slack {list(grid.sla_slack)}",
        f"- client-to-server speed: the `{grid.server}` server scaled down by "
        f"{list(grid.speed_ratio)} (FLOP/s and memory bandwidth), "
        f"{grid.client_memory_bytes / 1e9:g} GB client memory",
        f"- links: {', '.join(grid.links)}",
        f"- {grid.size} points; every policy plans each point at zero load",
    ])


PAPER_NOTES = """\
Reduction of a policy at a point = 1 - its server work / server-only's server work; the
table averages it over the points of a model. Server-only meets every point's SLA (slack >= 1),
so every point counts; a policy that found no plan counts as 0 there (it falls back to
server-only). `exact vs greedy` = mean over points of 1 - exact / greedy (0 where greedy's
work is 0). The aggregate reductions (1 - total work / total server-only work) and every
point are in results.json. The last row leaves out the points where exact runs the whole model
on the client (no split at all), to show what splitting itself gains."""


def _infeasible_line(study: PaperStudy) -> str:
    counts = np.isnan(np.array([p.server_work_s for p in study.points])).sum(axis=0)
    return "Points without a feasible plan: " + ", ".join(
        f"{policy} {int(n)}" for policy, n in zip(POLICIES, counts, strict=True)) + "."


def paper_markdown(study: PaperStudy, pictures: list[str]) -> str:
    """The Markdown report of the paper grid."""
    return "\n".join([
        "# splitllm: the reference work's planning grid", "", "## Grid", "",
        _grid_section(study.grid), "", "## Server workload reduction", "",
        md_table(PAPER_HEADERS, paper_rows(study)), "", PAPER_NOTES, "",
        _infeasible_line(study), "",
        "## Plots", "", *[f"![{p}]({p})" for p in pictures], "",
    ])


def write_paper_report(study: PaperStudy, out: Path) -> Path:
    """Markdown, JSON and plots of the paper grid, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    pictures = plots.paper_plots(study, out)
    summaries = [summarize_model(m, [p for p in study.points if p.model == m])
                 for m in study.grid.models]
    write_json(out / "results.json", {"grid": study.grid, "policies": POLICIES,
                                      "summaries": summaries, "points": study.points})
    path = out / "report.md"
    path.write_text(paper_markdown(study, pictures))
    return path
