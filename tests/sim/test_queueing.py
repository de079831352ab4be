"""The server queue against queueing theory: long synthetic runs through the whole simulator."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sim_kit import synthetic_world

from splitllm.sim.dists import Dist
from splitllm.sim.metrics import summarize
from splitllm.sim.run import run_policy

SERVICE_S = 0.01
WARMUP_S = 20.0


def _run(kind: str, rho: float, scheduler: str, duration_s: float, seed: int = 0,
         workers: int = 1):
    service = (Dist("fixed", (SERVICE_S,), integer=False) if kind == "fixed"
               else Dist("exponential", mean_value=SERVICE_S, integer=False))
    world = synthetic_world(service, rho * workers / SERVICE_S, duration_s, scheduler,
                            warmup_s=WARMUP_S, seed=seed, workers=workers)
    rec = run_policy(world, "server-only")
    measured = rec.arrived_at_s >= WARMUP_S
    response = (rec.finished_at_s - rec.arrived_at_s)[measured]
    wait = response - rec.server_work_s[measured]  # no link: response = wait + service
    return world, rec, response, wait


def test_fcfs_deterministic_service_matches_md1() -> None:
    rho = 0.7
    _, _, _, wait = _run("fixed", rho, "fcfs", 2000.0)
    expected = rho * SERVICE_S / (2 * (1 - rho))  # Pollaczek-Khinchine, deterministic service
    assert wait.mean() == pytest.approx(expected, rel=0.05)


def test_fcfs_exponential_service_matches_mm1() -> None:
    rho = 0.5
    _, _, _, wait = _run("exponential", rho, "fcfs", 2000.0)
    expected = rho * SERVICE_S / (1 - rho)  # M/M/1 mean wait in queue
    assert wait.mean() == pytest.approx(expected, rel=0.05)


def test_fcfs_two_workers_match_erlang_c() -> None:
    rho, c = 0.6, 2
    _, _, _, wait = _run("exponential", rho, "fcfs", 1000.0, workers=c)
    a = rho * c  # offered load in Erlangs
    top = a**c / math.factorial(c) / (1 - rho)
    p_wait = top / (sum(a**k / math.factorial(k) for k in range(c)) + top)
    expected = p_wait * SERVICE_S / (c * (1 - rho))
    assert wait.mean() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("kind", ["exponential", "fixed"])
def test_processor_sharing_matches_mg1_ps(kind: str) -> None:
    rho = 0.5
    _, _, response, _ = _run(kind, rho, "ps", 1500.0)
    # M/G/1-PS: mean response = E[S] / (1 - rho), whatever the service distribution
    assert response.mean() == pytest.approx(SERVICE_S / (1 - rho), rel=0.05)


@pytest.mark.parametrize("scheduler", ["fcfs", "ps"])
def test_utilization_is_rate_times_mean_service(scheduler: str) -> None:
    rho = 0.6
    world, rec, _, _ = _run("exponential", rho, scheduler, 600.0, seed=3)
    metrics = summarize(world, rec)
    assert metrics.utilization == pytest.approx(rho, rel=0.02)
    # and busy time is exactly the work charged: every job is served alone at full speed
    assert rec.busy_total_s == pytest.approx(rec.server_work_s.sum(), rel=1e-9)


def test_mm1_response_time_tail() -> None:
    """FCFS M/M/1 response time is exponential with rate mu - lambda: check two quantiles."""
    rho = 0.5
    _, _, response, _ = _run("exponential", rho, "fcfs", 1000.0, seed=1)
    rate = (1 - rho) / SERVICE_S
    for q in (0.5, 0.9):
        assert np.quantile(response, q) == pytest.approx(-math.log(1 - q) / rate, rel=0.05)
