"""Running sweep points: in this process, in a process pool, or on a Ray cluster.

A task is a picklable top-level function and its arguments; every task is deterministic, so
the results are the same whichever backend runs them and in whatever order they finish.
Results come back in task order.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from splitllm.errors import UserError

RAY_HINT = "--ray needs Ray: pip install 'splitllm[ray]'"


@dataclass(frozen=True)
class Backend:
    """Where sweep points run: `jobs` local processes, or a Ray cluster at `ray_address`.

    `ray_address`: "auto" (a running cluster), "local" (start one here with `jobs` CPUs), or
    an address such as "ray://head:10001". With Ray already initialized, that instance is used.
    """

    jobs: int = 1
    ray_address: str | None = None


Task = tuple[Callable[..., Any], tuple[Any, ...]]


def run_tasks(tasks: Sequence[Task], backend: Backend,
              on_done: Callable[[], None] | None = None) -> list[Any]:
    """Run every task and return their results in task order."""
    tick = on_done or (lambda: None)
    if backend.ray_address is not None:
        return _run_ray(tasks, backend, tick)
    if backend.jobs <= 1 or len(tasks) <= 1:
        results = []
        for fn, args in tasks:
            results.append(fn(*args))
            tick()
        return results
    # spawn: workers start clean (no copy of this process's threads, e.g. the progress bar)
    context = multiprocessing.get_context("spawn")
    out: list[Any] = [None] * len(tasks)
    with ProcessPoolExecutor(max_workers=min(backend.jobs, len(tasks)),
                             mp_context=context) as pool:
        futures = {pool.submit(fn, *args): i for i, (fn, args) in enumerate(tasks)}
        for future in as_completed(futures):
            out[futures[future]] = future.result()
            tick()
    return out


def ray_module() -> Any:
    """The `ray` package, or a one-line UserError telling how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(RAY_HINT) from None
    return ray


def _run_ray(tasks: Sequence[Task], backend: Backend, tick: Callable[[], None]) -> list[Any]:
    ray = ray_module()
    if not ray.is_initialized():
        try:
            if backend.ray_address == "local":
                ray.init(num_cpus=max(backend.jobs, 1), include_dashboard=False,
                         log_to_driver=False)
            else:
                ray.init(address=backend.ray_address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--ray {backend.ray_address}: cannot start or reach Ray ({first})"
                            ) from None
    remote = ray.remote(_call)
    refs = [remote.remote(fn, args) for fn, args in tasks]
    index = {ref: i for i, ref in enumerate(refs)}
    out: list[Any] = [None] * len(tasks)
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            out[index[ref]] = ray.get(ref)
            tick()
    return out


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return fn(*args)
