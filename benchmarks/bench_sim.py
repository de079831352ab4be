"""Simulator speed: events per second, and how run time grows with requests and output length.

Run: .venv/bin/python benchmarks/bench_sim.py [--quick]

Each measurement simulates one policy on one world (one core, the same process) and counts the
engine's handled events. Run time should grow linearly with the number of requests and with
the output length (decode steps are events): the tables print measured ratios of run time
when that quantity doubles (ideal: 2.00).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from splitllm.sim.builtin import MIXED
from splitllm.sim.dists import Dist
from splitllm.sim.run import run_policy
from splitllm.sim.scenario import parse_scenario, resolve
from splitllm.sim.world import World

CHAT = {
    "name": "bench", "seed": 1, "duration_s": 200, "warmup_s": 0,
    "server": {"device": "datacenter-gpu", "scheduler": "fcfs"},
    "clients": [{"name": "laptop", "device": "laptop", "link": "wifi", "share": 1},
                {"name": "edge", "device": "edge-box", "link": "lan", "share": 1}],
    "request_types": [{"name": "chat", "model": "llama-3-8b", "prompt_tokens": 256,
                       "output_tokens": 64, "sla_s": 30}],
    "arrivals": {"process": "poisson", "rate_per_s": 1.0},
}


def _world(doc: dict, **changes: object) -> World:
    return replace(resolve(parse_scenario(doc, "bench")), **changes)  # type: ignore[arg-type]


def _timed(world: World, policy: str, repeat: int = 1) -> tuple[float, int, int]:
    """(best seconds, events, requests) of simulating `policy` on `world`."""
    best = float("inf")
    events = requests = 0
    for _ in range(repeat):
        start = time.perf_counter()
        rec = run_policy(world, policy)
        best = min(best, time.perf_counter() - start)
        events, requests = rec.events, len(rec.arrived_at_s)
    return best, events, requests


def events_per_second(console: Console, scale: float) -> None:
    """Cold: the first run plans every kind of request; warm: plans and walks are cached (as in
    every probe of a capacity search after the first)."""
    table = Table(title="Events per second (one core)")
    for column in ("workload", "policy", "scheduler", "requests", "events", "cold s",
                   "cold ev/s", "warm s", "warm ev/s"):
        table.add_column(column, justify="left" if column in ("workload", "policy") else "right")
    mixed = resolve(parse_scenario(MIXED, "mixed"))
    chat = _world(CHAT, rate_per_s=0.8, duration_s=1500 * scale)
    cases = [
        ("chat llama-3-8b G=64", chat, "server-only"),
        ("chat llama-3-8b G=64", chat, "exact"),
        ("mixed (built-in)", replace(mixed.with_rate(1.2), duration_s=1500 * scale), "exact"),
        ("mixed (built-in)", replace(mixed.with_rate(1.2), duration_s=1500 * scale),
         "exact-load-aware"),
    ]
    for scheduler in ("fcfs", "ps", "batched"):
        for label, world, policy in cases:
            if scheduler != "fcfs" and policy != "exact":
                continue
            world = replace(world, server=replace(world.server, scheduler=scheduler),
                            seed=world.seed + 1)  # a fresh seed: fresh caches for "cold"
            cold, events, requests = _timed(world, policy)
            warm, _, _ = _timed(world, policy, repeat=2)
            table.add_row(label, policy, scheduler, f"{requests:,}", f"{events:,}",
                          f"{cold:.2f}", f"{events / cold:,.0f}", f"{warm:.2f}",
                          f"{events / warm:,.0f}")
    console.print(table)


def growth(console: Console, scale: float) -> None:
    """Warm runs of server-only (a fixed walk shape), so only the counted quantity changes."""
    base = _world(CHAT, rate_per_s=0.8)
    table = Table(title="Run time growth: ratio when the quantity doubles (ideal 2.00)")
    for column in ("quantity", "value", "requests", "events", "seconds", "time ratio",
                   "events ratio"):
        table.add_column(column, justify="left" if column == "quantity" else "right")
    rows: list[tuple[str, str, World]] = []
    for k in range(4):  # requests: longer runs at the same rate
        duration = 500 * scale * 2**k
        rows.append(("requests", f"{duration:g} s", replace(base, duration_s=duration)))
    for k in range(4):  # output length: the same requests, twice the decode steps each time
        g = 64 * 2**k
        rtype = replace(base.types[0], output_tokens=Dist("fixed", (float(g),)),
                        sla_s=30.0 * 2**k)
        rows.append(("output tokens", str(g), replace(base, types=(rtype,), rate_per_s=0.5 / 2**k,
                                                      duration_s=1000 * scale * 2**k)))
    previous: tuple[str, float, int] | None = None
    for quantity, value, world in rows:
        _timed(world, "server-only")  # warm the caches
        seconds, events, requests = _timed(world, "server-only", repeat=2)
        same = previous is not None and previous[0] == quantity
        table.add_row(quantity, value, f"{requests:,}", f"{events:,}", f"{seconds:.2f}",
                      f"{seconds / previous[1]:.2f}" if same and previous else "",
                      f"{events / previous[2]:.2f}" if same and previous else "")
        previous = (quantity, seconds, events)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    args = parser.parse_args()
    console = Console(width=120)
    scale = 0.2 if args.quick else 1.0
    events_per_second(console, scale)
    growth(console, scale)


if __name__ == "__main__":
    main()
