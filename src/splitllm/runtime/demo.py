"""`splitllm demo`: a real split of SmolLM2 for an emulated phone on an emulated 4G link.

It starts a server process in the background, plans a placement from measured unit times
(the phone is this CPU slowed down, the link is shaped in the client's transport; both are
labelled EMULATED), streams the split's answer, then runs the same prompt server-only and
reports what the split saved on the server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from splitllm.errors import UserError
from splitllm.placement import CLIENT, SERVER, Placement
from splitllm.planner.instance import Instance, evaluate
from splitllm.planner.speculation import Speculation, measured_hit_rate

if TYPE_CHECKING:
    from splitllm.runtime.client import Generation, Session
    from splitllm.runtime.fidelity import Figures
    from splitllm.runtime.models import LoadedModel

SERVER_START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs."""

    prompt: str
    max_new_tokens: int
    link: str
    client_slowdown: float
    sla_factor: float
    model: str
    speculate: int = 4  # prompt-lookup drafts per pass in the speculation part (0: skip it)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(model: str, port: int, log_path: Path, threads: int = 1, *, setup: str = ""
                 ) -> subprocess.Popen[bytes]:
    """`splitllm serve` in a child process (the demo gives it one core, the client the other);
    `setup`: Python statements the child runs first (a benchmark's settings)."""
    code = setup + "import typer; from splitllm.runtime.commands import serve; typer.run(serve)"
    args = [sys.executable, "-c", code, "--model", model, "--port", str(port),
            "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("SPLITLLM_TOKEN", None)  # the demo's private server needs no token
    with log_path.open("wb") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path,
                 timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
    """Poll /health until the server answers; UserError with its log if it dies."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise UserError(f"the demo server exited with code {proc.returncode}:\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise UserError(f"the demo server did not answer within {timeout_s:.0f} s")


@contextlib.contextmanager
def served(model: str, threads: int = 1) -> Iterator[str]:
    """A `splitllm serve` child process on a free local port while the block runs: its ws URL."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc = start_server(model, port, log, threads=threads)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc, log)
            yield f"ws://127.0.0.1:{port}"
        finally:
            stop_server(proc)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def run_demo(opts: DemoOptions) -> None:
    """The whole demo; prints the answer and the report to stdout, progress to stderr."""
    import torch

    from splitllm.runtime.models import encode_prompt, load_model, log_stderr, resolve_model_dir

    clock = time.perf_counter()
    console = Console(width=110)
    resolve_model_dir(opts.model)  # converts the built-in model once, before the server starts
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="splitllm-demo-") as tmp:
        log_path = Path(tmp) / "server.log"
        log_stderr(f"splitllm demo: starting a server on 127.0.0.1:{port} (background process)")
        proc = start_server(opts.model, port, log_path)
        try:
            torch.set_num_threads(1)
            loaded = load_model(opts.model)
            wait_healthy(f"http://127.0.0.1:{port}", proc, log_path)
            ids = encode_prompt(loaded, opts.prompt)
            _run_client(console, opts, loaded, f"ws://127.0.0.1:{port}", ids)
        finally:
            stop_server(proc)
    console.print(f"demo finished in {time.perf_counter() - clock:.1f} s")


def _run_client(console: Console, opts: DemoOptions, loaded: LoadedModel, url: str,
                ids: list[int]) -> None:
    from splitllm.runtime.autoplace import AutoPlan, compare_plans, with_sla
    from splitllm.runtime.client import connect
    from splitllm.runtime.fidelity import promised
    from splitllm.runtime.models import log_stderr

    with connect(url, loaded, emulate_link=opts.link,
                 emulate_client_slowdown=opts.client_slowdown) as session:
        log_stderr(f"splitllm demo: {session.emulation}")
        log_stderr("splitllm demo: measuring the link and this client's unit times...")
        instance, source = session.instance(len(ids), opts.max_new_tokens)
        n = len(instance)
        server_only_s = evaluate(instance, Placement(SERVER * n)).latency_s
        instance = with_sla(instance, opts.sla_factor * server_only_s)
        plans = compare_plans(instance)
        if plans["exact"] is None:
            raise UserError(f"no placement meets the SLA {instance.sla_s:.2f} s: raise "
                            "--sla-factor")

        def announce(auto: AutoPlan) -> None:
            link = session.measure_link()
            console.print(f"[bold]Planned[/bold] from {source} unit times, link measured at "
                          f"connect: RTT {link.rtt_s * 1e3:.0f} ms, up "
                          f"{link.uplink_bytes_per_s * 8 / 1e6:.1f} Mbit/s, down "
                          f"{link.downlink_bytes_per_s * 8 / 1e6:.1f} Mbit/s")
            console.print(f"SLA {auto.instance.sla_s:.2f} s = {opts.sla_factor:g} x the "
                          f"predicted server-only latency; placement "
                          f"[bold]{auto.plan.placement}[/bold]")
            console.print(_who_runs_what(auto.plan.placement, auto.instance.names))
            console.print(f"\n[bold]Prompt:[/bold] {opts.prompt}\n[bold]Answer (split):[/bold] ",
                          end="")

        split = session.generate(ids, opts.max_new_tokens, placement="auto",
                                 sla_s=instance.sla_s, headroom=0.0,  # the table's plans
                                 on_plan=announce, on_text=_stream)
        print(flush=True)
        log_stderr("splitllm demo: the same prompt server-only, for comparison...")
        server_only = session.generate(ids, opts.max_new_tokens, placement=SERVER * n)
        # Predicted for the tokens each run generated: an answer may end (EOS) well before
        # the budget the plan was made for, and a prediction for 64 tokens is not one for 32.
        predicted = {run.placement: promised(session, Placement(run.placement), len(ids),
                                             len(run.tokens))
                     for run in (split, server_only)}
        console.print(_report(split, server_only, predicted))
        from splitllm.planner.report import plan_table

        console.print(plan_table(instance, plans))
        if opts.speculate > 0:
            console.print(_speculation(session, opts, ids, instance, split, server_only))


def _speculation(session: Session, opts: DemoOptions, ids: list[int], instance: Instance,
                 split: Generation, server_only: Generation) -> Table:
    """Speculation on the chosen placement, then the exact plan that knows its hit rate."""
    from splitllm.runtime.autoplace import plan_placement, with_sla
    from splitllm.runtime.models import log_stderr

    k, tokens = opts.speculate, opts.max_new_tokens
    log_stderr(f"splitllm demo: the split's placement again, {k} prompt-lookup drafts a pass...")
    drafted = session.generate(ids, tokens, placement=split.placement, speculate=k)
    passes = max(len(drafted.tokens) - 1 - drafted.accepted, 1)
    rate = measured_hit_rate(k, (len(drafted.tokens) - 1) / passes)
    speculation = Speculation(draft_tokens=k, hit_rate=rate)
    known, _ = session.instance(len(ids), tokens, speculation=speculation)
    runs = {"split, no drafts": split, f"split, {k} drafts": drafted}
    try:
        plan = plan_placement(with_sla(known, instance.sla_s))
    except UserError:  # drafts that rarely hit only add work: no placement may meet the SLA
        log_stderr(f"splitllm demo: with the hit rate {rate:.2f} no placement meets the SLA")
        return _speculation_table(runs, server_only, instance.sla_s, rate)
    log_stderr(f"splitllm demo: planned knowing the hit rate {rate:.2f}: {plan.placement}")
    runs["planned with drafts"] = (
        drafted if str(plan.placement) == split.placement else
        session.generate(ids, tokens, placement=plan.placement, speculate=k))
    return _speculation_table(runs, server_only, instance.sla_s, rate)


def _speculation_table(runs: dict[str, Generation], server_only: Generation, sla_s: float,
                       rate: float) -> Table:
    table = Table(title=f"What speculation did (prompt lookup; measured hit rate {rate:.2f}; "
                        f"the same SLA {sla_s:.2f} s)",
                  caption="measured; the phone and the link are EMULATED")
    table.add_column("")
    runs = {**runs, "server-only": server_only}
    for name in runs:
        table.add_column(name, justify="right")
    rows: dict[str, Callable[[Generation], str]] = {
        "placement": lambda g: _segments(g.placement),
        "units on the phone": lambda g: str(g.placement.count(CLIENT)),
        "round trips": lambda g: str(g.round_trips),
        "drafts accepted": lambda g: f"{g.accepted}/{g.drafted}" if g.drafted else "-",
        "tokens/s": lambda g: f"{g.tokens_per_s:.1f}",
        "server CPU s": lambda g: f"{g.server_cpu_s:.3f}",
        "server CPU saved": lambda g: f"{1 - g.server_cpu_s / server_only.server_cpu_s:.0%}"
        if server_only.server_cpu_s > 0 else "",
        "same tokens": lambda g: "yes" if g.tokens == server_only.tokens else "NO",
    }
    for label, cell in rows.items():
        table.add_row(label, *(cell(g) for g in runs.values()))
    return table


def _stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _report(split: Generation, server_only: Generation, predicted: dict[str, Figures]
            ) -> Table:
    """Measured beside predicted (for the tokens each run generated), split and server-only."""
    table = Table(title="What the split did",
                  caption="measured once on this machine; the phone and the link are "
                          "EMULATED; CPU seconds are robust to preemption, not to other work's "
                          "memory traffic: on a busy machine one run's saving moves by +-20% "
                          "(`splitllm fidelity` pairs 9 rounds)")
    for column in ("", "split", "server-only"):
        table.add_column(column, justify="left" if not column else "right")
    def saved(split_s: float, server_only_s: float) -> str:
        return f"{1 - split_s / server_only_s:.0%}" if server_only_s > 0 else ""

    planned, baseline = predicted[split.placement], predicted[server_only.placement]
    rows = [
        ("placement", _segments(split.placement), _segments(server_only.placement)),
        ("server CPU s (predicted)", f"{split.server_cpu_s:.3f} ({planned.server_cpu_s:.3f})",
         f"{server_only.server_cpu_s:.3f} ({baseline.server_cpu_s:.3f})"),
        ("server work saved: measured CPU", saved(split.server_cpu_s, server_only.server_cpu_s),
         ""),
        ("  planned", saved(planned.server_cpu_s, baseline.server_cpu_s), ""),
        ("server busy s, wall (predicted)",
         f"{split.server_busy_s:.3f} ({planned.server_busy_s:.3f})",
         f"{server_only.server_busy_s:.3f} ({baseline.server_busy_s:.3f})"),
        ("tokens", str(len(split.tokens)), str(len(server_only.tokens))),
        ("tokens/s", f"{split.tokens_per_s:.1f}", f"{server_only.tokens_per_s:.1f}"),
        ("TTFT s", f"{split.ttft_s:.3f}", f"{server_only.ttft_s:.3f}"),
        ("TPOT ms", f"{split.tpot_s * 1e3:.1f}", f"{server_only.tpot_s * 1e3:.1f}"),
        ("wall s (predicted)", f"{split.wall_s:.2f} ({planned.e2e_s:.2f})",
         f"{server_only.wall_s:.2f} ({baseline.e2e_s:.2f})"),
        ("KiB up / down", f"{split.bytes_sent / 1024:.0f} / {split.bytes_received / 1024:.0f}",
         f"{server_only.bytes_sent / 1024:.0f} / {server_only.bytes_received / 1024:.0f}"),
        ("same tokens", "yes" if split.tokens == server_only.tokens else "NO", ""),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def _who_runs_what(placement: Placement, names: tuple[str, ...]) -> str:
    """'phone: embed..block5 | server: block6..head' for a placement."""
    parts = []
    for seg in placement.segments():
        who = "server" if seg.side == SERVER else "phone"
        span = names[seg.start] if seg.stop - seg.start == 1 else (
            f"{names[seg.start]}..{names[seg.stop - 1]}")
        parts.append(f"{who}: {span}")
    return " | ".join(parts)


def _segments(sides: str) -> str:
    """'CCCSSSS' -> 'C3 S4' (client units, then server units)."""
    return " ".join(f"{seg.side}{seg.stop - seg.start}" for seg in Placement(sides).segments())
