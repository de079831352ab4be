"""`splitllm loadtest`: a real server under many concurrent split sessions, against the simulator.

Thin: parse and check the options, build the load test's world from the scenario, the server's
step model and this machine's device profile, run the study (`loadtest.run_study` over
`loadtest_run.RealRunner`) and write the report.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlparse

import typer

from splitllm.errors import UserError
from splitllm.outputs import output_dir

if TYPE_CHECKING:
    from splitllm.planner.hardware import DeviceProfile
    from splitllm.runtime.loadtest_host import HostFit, HostProbes
    from splitllm.runtime.loadtest_idle import IdleRow
    from splitllm.runtime.loadtest_run import RealRunner
    from splitllm.runtime.loadtest_world import EmulatedClass, LoadtestSpec
    from splitllm.sim.world import World

QUICK_REQUESTS, QUICK_REL_TOL, QUICK_MINUTES = 24, 0.3, 10.0
# = LoadtestSpec.policies (a test holds them alike: this module stays light to import)
DEFAULT_POLICIES = "server-only,greedy,exact,exact-load-aware,frontier-priced"
# the server's default `max_sessions`: a real fleet's clients are many devices, and 32 worker
# threads capped the splits (at 12.3 req/s their 2.5-3 s requests needed 31 at once: later
# ones waited up to 0.87 s for a thread, with the server 49% busy)
MAX_IN_FLIGHT = 64
CLIENTS = ("here", "fleet")


def _scenario(name: str) -> World:
    """A built-in scenario by name, or a YAML/JSON scenario file (UserError naming the field)."""
    from splitllm.sim.builtin import BUILTINS, builtin_world
    from splitllm.sim.scenario import load_scenario

    if name in BUILTINS:
        return builtin_world(name)
    path = Path(name)
    if not path.is_file():
        raise UserError(f"--scenario {name!r}: use {', '.join(BUILTINS)} or a scenario file")
    return load_scenario(path)


def _policies(text: str) -> tuple[str, ...]:
    from splitllm.sim.policies import check_policy

    names = tuple(p.strip() for p in text.split(",") if p.strip())
    if not names:
        raise UserError("--policies: expected a comma-separated list")
    for name in names:
        check_policy(name)
    return names


def _on_this_machine(url: str) -> bool:
    """Whether a server URL names this machine (its loopback)."""
    host = urlparse(url).hostname or ""
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _progress(line: str) -> None:
    print(f"splitllm loadtest: {line}", file=sys.stderr, flush=True)


def loadtest(
    server: Annotated[str | None, typer.Option(
        help="A running server, ws://HOST:PORT (default: start one for --model on a free "
             "port, pinned to its own core).")] = None,
    model: Annotated[str, typer.Option(help="'smollm2' (built in) or a local HF directory.")
                     ] = "smollm2",
    token: Annotated[str | None, typer.Option(envvar="SPLITLLM_TOKEN", help="Server token.")
                     ] = None,
    scenario: Annotated[str, typer.Option(
        help="A simulator scenario: mixed, azure-conv, azure-code or a YAML/JSON file.")
                        ] = "azure-conv",
    policies: Annotated[str, typer.Option(help="Comma-separated placement policies.")
                        ] = DEFAULT_POLICIES,
    requests: Annotated[int | None, typer.Option(
        help="Requests per probe (the scenario's first N; default 96, --quick 24).")] = None,
    length_scale: Annotated[float, typer.Option(
        help="Token counts times this (a small model's context, a CPU's speed).")] = 1 / 32,
    sla_factor: Annotated[float, typer.Option(
        help="SLA: this x the largest request's idle server-only latency.")] = 3.0,
    sla_s: Annotated[float | None, typer.Option(help="Or one SLA for every request type.")
                     ] = None,
    max_minutes: Annotated[float | None, typer.Option(
        help="Bound on the whole capacity search (default 30, --quick 10).")] = None,
    rel_tol: Annotated[float | None, typer.Option(
        help="Stop a search when its bracket is this narrow (default 0.1, --quick 0.3).")
                       ] = None,
    device_profile: Annotated[Path | None, typer.Option(
        help="This machine's device profile (`splitllm profile`); default: measured now.")
                              ] = None,
    threads: Annotated[int, typer.Option(help="Torch threads of the clients and a local server.")
                       ] = 1,
    max_in_flight: Annotated[int, typer.Option(
        help="Client sessions running at once (default: the server's default session limit).")
                             ] = MAX_IN_FLIGHT,
    clients: Annotated[str, typer.Option(
        help="'here': the EMULATED clients compute their units for real, on this machine's "
             "core(s) the server does not have (the simulator shares them likewise); 'fleet': "
             "their units are only timed, not computed (each its own device, as a real fleet's: "
             "the server's capacity under the policy, measured; the tokens are not the "
             "model's).")] = "here",
    quick: Annotated[bool, typer.Option(
        "--quick", help="24 requests a probe, a coarse search, 10 minutes at most.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write report.md and results.json here.")
                   ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Drive a real server with concurrent split sessions; measured vs simulated capacity."""
    from splitllm.planner.hardware import device_preset
    from splitllm.runtime.loadtest_world import LoadtestSpec

    spec = LoadtestSpec(requests=requests or (QUICK_REQUESTS if quick else LoadtestSpec.requests),
                        length_scale=length_scale, sla_factor=sla_factor, sla_s=sla_s,
                        policies=_policies(policies),
                        rel_tol=rel_tol or (QUICK_REL_TOL if quick else 0.1))
    minutes = max_minutes or (QUICK_MINUTES if quick else 30.0)
    if not (length_scale > 0 and sla_factor > 0 and (sla_s is None or sla_s > 0)
            and minutes > 0 and 0 < spec.rel_tol < 1 and threads >= 1 and max_in_flight >= 1):
        raise UserError("--length-scale, --sla-factor, --sla-s, --max-minutes and --threads "
                        "must be > 0, --rel-tol in (0, 1), --max-in-flight >= 1")
    if clients not in CLIENTS:
        raise UserError(f"--clients {clients!r}: use {' or '.join(CLIENTS)}")
    world = _scenario(scenario)  # a bad file fails here, before any server starts
    this_machine = device_preset(str(device_profile)) if device_profile else None
    if out is not None:
        output_dir(out, "--out")
    run_loadtest(server=server, model=model, token=token, scenario_name=scenario,
                 scenario_world=world, spec=spec, minutes=minutes, this_machine=this_machine,
                 threads=threads, max_in_flight=max_in_flight, fleet=clients == "fleet", out=out,
                 as_json=as_json)


def _visit_s(url: str, token: str | None, n_units: int) -> float:
    """The fixed cost of one visit to the server beyond its round trip, measured on the idle
    server (what the planner and the simulator charge each pass's visit)."""
    from splitllm.runtime.link_probe import measure_visit_s
    from splitllm.runtime.transport import WebSocketTransport

    transport = WebSocketTransport(url, token)
    try:
        return measure_visit_s(transport, n_units, visits=9)
    finally:
        transport.close()


CALIBRATION_ROUNDS = 3  # their median: a one-off cost in one round (measured: 21.6 ms per
# forward in one quiet run's only round against 4.0 in another's) must not price every forward


def calibrated(world: World, runner: RealRunner, url: str, token: str | None
               ) -> tuple[World, list[list[IdleRow]]]:
    """The world on the step model the server refitted on first rounds of the idle check's
    requests, with the server's CPU per forward outside its steps measured over them (the
    median round's): what the simulated server runs, what both sides' planners charge, and
    what the idle check then predicts with (measured over that check itself, its predictions
    lacked it: 3 ms per forward, the +7 to +10 ms every request ran over its prediction);
    and those rounds."""
    from splitllm.runtime.dialer import fetch_info
    from splitllm.runtime.loadtest import server_job_s
    from splitllm.runtime.loadtest_idle import idle_check
    from splitllm.runtime.loadtest_world import with_step_model
    from splitllm.stepmodel import StepModel

    _progress("the server's own seconds per forward, over first rounds of the idle check")
    jobs_s, rounds = [], []
    for _ in range(CALIBRATION_ROUNDS):
        before = runner.metrics()
        rounds.append(idle_check(world, runner.alone))
        jobs_s.append(server_job_s(before, runner.metrics()))
    job_s = statistics.median(jobs_s)
    live = fetch_info(url, token)
    refitted = StepModel.from_json(live["step_model"])  # its job_s: a visit's part in the steps
    world = with_step_model(world, replace(refitted, job_s=refitted.job_s + job_s))
    _progress(f"the server's CPU outside its engine steps: {job_s * 1e3:.3g} ms per forward "
              f"(the median of {', '.join(f'{j * 1e3:.3g}' for j in jobs_s)}; charged per "
              "job); its step model "
              f"{live.get('step_model_fit', {}).get('source', 'start-up')}")
    runner.world = world
    return world, rounds


def calibrated_host(world: World, runner: RealRunner, rounds: list[list[IdleRow]],
                    classes: tuple[EmulatedClass, ...]) -> tuple[World, HostFit]:
    """The world whose clients share this machine (`loadtest_host`): their CPU fitted on the
    calibration's rounds, the server's slowdown while their cores compute timed after them."""
    from splitllm.runtime.loadtest_host import calibrate_host, client_cores

    _progress("the server's seconds with the clients' cores computing")
    fit = calibrate_host(world, classes, rounds, _host_probes(runner), cores=client_cores())
    return with_host(world, fit, runner, classes), fit


def _host_probes(runner: RealRunner) -> HostProbes:
    from splitllm.runtime.loadtest_host import HostProbes

    return HostProbes(alone=runner.alone, computing=runner.computing, together=runner.together,
                      poll=runner.metrics)


def with_host(world: World, fit: HostFit, runner: RealRunner,
              classes: tuple[EmulatedClass, ...]) -> World:
    """The world (the runner's too) whose clients share the machine `fit` calibrated."""
    runner.world = replace(world, client_host=fit.host(classes))
    _progress(f"the EMULATED clients share {fit.cores} core(s). {fit.note()}")
    return runner.world


def run_loadtest(*, server: str | None, model: str, token: str | None, scenario_name: str,
                 scenario_world: World, spec: LoadtestSpec, minutes: float,
                 this_machine: DeviceProfile | None, threads: int, max_in_flight: int,
                 fleet: bool, out: Path | None, as_json: bool) -> None:
    """The load test with checked options: server, world, study, report; all of it within
    `minutes`."""
    started_s = time.monotonic()
    import torch

    from splitllm.runtime.dialer import fetch_info
    from splitllm.runtime.fidelity_run import local_server
    from splitllm.runtime.loadtest import run_study
    from splitllm.runtime.loadtest_idle import idle_check, idle_json, idle_md
    from splitllm.runtime.loadtest_report import header_text, report_md, study_json, write_report
    from splitllm.runtime.loadtest_run import RealRunner, RunnerOptions
    from splitllm.runtime.loadtest_world import loadtest_world
    from splitllm.runtime.models import context_tokens, load_model
    from splitllm.stepmodel import StepModel

    torch.set_num_threads(threads)
    loaded = load_model(model)
    config = loaded.model.config.to_dict()
    if this_machine is None:
        from splitllm.runtime.device_profile import profile_device
        from splitllm.runtime.units import UnitStack

        _progress("timing this machine on the model (its device profile)")
        this_machine, _ = profile_device(UnitStack(loaded.model), config, name="this-machine",
                                         prompt_tokens=(16, 64))
    with contextlib.ExitStack() as stack:
        if server is None:
            _progress(f"starting a server for {model}")
        url = server or stack.enter_context(local_server(model, threads))
        info = fetch_info(url, token)
        if not info.get("step_model"):
            raise UserError(f"{url} announces no step_model in /v1/info (started unprofiled?)")
        visit_s = _visit_s(url, token, int(info["n_units"]))
        _progress(f"a visit to the idle server costs {visit_s * 1e3:.3g} ms beyond its round trip")
        world, classes = loadtest_world(
            scenario_world, config=config, context_tokens=context_tokens(loaded.model.config),
            this_machine=this_machine, step=StepModel.from_json(info["step_model"]), spec=spec,
            visit_s=visit_s)
        runner = RealRunner(loaded, world, classes, RunnerOptions(
            server=url, token=token, max_in_flight=max_in_flight,
            server_here=server is None or _on_this_machine(server), fleet=fleet),
            progress=_progress)
        stack.callback(runner.close)
        world, rounds = calibrated(world, runner, url, token)
        host: HostFit | None = None
        if not fleet:
            world, host = calibrated_host(world, runner, rounds, classes)

        def between(world: World) -> World:
            """The server's slowdown timed again after the probes (pooled with the pairs
            before)."""
            nonlocal host
            from splitllm.runtime.loadtest_host import retimed

            assert host is not None
            host = retimed(world, host, _host_probes(runner))
            return with_host(world, host, runner, classes)

        _progress("each policy's plan for the largest requests, alone on the idle server")
        idle = idle_check(world, runner.alone)
        # less what ran before, and a longest SLA kept for the requests a cut-off probe still
        # runs (each ends at its next token) and for the server's shutdown
        left_s = minutes * 60 - (time.monotonic() - started_s) - world.max_sla_s
        results = run_study(world, runner.probe, budget_s=left_s, clock=time.monotonic,
                            progress=_progress, between=None if fleet else between)
        world = runner.world  # its server's slowdown as last timed (all pairs pooled)
    where = (f"the server at {server}" if server else
             "a local `splitllm serve` child process pinned to its own core")
    header = header_text(world, classes, scenario=scenario_name, length_scale=spec.length_scale,
                         model=loaded.model_id, where=where, fleet=fleet)
    if host is not None:
        header += "\n\n" + host.note()
    document = study_json(results, world, classes, scenario=scenario_name,
                          length_scale=spec.length_scale, idle=idle_json(idle),
                          client_host=host.to_json() if host is not None else None)
    markdown = report_md(results, header, idle_md(idle), classes, fleet=fleet)
    if out is not None:
        write_report(out, markdown, document)
        _progress(f"report in {out}")
    print(json.dumps(document) if as_json else markdown)
