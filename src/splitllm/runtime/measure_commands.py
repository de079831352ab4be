"""Thin CLI commands of the measurements: `splitllm fidelity`."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from splitllm.errors import UserError
from splitllm.outputs import output_dir, output_file


def fidelity(
    server: Annotated[str | None, typer.Option(
        help="A running server, ws://HOST:PORT (default: start a local one on its own core).")
                      ] = None,
    model: Annotated[str, typer.Option(help="'smollm2' (built in) or a local HF directory.")
                     ] = "smollm2",
    token: Annotated[str | None, typer.Option(envvar="SPLITLLM_TOKEN", help="Server token.")
                     ] = None,
    out: Annotated[Path | None, typer.Option(
        help="Write report.md, results.json and plots into this folder.")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="A small grid: 2 conditions x 1 length (< 3 min on 2 cores).")] = False,
    # 3 first rounds let one split's saving miss its plan by 6-8 points in 2 of 3 quiet quick
    # runs; 40 rounds give +-2 points to the splits of the past grids' 90th percentile of noise
    # (47 rounds) but a few, and keep the full grid near 18 minutes (README)
    repeats: Annotated[int, typer.Option(
        help="First rounds per point (placements in turn); each figure's median counts, and "
             "a split's saving is the mean of its rounds' paired savings.")] = 9,
    max_rounds: Annotated[int, typer.Option(
        help="Rounds at most per point: paired rounds of server-only and the splits whose "
             "saving's 95% interval is wider than --saving-half-width.")] = 40,
    saving_half_width: Annotated[float, typer.Option(
        help="Points of saving: a split's 95% interval half-width that ends its rounds.")
                                 ] = 2.0,
    sla_factor: Annotated[float, typer.Option(
        help="Each point's SLA: this times the faster uniform placement's prediction.")] = 1.3,
    threads: Annotated[int, typer.Option(help="Torch threads of the client and a local server.")
                       ] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the error summary as JSON.")
                       ] = False,
) -> None:
    """Predicted against measured on the real runtime: TTFT, TPOT, e2e, server CPU, wire bytes."""
    import torch

    from splitllm.runtime.fidelity import Rounds, summarize
    from splitllm.runtime.fidelity_run import (
        FidelityOptions,
        header_text,
        local_server,
        report_md,
        run_fidelity,
        write_report,
    )
    from splitllm.runtime.models import load_model

    for option, value in (("--repeats", repeats), ("--sla-factor", sla_factor),
                          ("--threads", threads)):
        if not value >= 1:
            raise UserError(f"{option} must be at least 1, got {value:g}")
    if max_rounds < repeats or not saving_half_width > 0:
        raise UserError(f"--max-rounds must be at least --repeats ({repeats}) and "
                        f"--saving-half-width above 0, got {max_rounds} and {saving_half_width:g}")
    torch.set_num_threads(threads)
    loaded = load_model(model)
    if out is not None:
        output_dir(out, "--out")
    with contextlib.ExitStack() as stack:
        url = server or stack.enter_context(local_server(model, threads))
        opts = FidelityOptions(server=url, token=token, quick=quick, sla_factor=sla_factor,
                               threads=threads, rounds=Rounds(first=repeats, most=max_rounds,
                                                              half_width_points=saving_half_width))
        results, fixed_costs = run_fidelity(loaded, opts)
    header = header_text(loaded.model_id, opts, server_started=server is None,
                         fixed_costs=fixed_costs)
    if out is not None:
        write_report(results, out, header)
    if as_json:
        print(json.dumps(summarize(results)))
    else:
        print(report_md(results, header, []))
    if out is not None:
        print(f"splitllm: report in {out}", file=sys.stderr)


def profile(
    model: Annotated[str, typer.Option(help="'smollm2' (built in) or a local HF directory.")
                     ] = "smollm2",
    name: Annotated[str, typer.Option(help="The device profile's name.")] = "this-machine",
    out: Annotated[Path, typer.Option(help="Write the device profile JSON here.")
                   ] = Path("device-profile.json"),
    server: Annotated[str | None, typer.Option(
        help="Also measure the link to this server (ws://HOST:PORT).")] = None,
    token: Annotated[str | None, typer.Option(envvar="SPLITLLM_TOKEN", help="Server token.")
                     ] = None,
    link_out: Annotated[Path, typer.Option(help="Write the link profile JSON here.")
                        ] = Path("link-profile.json"),
    threads: Annotated[int, typer.Option(help="Torch threads to time with.")] = 1,
    clock: Annotated[str, typer.Option(
        help="Fit to 'wall' seconds (latency) or this thread's 'cpu' seconds (a server's work).")
                     ] = "wall",
    as_json: Annotated[bool, typer.Option("--json", help="Print the profiles and samples.")
                       ] = False,
) -> None:
    """Time this machine (and the link to a server): profiles plan/simulate/generate accept."""
    import torch

    from splitllm.planner.hardware import save_profile
    from splitllm.runtime.device_profile import CLOCKS, profile_device, sample_rows
    from splitllm.runtime.models import load_model
    from splitllm.runtime.units import UnitStack

    if threads < 1:
        raise UserError("--threads must be at least 1")
    if clock not in CLOCKS:
        raise UserError(f"--clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    torch.set_num_threads(threads)
    loaded = load_model(model)
    output_file(out, "--out")
    if server is not None:
        output_file(link_out, "--link-out")
    device, samples = profile_device(UnitStack(loaded.model), loaded.model.config.to_dict(),
                                     name=name, clock=clock)
    save_profile(device, out)
    document: dict[str, object] = {"device": json.loads(out.read_text()),
                                   "samples": sample_rows(device, samples)}
    if server is not None:
        document["link"] = _measure_link(server, token, link_out)
    if as_json:
        print(json.dumps(document))
        return
    for row in document["samples"]:  # type: ignore[attr-defined]
        print(f"{row['kind']:7} tokens {row['tokens']:4d}: measured {row['measured_s']:.4f} s "
              f"({clock}; wall {row['wall_s']:.4f}, CPU {row['cpu_s']:.4f}), "
              f"profile {row['predicted_s']:.4f} s ({row['rel_err']:+.1%})")
    print(f"device profile -> {out} (peak {device.peak_flops_per_s / 1e9:.1f} GFLOP/s, "
          f"memory {device.mem_bandwidth_bytes_per_s / 1e9:.1f} GB/s, efficiency 1)")
    if server is not None:
        print(f"link profile -> {link_out}")


def _measure_link(server: str, token: str | None, path: Path) -> dict[str, object]:
    """The link to a server (RTT, both bandwidths, the cost of a visit) saved as a link
    profile; its JSON."""
    from dataclasses import replace

    from splitllm.planner.hardware import save_profile
    from splitllm.runtime.client import fetch_info
    from splitllm.runtime.link_probe import measure_link, measure_visit_s
    from splitllm.runtime.transport import WebSocketTransport

    info = fetch_info(server, token)  # a wrong URL or token: one line, before the WebSocket
    transport = WebSocketTransport(server, token)
    try:
        link = measure_link(transport)
        link = replace(link, visit_s=measure_visit_s(transport, int(info["n_units"])))
    finally:
        transport.close()
    save_profile(replace(link, name=path.stem), path)
    return dict(json.loads(path.read_text()))
