"""Request streams: seeded, the same requests at every rate, shares and distributions honoured."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from splitllm.sim.builtin import builtin_world
from splitllm.sim.dists import Dist, bucket_up
from splitllm.sim.run import run_policy
from splitllm.sim.scenario import load_scenario
from splitllm.sim.workload import sample_workload

SCENARIOS = Path(__file__).parents[2] / "docs" / "scenarios"


def test_same_seed_same_requests_other_seed_others() -> None:
    world = builtin_world("mixed").with_rate(3.0)
    a, b = sample_workload(world), sample_workload(world)
    for name in ("arrived_at_s", "type_index", "class_index", "prompt_tokens", "output_tokens"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = sample_workload(replace(world, seed=world.seed + 1))
    assert not np.array_equal(a.arrived_at_s[:10], c.arrived_at_s[:10])


def test_a_faster_rate_replays_the_same_requests_sooner() -> None:
    world = replace(builtin_world("mixed"), duration_s=2000.0)
    slow = sample_workload(replace(world, rate_per_s=1.0))
    fast = sample_workload(replace(world, rate_per_s=4.0))
    n = len(slow)
    assert len(fast) > 3 * n
    np.testing.assert_allclose(fast.arrived_at_s[:n], slow.arrived_at_s / 4.0, rtol=1e-12)
    for name in ("type_index", "class_index", "prompt_tokens", "output_tokens"):
        np.testing.assert_array_equal(getattr(fast, name)[:n], getattr(slow, name))


def test_shares_and_token_ranges() -> None:
    world = replace(builtin_world("mixed"), duration_s=20000.0, rate_per_s=1.0)
    load = sample_workload(world)
    shares = np.array([t.share for t in world.types])
    counts = np.bincount(load.type_index, minlength=len(shares))
    np.testing.assert_allclose(counts / counts.sum(), shares / shares.sum(), atol=0.01)
    classes = np.bincount(load.class_index) / len(load)
    np.testing.assert_allclose(classes, [0.5, 0.3, 0.2], atol=0.01)
    chat = load.type_index == 0
    assert load.prompt_tokens[chat].min() == 64 and load.prompt_tokens[chat].max() == 512
    assert set(load.output_tokens[chat].tolist()) == {32, 64, 128}
    encoders = np.isin(load.type_index, [2, 3])
    assert (load.output_tokens[encoders] == 1).all()
    gaps = np.diff(load.arrived_at_s)
    assert gaps.mean() == pytest.approx(1.0, rel=0.03)  # Poisson at 1/s
    assert gaps.std() == pytest.approx(1.0, rel=0.05)


def test_distributions_by_inverse_cdf() -> None:
    u = (np.arange(10_000) + 0.5) / 10_000
    uniform = Dist("uniform", low=3, high=6).quantile(u)
    assert sorted(set(uniform.tolist())) == [3, 4, 5, 6]
    assert np.bincount(uniform)[3:].tolist() == [2500] * 4
    choice = Dist("choice", (10, 20), (1, 3)).quantile(u)
    assert (choice == 20).mean() == pytest.approx(0.75)
    logn = Dist("lognormal", low=16, high=2048, median=300, sigma=0.6).quantile(u)
    assert np.median(logn) == pytest.approx(300, abs=1)
    assert logn.min() >= 16 and logn.max() <= 2048
    expo = Dist("exponential", mean_value=0.01, integer=False).quantile(u)
    assert expo.mean() == pytest.approx(0.01, rel=0.01)


def test_plan_buckets_round_up_a_little() -> None:
    for n in range(1, 5000):
        b = bucket_up(n)
        assert n <= b <= max(n, int(n * 2 ** (1 / 8)) + 1)
        assert bucket_up(b) == b
    assert Dist("fixed", (300,)).plan_value(300) == 300
    assert Dist("uniform", low=64, high=300).plan_value(299) == 300  # never past the max


def test_trace_replays_recorded_columns_and_samples_the_rest() -> None:
    world = load_scenario(SCENARIOS / "replay.yaml")
    trace = world.trace
    assert trace is not None
    n = len(trace.arrived_at_s)
    load = sample_workload(replace(world, duration_s=3 * n / world.rate_per_s))  # 3 replays
    assert len(load) == 3 * n
    np.testing.assert_array_equal(load.type_index, np.tile(trace.type_index, 3))
    # one replay lasts n / rate; within it, arrivals keep the trace's spacing
    np.testing.assert_allclose(load.arrived_at_s[n:2 * n] - load.arrived_at_s[:n],
                               n / world.rate_per_s)
    np.testing.assert_allclose(np.diff(load.arrived_at_s[:n]), np.diff(trace.arrived_at_s))
    recorded = np.tile(trace.prompt_tokens, 3)
    np.testing.assert_array_equal(load.prompt_tokens[recorded >= 0], recorded[recorded >= 0])
    sampled = recorded < 0
    chat = load.type_index == 0
    assert (load.prompt_tokens[sampled & chat] == 200).all()  # the types' fixed prompts
    assert (load.prompt_tokens[sampled & ~chat] == 197).all()
    rate = 2 * world.rate_per_s
    twice = sample_workload(replace(world, rate_per_s=rate, duration_s=3 * n / rate))
    np.testing.assert_allclose(twice.arrived_at_s, load.arrived_at_s / 2)


def test_runs_are_deterministic() -> None:
    world = replace(builtin_world("mixed").with_rate(2.0), duration_s=30.0)
    a, b = run_policy(world, "exact-load-aware"), run_policy(world, "exact-load-aware")
    np.testing.assert_array_equal(a.finished_at_s, b.finished_at_s)
    np.testing.assert_array_equal(a.placement_index, b.placement_index)
    assert a.events == b.events
