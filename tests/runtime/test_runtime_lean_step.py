"""The lean decode step's pieces: the lane's greedy tokens, the step's time by laps, the metrics
folded from laps, histograms by one search per value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from runtime_kit import llama_config
from test_runtime_fused import grown, stack_of

from splitllm.runtime.lane import Lap
from splitllm.runtime.metrics import SECONDS_BOUNDS, Histogram, ServerMetrics
from splitllm.runtime.step import StepRow, run_step, unit_seconds


def test_the_lanes_greedy_token_is_the_argmax_of_its_logits() -> None:
    """Each lane step's row carries np.argmax of the logits it returns (so does the prompt's,
    by the general path's compiled head), and the lengths it advanced in the same call hold
    the new position."""
    stack = stack_of(llama_config())
    caches = [grown(stack), grown(stack)]
    positions = [0, 0]
    rng = np.random.default_rng(0)
    for tokens in (4, 1, 1, 1, 1):
        rows = [StepRow(0, stack.n_units, torch.tensor([rng.integers(3, 300, tokens).tolist()]),
                        p, cache)
                for p, cache in zip(positions, caches, strict=True)]
        outputs, _ = run_step(stack, rows)
        positions = [p + tokens for p in positions]
        for output, cache in zip(outputs, caches, strict=True):
            assert output.error is None and output.out is not None
            assert cache.get_seq_length() == positions[0]
            # the lane's decode steps and the general path's compiled head (the prompt) alike
            assert output.greedy == int(np.argmax(output.out.numpy()[-1]))


def test_unit_seconds_sum_a_units_laps_in_its_range() -> None:
    laps = [Lap(range(0, 1), 1.0, 0.0, 3), Lap(range(1, 5), 4.0, 0.0, 3),
            Lap(range(1, 5), 2.0, 0.0, 3), Lap(range(5, 6), 0.5, 0.0, 1)]
    assert unit_seconds(laps, 0, 6) == (1.0, 1.5, 1.5, 1.5, 1.5, 0.5)
    assert unit_seconds(laps, 2, 5) == (1.5, 1.5, 1.5)
    assert unit_seconds([], 0, 2) == (0.0, 0.0)


def test_metrics_spread_each_lap_over_its_units() -> None:
    metrics = ServerMetrics([f"u{k}" for k in range(4)])
    for _ in range(2):
        metrics.record_step([Lap(range(0, 1), 0.5, 0.0, 2), Lap(range(1, 3), 1.0, 0.0, 2)],
                            rows=2, tokens=2, wall_s=1.5, cpu_s=1.0, queue_waits_s=[0.1])
    metrics.record_step([Lap(range(1, 2), 0.25, 0.0, 7)], rows=1, tokens=7, wall_s=0.25,
                        cpu_s=0.2, queue_waits_s=[])
    assert metrics.unit_busy_s() == pytest.approx({"u0": 1.0, "u1": 1.25, "u2": 1.0})
    tokens, steps = metrics.unit_counts()
    assert tokens == {"u0": 4, "u1": 11, "u2": 4} and steps == {"u0": 2, "u1": 3, "u2": 2}
    assert metrics.busy_s == pytest.approx(3.25) and metrics.steps == 3
    page = metrics.render(open_sessions=0, cache_bytes=0)
    assert 'splitllm_unit_busy_seconds_total{unit="u1"} 1.25' in page
    assert 'splitllm_engine_unit_steps_total{unit="u3"} 0' in page


@given(st.lists(st.sampled_from(SECONDS_BOUNDS) | st.floats(0.0, 20.0), max_size=30))
def test_histogram_buckets_count_the_values_at_or_below_each_bound(values: list[float]) -> None:
    histogram = Histogram(SECONDS_BOUNDS)
    for value in values:
        histogram.observe(value)
    want = [sum(v <= bound for v in values) for bound in SECONDS_BOUNDS] + [len(values)]
    assert [count for _, count in histogram.samples()] == want
    assert histogram.n == len(values) and histogram.total == pytest.approx(sum(values))
