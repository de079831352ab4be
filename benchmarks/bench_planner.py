"""Planner speed: exact, the whole exact frontier, dp-grid and the MILP on the same instances.

Run: .venv/bin/python benchmarks/bench_planner.py [--reps 7] [--instances 5] [--memory]

Random instances of 12, 32, 80 and 160 units (heterogeneous units: every unit has its own
times, work and bytes), then real model instances from build_instance. The SLA is the
latency of the middle plan of the frontier, so it binds. dp-grid runs at step = SLA / 1000.
Times are medians over repetitions and instances (time.perf_counter), in milliseconds.
--memory adds random instances with a binding client-memory limit (a third cost dimension).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from splitllm.planner.configs import MODEL_CONFIGS
from splitllm.planner.costs import model_costs
from splitllm.planner.hardware import DEVICE_PRESETS, LINK_PRESETS
from splitllm.planner.instance import Instance, Request, Unit, build_instance
from splitllm.planner.network import Link
from splitllm.planner.solvers import frontier, solve

SIZES = (12, 32, 80, 160)


def random_instance(rng: np.random.Generator, n: int, memory: bool = False) -> Instance:
    """n heterogeneous units; the server is 3-30x faster; 10 kB - 10 MB cross per switch."""
    client_s = rng.uniform(0.05, 1.0, n)
    server_s = client_s / rng.uniform(3.0, 30.0, n)
    work = server_s * rng.uniform(0.5, 2.0, n)
    out_bytes = 10.0 ** rng.uniform(4, 7, n)
    mem = rng.uniform(1e8, 1e9, n)
    units = tuple(Unit(name=f"u{i}", client_s=float(client_s[i]), server_s=float(server_s[i]),
                       server_work=float(work[i]), out_bytes=float(out_bytes[i]),
                       client_mem_bytes=float(mem[i])) for i in range(n))
    up = 10.0 ** rng.uniform(6, 8)
    return Instance(
        units=units,
        link=Link(uplink_bytes_per_s=up, downlink_bytes_per_s=up * rng.uniform(1.0, 8.0),
                  rtt_s=float(rng.uniform(0.0, 0.1))),
        sla_s=math.inf, input_bytes=float(10.0 ** rng.uniform(3, 6)),
        output_bytes=float(10.0 ** rng.uniform(1, 4)), passes=int(rng.choice([1, 4])),
        client_mem_limit_bytes=float(mem.sum() * rng.uniform(0.3, 0.7)) if memory else math.inf,
    )


def with_binding_sla(instance: Instance) -> tuple[Instance, int]:
    """The instance with its SLA at the middle frontier plan's latency; the frontier size."""
    front = frontier(instance)
    return replace(instance, sla_s=front[len(front) // 2].latency_s), len(front)


def model_instance(model: str, client: str, link: str, sla_s: float) -> Instance:
    return build_instance(model_costs(MODEL_CONFIGS[model]), DEVICE_PRESETS[client],
                          DEVICE_PRESETS["datacenter-gpu"], LINK_PRESETS[link],
                          Request(prompt_tokens=512, output_tokens=8, sla_s=sla_s))


def median_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@dataclass
class Row:
    case: str
    units: int
    frontier_size: float
    exact_ms: float
    frontier_ms: float
    dp_grid_ms: float
    milp_ms: float


def measure(case: str, instances: list[Instance], reps: int) -> Row:
    """Per instance the median of `reps` runs of each solver; then the median over instances."""
    cols: dict[str, list[float]] = {k: [] for k in ("size", "exact", "frontier", "dp", "milp")}
    for base in instances:
        instance, size = with_binding_sla(base)
        step = instance.sla_s / 1000
        cols["size"].append(size)
        cols["exact"].append(median_ms(partial(solve, instance, "exact"), reps))
        cols["frontier"].append(median_ms(partial(frontier, instance), reps))
        cols["dp"].append(median_ms(partial(solve, instance, "dp-grid", step), reps))
        cols["milp"].append(median_ms(partial(solve, instance, "milp"), max(3, reps // 2)))
    med = {k: statistics.median(v) for k, v in cols.items()}
    return Row(case, len(instances[0]), med["size"], med["exact"], med["frontier"], med["dp"],
               med["milp"])


def print_table(rows: list[Row]) -> None:
    head = (f"{'instance':<34}{'units':>6}{'front':>7}{'exact ms':>10}{'frontier ms':>13}"
            f"{'dp-grid ms':>12}{'MILP ms':>10}{'MILP/exact':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.case:<34}{r.units:>6}{r.frontier_size:>7.0f}{r.exact_ms:>10.2f}"
              f"{r.frontier_ms:>13.2f}{r.dp_grid_ms:>12.2f}{r.milp_ms:>10.2f}"
              f"{r.milp_ms / r.exact_ms:>11.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="repetitions per solver and instance")
    parser.add_argument("--instances", type=int, default=5, help="random instances per size")
    parser.add_argument("--memory", action="store_true",
                        help="also random instances with a binding memory limit (slow)")
    args = parser.parse_args()
    solve(model_instance("gpt2", "laptop", "wifi", 1.0), "milp")  # import scipy's MILP first

    rows = []
    for n in SIZES:
        rng = np.random.default_rng(n)
        instances = [random_instance(rng, n) for _ in range(args.instances)]
        rows.append(measure(f"random, {n} units", instances, args.reps))
    for model, client, link, sla_s in (
        ("smollm2-135m", "phone", "5g", 1.0),
        ("llama-3-8b", "laptop", "wifi", 3.0),
        ("llama-2-70b", "laptop", "wifi", 30.0),
        ("llama-2-70b", "phone", "4g", 20.0),
    ):
        # A model instance's own SLA is replaced by the middle frontier plan's latency.
        instance = model_instance(model, client, link, sla_s)
        rows.append(measure(f"{model} {client} {link} (mem)", [instance], args.reps))
    if args.memory:
        for n in (12, 20, 28):
            rng = np.random.default_rng(100 + n)
            instances = [random_instance(rng, n, memory=True) for _ in range(args.instances)]
            rows.append(measure(f"random + memory limit, {n} units", instances, args.reps))
    print_table(rows)
    print("front: plans on the latency/server-work frontier (median); (mem): the client's "
          "memory limit is part of the instance")


if __name__ == "__main__":
    main()
