"""The `splitllm` command: thin wrappers that parse, build values and call the library."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from splitllm import dtypes
from splitllm.errors import UserError
from splitllm.outputs import output_file
from splitllm.planner.configs import MODEL_CONFIGS
from splitllm.planner.hardware import DEVICE_PRESETS, LINK_PRESETS
from splitllm.planner.speculation import Speculation
from splitllm.runtime.commands import demo, generate_command, proxy, serve
from splitllm.runtime.loadtest_command import loadtest
from splitllm.runtime.measure_commands import fidelity, profile
from splitllm.sim.commands import simulate

if TYPE_CHECKING:
    from splitllm.planner.instance import Instance, Plan

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Collaborative (split) inference of LLMs between a server and its clients.",
)
# Wide tables stay readable when piped (rich assumes 80 columns off a terminal).
console = Console() if sys.stdout.isatty() else Console(width=140)

SOLVER_NAMES = "exact, dp-grid, milp, greedy, best-single-cut, server-only, client-only"
MODELS, DEVICES, LINKS = (", ".join(t) for t in (MODEL_CONFIGS, DEVICE_PRESETS, LINK_PRESETS))
DTYPES = dtypes.short_names(dtypes.COST_MODEL)


@app.command()
def plan(
    instance_file: Annotated[Path | None, typer.Option(
        "--instance", help="Plan an explicit-cost instance JSON file instead of a model.")] = None,
    model: Annotated[str, typer.Option(
        help=f"Built-in model config ({MODELS}) or a config.json path.")
    ] = "llama-3-8b",
    client: Annotated[str, typer.Option(help=f"Client device: {DEVICES} or a profile .json.")
                      ] = "laptop",
    server: Annotated[str, typer.Option(help=f"Server device: {DEVICES} or a profile .json.")
                      ] = "datacenter-gpu",
    link: Annotated[str, typer.Option(help=f"Link: {LINKS} or a profile .json.")] = "wifi",
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens P (or patches).")] = 512,
    output_tokens: Annotated[int, typer.Option(help="Output tokens G (0 for encoders).")] = 8,
    sla_s: Annotated[float, typer.Option(help="End-to-end latency SLA, seconds.")] = 3.0,
    ttft_s: Annotated[float | None, typer.Option(help="Optional time-to-first-token limit.")
                      ] = None,
    tpot_s: Annotated[float | None, typer.Option(help="Optional time-per-output-token limit.")
                      ] = None,
    weight_dtype: Annotated[str, typer.Option(help=f"Weights: {DTYPES}.")] = "fp16",
    wire_dtype: Annotated[str, typer.Option(help=f"Hidden states on the wire: {DTYPES}.")
                          ] = "fp16",
    keep_on_client: Annotated[list[str] | None, typer.Option(
        help="Pin a unit to the client (repeatable), e.g. embed.")] = None,
    keep_on_server: Annotated[list[str] | None, typer.Option(
        help="Pin a unit to the server (repeatable).")] = None,
    solver: Annotated[str, typer.Option(help=f"One of: {SOLVER_NAMES}.")] = "exact",
    step_s: Annotated[float, typer.Option(help="Time step of dp-grid, seconds.")] = 0.001,
    show_frontier: Annotated[bool, typer.Option(
        "--frontier", help="Also print the whole latency / server-work frontier.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    export_instance: Annotated[Path | None, typer.Option(
        help="Write the planned instance to this JSON file.")] = None,
    speculate: Annotated[int, typer.Option(
        help="Speculative decoding: draft tokens verified per decode pass (0: none).")] = 0,
    draft_hit_rate: Annotated[float, typer.Option(
        help="With --speculate: the rate at which a draft is accepted (measure it with "
             "`generate --json`: accepted / drafted).")] = 0.5,
) -> None:
    """Plan which units run on the client and which on the server, least server work first."""
    from splitllm.planner.instance_file import load_instance, save_instance
    from splitllm.planner.solvers import compare, frontier

    if instance_file is not None:
        instance = load_instance(instance_file)
    else:
        instance = _model_instance(
            model, client, server, link, prompt_tokens, output_tokens, sla_s, ttft_s, tpot_s,
            weight_dtype, wire_dtype, keep_on_client or [], keep_on_server or [],
            speculation=Speculation(draft_tokens=speculate, hit_rate=draft_hit_rate)
            if speculate else None,
        )
    if not step_s > 0:
        raise UserError("--step-s must be positive")
    if export_instance is not None:
        save_instance(instance, output_file(export_instance, "--export-instance"))
    plans = compare(instance, solver, step_s)
    chosen = plans[solver]
    front = frontier(instance) if show_frontier or instance_file is None else []
    if as_json:
        _print_json(chosen, plans, front, show_frontier)
    else:
        _print_tables(instance, chosen, plans, front, show_frontier)
    if chosen is None:
        raise typer.Exit(3)


def _model_instance(
    model: str, client: str, server: str, link: str, prompt_tokens: int, output_tokens: int,
    sla_s: float, ttft_s: float | None, tpot_s: float | None, weight_dtype: str,
    wire_dtype: str, keep_on_client: list[str], keep_on_server: list[str], *,
    speculation: Speculation | None = None,
) -> Instance:
    from splitllm.planner.configs import load_model_config
    from splitllm.planner.costs import model_costs
    from splitllm.planner.hardware import device_preset, link_preset
    from splitllm.planner.instance import Request, build_instance

    for flag, dtype in (("--weight-dtype", weight_dtype), ("--wire-dtype", wire_dtype)):
        if dtypes.canonical(dtype, dtypes.COST_MODEL) is None:
            raise UserError(f"{flag} {dtype!r}: use one of {DTYPES}")
    costs = model_costs(load_model_config(model), dtypes.bytes_per_element(weight_dtype),
                        dtypes.bytes_per_element(wire_dtype))
    request = Request(prompt_tokens=prompt_tokens, output_tokens=output_tokens, sla_s=sla_s,
                      ttft_s=ttft_s, tpot_s=tpot_s, speculation=speculation)
    return build_instance(costs, device_preset(client), device_preset(server), link_preset(link),
                          request, frozenset(keep_on_client), frozenset(keep_on_server))


def _plan_json(plan: Plan | None) -> dict[str, Any]:
    if plan is None:
        return {"feasible": False, "reason": "no placement meets the SLA and the limits"}
    return {
        "feasible": True, "placement": plan.placement.sides, "latency_s": plan.latency_s,
        "server_work": plan.server_work, "client_mem_bytes": plan.client_mem_bytes,
        "switches": plan.placement.switches, "client_compute_s": plan.client_compute_s,
        "server_compute_s": plan.server_compute_s, "network_s": plan.network_s,
    }


def _print_json(
    chosen: Plan | None, plans: Mapping[str, Plan | None], front: Sequence[Plan],
    show_frontier: bool,
) -> None:
    out = _plan_json(chosen)
    out["plans"] = {name: _plan_json(p) for name, p in plans.items()}
    if front:
        out["frontier_size"] = len(front)
    if show_frontier:
        out["frontier"] = [{"server_work": p.server_work, "latency_s": p.latency_s,
                            "placement": p.placement.sides} for p in front]
    sys.stdout.write(json.dumps(out) + "\n")


def _print_tables(
    instance: Instance, chosen: Plan | None, plans: Mapping[str, Plan | None],
    front: Sequence[Plan], show_frontier: bool,
) -> None:
    from splitllm.planner.report import frontier_table, plan_table, units_table

    if chosen is not None:
        console.print(units_table(instance, chosen))
    console.print(plan_table(instance, plans))
    if front:
        console.print(f"frontier: {len(front)} Pareto-optimal plans (latency vs server work)")
    if show_frontier:
        console.print(frontier_table(front))
    if chosen is None:
        console.print("[red]infeasible:[/red] no placement meets the SLA and the limits")


@app.command()
def presets() -> None:
    """List the built-in model configs, device and link presets, and solvers."""
    from rich.table import Table

    from splitllm.planner.costs import model_costs

    models = Table(title="Models (--model)")
    for column in ("name", "kind", "blocks", "hidden", "params (M)"):
        models.add_column(column)
    for name, cfg in MODEL_CONFIGS.items():
        models.add_row(name, cfg.kind, str(cfg.n_layers), str(cfg.hidden),
                       f"{model_costs(cfg).params / 1e6:,.1f}")
    devices = Table(title="Devices (--client, --server)")
    for column in ("name", "peak TFLOP/s", "mem GB/s", "memory GB", "efficiency"):
        devices.add_column(column)
    for name, d in DEVICE_PRESETS.items():
        devices.add_row(name, f"{d.peak_flops_per_s / 1e12:g}",
                        f"{d.mem_bandwidth_bytes_per_s / 1e9:g}",
                        f"{d.mem_capacity_bytes / 1e9:g}", f"{d.efficiency:g}")
    links = Table(title="Links (--link)")
    for column in ("name", "up Mbit/s", "down Mbit/s", "RTT ms"):
        links.add_column(column)
    for name, k in LINK_PRESETS.items():
        links.add_row(name, f"{k.uplink_bytes_per_s * 8 / 1e6:g}",
                      f"{k.downlink_bytes_per_s * 8 / 1e6:g}", f"{k.rtt_s * 1e3:g}")
    for table in (models, devices, links):
        console.print(table)
    console.print(f"Solvers (--solver): {SOLVER_NAMES}")


# The runtime's commands (serve, generate, demo, proxy) import torch only when they run.
app.command()(serve)
app.command(name="generate")(generate_command)
app.command()(demo)
app.command()(proxy)
app.command()(simulate)
app.command()(fidelity)
app.command()(profile)
app.command()(loadtest)


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2; what the machine
    refused (a file, a port) one line and exit code 1."""
    try:
        app()
    except (UserError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2 if isinstance(exc, UserError) else 1)
