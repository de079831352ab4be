"""Whole studies: a simulated scenario (capacities and goodput curves) or the paper grid.

Each study is a list of independent, deterministic tasks run by a sweep backend, so
`--jobs N` and Ray give the same numbers as one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from splitllm.sim.capacity import Capacity, find_capacity, first_guess_rate, run_point
from splitllm.sim.metrics import RunMetrics
from splitllm.sim.paper import PaperGrid, PaperPoint, solve_length
from splitllm.sim.sweep import Backend, Task, run_tasks
from splitllm.sim.world import World

CURVE_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # of the largest capacity found
QUICK_FRACTIONS = (0.5, 1.0, 1.5)
Tick = Callable[[], None]


@dataclass(frozen=True)
class SimStudy:
    """Every policy's goodput capacity and its metrics over a range of arrival rates."""

    world: World
    capacities: tuple[Capacity, ...]
    rates_per_s: tuple[float, ...]
    curve: tuple[RunMetrics, ...]  # rate-major: curve[i * len(policies) + k]

    def at(self, rate_index: int) -> tuple[RunMetrics, ...]:
        """Each policy's metrics at one rate of the curve."""
        n = len(self.world.policies)
        return self.curve[rate_index * n:(rate_index + 1) * n]


def quick_world(world: World) -> World:
    """A shorter, coarser version of a world, for tests and CI."""
    sweep = replace(world.sweep, rel_tol=max(world.sweep.rel_tol, 0.15),
                    min_requests=min(world.sweep.min_requests, 60),
                    rates_per_s=world.sweep.rates_per_s[:3])
    return replace(world, duration_s=min(world.duration_s, 60.0),
                   warmup_s=min(world.warmup_s, 10.0), sweep=sweep)


def _curve_rates(world: World, capacities: tuple[Capacity, ...], quick: bool) -> tuple[float, ...]:
    if world.sweep.rates_per_s:
        return world.sweep.rates_per_s
    top = max((c.rate_per_s for c in capacities if math.isfinite(c.rate_per_s)), default=0.0)
    if top <= 0:  # no policy meets the target anywhere: center on a first guess instead
        top = max(first_guess_rate(world, p) for p in world.policies)
    return tuple(f * top for f in (QUICK_FRACTIONS if quick else CURVE_FRACTIONS))


def sim_tasks_count(world: World, quick: bool) -> int:
    """How many tasks a study runs (for a progress bar)."""
    rates = len(world.sweep.rates_per_s) or len(QUICK_FRACTIONS if quick else CURVE_FRACTIONS)
    capacity = len(world.policies) if world.sweep.capacity else 0
    return capacity + rates * len(world.policies)


def run_sim_study(world: World, backend: Backend, quick: bool = False,
                  tick: Tick | None = None) -> SimStudy:
    """Find each policy's capacity, then run every policy at each curve rate."""
    capacities: tuple[Capacity, ...] = ()
    if world.sweep.capacity:
        tasks: list[Task] = [(find_capacity, (world, p)) for p in world.policies]
        capacities = tuple(run_tasks(tasks, backend, tick))
    rates = _curve_rates(world, capacities, quick)
    points: list[Task] = [(run_point, (world, p, r)) for r in rates for p in world.policies]
    curve = tuple(run_tasks(points, backend, tick))
    return SimStudy(world, capacities, rates, curve)


@dataclass(frozen=True)
class PaperStudy:
    """Every grid point of the planning sweep."""

    grid: PaperGrid
    points: tuple[PaperPoint, ...]


def paper_tasks_count(grid: PaperGrid) -> int:
    return sum(len(grid.lengths(m)) for m in grid.models)


def run_paper_study(grid: PaperGrid, backend: Backend, tick: Tick | None = None) -> PaperStudy:
    """Plan every grid point with every policy (one task per model and sequence length)."""
    tasks: list[Task] = [(solve_length, (grid, m, p)) for m in grid.models
                         for p in grid.lengths(m)]
    results = run_tasks(tasks, backend, tick)
    return PaperStudy(grid, tuple(point for chunk in results for point in chunk))
