"""`splitllm simulate`: run a scenario's study and write its report (registered in cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from splitllm.errors import UserError
from splitllm.outputs import output_dir

if TYPE_CHECKING:
    from rich.console import Console

    from splitllm.sim.sweep import Backend
    from splitllm.sim.world import World


def simulate(
    scenario: Annotated[str, typer.Option(
        help="paper (the planning grid), mixed (a simulated request mix), azure-conv or "
             "azure-code (Azure traces), or a YAML/JSON scenario file.")] = "mixed",
    out: Annotated[Path, typer.Option(
        help="Directory for the report: report.md, PNG plots, results.json.")
    ] = Path("reports/sim"),
    quick: Annotated[bool, typer.Option(
        help="Smaller grid, shorter runs, coarser capacity search (tests, CI).")] = False,
    jobs: Annotated[int, typer.Option(help="Sweep points run in this many processes.")] = 1,
    policies: Annotated[str | None, typer.Option(
        help="Comma-separated policies, e.g. server-only,exact (default: the scenario's).")
    ] = None,
    ray: Annotated[str | None, typer.Option(
        help="Run sweep points on Ray: auto (a running cluster), local, or an address. "
             "Needs `pip install 'splitllm\\[ray]'`.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the scenario's seed.")] = None,
    scheduler: Annotated[str | None, typer.Option(
        help="Override the server's scheduling model: fcfs, ps or batched.")] = None,
    rates: Annotated[str | None, typer.Option(
        help="Comma-separated arrival rates (req/s) for the curves (default: around the "
             "capacities found).")] = None,
    headroom: Annotated[float | None, typer.Option(
        help="Override the scenario's plan_headroom: policies plan against (1 - headroom) x "
             "each latency limit, keeping the rest for queueing.")] = None,
) -> None:
    """Simulate many clients sharing one server under each placement policy; write a report."""
    from rich.console import Console

    from splitllm.sim.sweep import Backend, ray_module

    if jobs < 1:
        raise UserError("--jobs must be at least 1")
    backend = Backend(jobs, ray)
    if ray is not None:
        ray_module()  # fail now, in one line, if Ray is missing
    console = Console() if sys.stdout.isatty() else Console(width=140)
    if scenario == "paper":
        for flag, value in (("--policies", policies), ("--scheduler", scheduler),
                            ("--rates", rates), ("--seed", seed), ("--headroom", headroom)):
            if value is not None:
                raise UserError(f"{flag} does not apply to --scenario paper (a planning grid)")
        _paper(backend, quick, out, console)
        return
    document, base_dir = _document(scenario)
    _override(document, policies, seed, scheduler, rates)
    if headroom is not None:
        document["plan_headroom"] = headroom
    _simulated(document, base_dir, backend, quick, out, console)


def _document(scenario: str) -> tuple[dict[str, Any], Path]:
    from splitllm.sim.builtin import BUILTINS, builtin_document
    from splitllm.sim.scenario import read_document

    if scenario in BUILTINS:
        return builtin_document(scenario), Path()
    path = Path(scenario)
    if not path.exists():
        raise UserError(f"--scenario {scenario!r}: use paper, {', '.join(BUILTINS)} or a "
                        "scenario file")
    document = read_document(path)
    # the report's copy of the scenario must find the trace and step model from anywhere
    for section, key in (("arrivals", "path"), ("server", "step_model")):
        part = document.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), str):
            part[key] = str((path.parent / part[key]).resolve())
    return document, path.parent


def _split(text: str, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{flag}: expected a comma-separated list")
    return items


def _override(document: dict[str, Any], policies: str | None, seed: int | None,
              scheduler: str | None, rates: str | None) -> None:
    """Apply command-line overrides to the scenario document before it is validated."""
    if policies is not None:
        document["policies"] = _split(policies, "--policies")
    if seed is not None:
        document["seed"] = seed
    if scheduler is not None:
        server = document.setdefault("server", {})
        if not isinstance(server, dict):
            raise UserError("scenario: server must be a mapping")
        server["scheduler"] = scheduler
    if rates is not None:
        try:
            values = [float(r) for r in _split(rates, "--rates")]
        except ValueError:
            raise UserError(f"--rates {rates!r}: expected numbers") from None
        sweep = document.setdefault("sweep", {})
        if not isinstance(sweep, dict):
            raise UserError("scenario: sweep must be a mapping")
        sweep["rates_per_s"] = values


def _progress() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress("[progress.description]{task.description}", BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


def _simulated(document: dict[str, Any], base_dir: Path, backend: Backend, quick: bool,
               out: Path, console: Console) -> None:
    from splitllm.sim.report import sim_summary_table, write_sim_report
    from splitllm.sim.scenario import parse_scenario, resolve
    from splitllm.sim.study import quick_world, run_sim_study, sim_tasks_count

    source = str(document.get("name", "scenario"))
    world: World = resolve(parse_scenario(document, source), base_dir=base_dir)
    output_dir(out, "--out")  # the scenario is valid: about to work
    if quick:
        world = quick_world(world)
    with _progress() as progress:
        task = progress.add_task(f"simulating {world.name}",
                                 total=sim_tasks_count(world, quick))
        study = run_sim_study(world, backend, quick, lambda: progress.advance(task))
    console.print(sim_summary_table(study))
    path = write_sim_report(study, out, document)
    console.print(f"report: {path}")


def _paper(backend: Backend, quick: bool, out: Path, console: Console) -> None:
    from splitllm.sim.paper import PaperGrid
    from splitllm.sim.report import paper_summary_table, write_paper_report
    from splitllm.sim.study import paper_tasks_count, run_paper_study

    grid = PaperGrid().quick() if quick else PaperGrid()
    output_dir(out, "--out")
    with _progress() as progress:
        task = progress.add_task("planning the paper grid", total=paper_tasks_count(grid))
        study = run_paper_study(grid, backend, lambda: progress.advance(task))
    console.print(paper_summary_table(study))
    path = write_paper_report(study, out)
    console.print(f"report: {path}")
