"""The server's live step model: refitted from the engine's steps, announced in /v1/info."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import numpy as np
import pytest
from runtime_kit import TIMEOUT_S

from splitllm.runtime.client import connect
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.lane import Lap
from splitllm.runtime.live_steps import (
    LIVE,
    MIN_SAMPLES,
    START_UP,
    LiveStepModel,
    StepModels,
    job_s,
    refit_unit,
)
from splitllm.runtime.metrics import parse_metrics
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.profile import UnitProfile
from splitllm.stepmodel import StepModel, UnitFit

START = UnitFit(((1.0, 1.0), (4.0, 2.0), (16.0, 4.0)))


def flat(fit: UnitFit) -> list[float]:
    return [value for point in fit.points for value in point]


def test_a_token_count_with_enough_samples_gets_their_mean_the_rest_scales() -> None:
    # t=1: six samples, mean 1.5 (its own point); t=8: two (too few for a point of its own),
    # each 1.6875x the start-up curve there (2.667 s); the median ratio is 1.5.
    samples = {1: [1.4, 1.6, 1.5, 1.5, 1.5, 1.5], 8: [4.5, 4.5]}
    fitted = refit_unit(START, samples, min_samples=5)
    assert flat(fitted) == pytest.approx([1.0, 1.5, 4.0, 3.0, 16.0, 6.0])


def test_without_samples_the_start_up_curve_stays() -> None:
    assert refit_unit(START, {}) is START


def test_samples_where_the_start_up_curve_had_no_point_add_one() -> None:
    fitted = refit_unit(START, {2: [1.0] * MIN_SAMPLES})
    # ratio 1 / 1.333 = 0.75 scales the start-up points; t=2's own mean is 1.0; then the curve
    # is made non-decreasing (1 -> 0.75, 2 -> 1.0, 4 -> 1.5, 16 -> 3.0)
    assert flat(fitted) == pytest.approx([1.0, 0.75, 2.0, 1.0, 4.0, 1.5, 16.0, 3.0])


def test_a_visits_fixed_part_is_the_mean_of_its_steps_seconds_outside_their_units() -> None:
    visits = [(0.4, 0.2), (0.6, 0.3), (2.0, 0.4)]  # (wall, cpu); one step preempted (wall 2.0)
    assert job_s(visits, min_samples=3) == pytest.approx((1.0, 0.3))
    assert job_s(visits, min_samples=4) is None  # too few steps


def test_a_rare_pause_counts_at_most_ten_medians() -> None:
    # median 0.2: a lane built anew (0.8) counts whole, a 50 s pause as 2.0
    visits = [(0.2, 0.1)] * 3 + [(0.8, 0.4), (50.0, 25.0)]
    assert job_s(visits) == pytest.approx(((0.6 + 0.8 + 2.0) / 5, (0.3 + 0.4 + 1.0) / 5))


def unit_laps(unit_s: dict[int, float], unit_cpu_s: dict[int, float],
              unit_tokens: dict[int, int]) -> list[Lap]:
    """One lap per unit (units timed apart): each its wall, CPU (0 where not timed), tokens."""
    return [Lap(range(u, u + 1), s, unit_cpu_s.get(u, 0.0), unit_tokens[u])
            for u, s in unit_s.items()]


def one_row_step(live: LiveStepModel, blocks: int, block_s: float, outside_s: float,
                 preempted_s: float = 0.0) -> None:
    """A one-row decode step through `blocks` blocks of a 32-unit model: each block block_s,
    outside_s beside them; CPU = wall / 2; the first block preempted for preempted_s more wall
    seconds."""
    unit_s = {1 + b: block_s for b in range(blocks)}
    total_s = block_s * blocks + outside_s
    unit_cpu_s = {u: s / 2 for u, s in unit_s.items()}
    unit_s[1] += preempted_s
    live.record(unit_laps(unit_s, unit_cpu_s, dict.fromkeys(unit_s, 1)), True,
                (total_s + preempted_s, total_s / 2), 1)


def test_the_live_model_charges_a_visit_its_steps_seconds_outside_their_units() -> None:
    """Server-only's and splits' shorter segments: each block its seconds, each visit the
    seconds its steps spent outside their units (a preemption inside them stays there)."""
    start = StepModel(START, START, START, n_blocks=30)
    live = LiveStepModel(StepModels(start, start, START_UP, 0), n_units=32, min_samples=5)
    for blocks in (30, 15, 8, 2) * 5:
        one_row_step(live, blocks, block_s=0.5e-3, outside_s=0.25e-3,
                     preempted_s=3e-3 if blocks == 2 else 0.0)
    models = live.models()
    assert (models.wall.job_s, models.cpu.job_s) == pytest.approx((0.25e-3, 0.125e-3))
    assert models.cpu.block.seconds(1) == pytest.approx(0.25e-3)
    # a step of k blocks is what was measured: k blocks and one visit (CPU: no preemption)
    for k in (8, 30):
        assert models.cpu.step_s(1, 1, blocks=k) - models.cpu.embed.seconds(1) \
            - models.cpu.head.seconds(1) == pytest.approx(k * 0.25e-3 + 0.125e-3)


def test_before_enough_one_row_steps_a_visit_costs_what_it_cost_at_start() -> None:
    start = StepModel(START, START, START, n_blocks=30, job_s=0.001)
    live = LiveStepModel(StepModels(start, start, START_UP, 0), n_units=32, min_samples=5)
    for _ in range(4):
        one_row_step(live, 30, block_s=0.5e-3, outside_s=0.25e-3)
    assert live.models().wall.job_s == 0.001  # the start-up's, unchanged
    one_row_step(live, 30, block_s=0.5e-3, outside_s=0.25e-3)
    assert live.models().wall.job_s == pytest.approx(0.25e-3)


def start_models() -> StepModels:
    wall = StepModel(START, START, START, n_blocks=2, job_s=0.001)
    return StepModels(wall, wall, START_UP, 0)


def test_each_step_is_one_sample_per_kind_and_token_count() -> None:
    live = LiveStepModel(start_models(), n_units=4, min_samples=2)
    assert live.models().source == START_UP and live.models().steps == 0
    for _ in range(2):  # embed 0.5, blocks 3.0 and 5.0 (their mean: 4.0), head 2.0; CPU half
        live.record(unit_laps({0: 0.5, 1: 3.0, 2: 5.0, 3: 2.0},
                              {0: 0.25, 1: 1.5, 2: 2.5, 3: 1.0}, {0: 1, 1: 1, 2: 1, 3: 1}), True)
    models = live.models()
    assert (models.source, models.steps, live.steps) == (LIVE, 2, 2)
    assert flat(models.wall.block)[:2] == pytest.approx([1.0, 4.0])
    assert flat(models.cpu.block)[:2] == pytest.approx([1.0, 2.0])
    assert flat(models.wall.embed)[:2] == pytest.approx([1.0, 0.5])
    assert models.wall.head.seconds(1) == pytest.approx(2.0)
    # the start-up curve's other points at the measured speed (4x at one token), job_s kept
    assert models.wall.block.seconds(16) == pytest.approx(16.0)
    assert models.wall.job_s == 0.001 and models.block_slowdown == (4.0, 2.0)
    assert models.fit_json() == {"source": LIVE, "steps": 2, "block_slowdown": [4.0, 2.0],
                                 "job_s": [0.001, 0.001]}
    assert live.models() is live.models()  # refitted once per new step


def test_samples_older_than_the_horizon_before_the_newest_are_left_out() -> None:
    now = [0.0]
    live = LiveStepModel(start_models(), n_units=4, min_samples=2, horizon_s=60.0,
                         clock=lambda: now[0])

    def blocks(tokens: int, block_s: float) -> None:  # one step of 2 blocks at `tokens`
        live.record(unit_laps({1: block_s, 2: block_s}, {}, {1: tokens, 2: tokens}), False)

    for _ in range(2):  # a loaded minute: a 16-token prefill and a decode at 3x the start-up
        blocks(16, 12.0)
        blocks(1, 3.0)
    assert live.models().wall.block.seconds(16) == pytest.approx(12.0)  # its own point
    now[0] = 60.0  # within the horizon of the newest: the prefill's samples still count
    blocks(1, 1.0)
    assert live.models().wall.block.seconds(16) == pytest.approx(12.0)
    now[0] = 61.0  # now they are older than the horizon: the prefill's count falls back to
    blocks(1, 1.0)  # the start-up curve at the recent decode's speed (1x: 4.0 at 16 tokens)
    models = live.models()
    assert models.wall.block.seconds(1) == pytest.approx(1.0)
    assert models.wall.block.seconds(16) == pytest.approx(4.0)
    assert models.block_slowdown == (1.0, 1.0)
    assert models.wall.embed == START  # a kind the recent steps did not run: as it was


def test_a_unit_not_timed_in_cpu_seconds_counts_its_wall_seconds() -> None:
    live = LiveStepModel(start_models(), n_units=4, min_samples=1)
    live.record(unit_laps({1: 3.0, 2: 3.0}, {}, {1: 4, 2: 4}), False)  # a split's: blocks only
    models = live.models()
    assert models.cpu.block.seconds(4) == pytest.approx(3.0)
    together = LiveStepModel(start_models(), n_units=4, min_samples=1)  # one lap, equal shares
    together.record([Lap(range(1, 3), 6.0, 0.0, 4)], False)
    assert together.models().cpu.block.seconds(4) == pytest.approx(3.0)
    assert models.cpu.embed == START and models.cpu.head == START  # no samples: unchanged


def test_the_server_announces_its_live_step_model_after_steps(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, profile=True)
    info = httpx.get(server.http_url + "/v1/info", timeout=20).json()
    assert info["step_model_fit"] == {"source": START_UP, "steps": 0,
                                      "block_slowdown": [1.0, 1.0], "job_s": [0.0, 0.0]}
    profile = server.state.profile
    assert profile is not None and UnitProfile.from_json(info["profile"]) == profile
    with connect(server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as session:
        n = session.stack.n_units
        session.generate([5, 6, 7], 8, placement="S" * n, chat=False, stop_at_eos=False)
        instance, source = session.instance(8, 4)
    steps = parse_metrics(httpx.get(server.http_url + "/metrics", timeout=20).text)[
        "splitllm_engine_steps_total"]
    info = httpx.get(server.http_url + "/v1/info", timeout=20).json()
    fit = info["step_model_fit"]
    assert (fit["source"], fit["steps"]) == (LIVE, int(steps))
    # the unit profile, timed at start too, at the speed of the blocks' recent steps
    scaled = profile.scaled(*fit["block_slowdown"])
    announced = UnitProfile.from_json(info["profile"])
    for key in ("prefill_s", "decode_s", "prefill_cpu_s", "decode_cpu_s"):
        assert np.ravel(getattr(announced, key)) == pytest.approx(np.ravel(getattr(scaled, key)))
    assert fit["block_slowdown"] != [1.0, 1.0]  # timed, not copied
    assert steps >= 8  # a prefill and 7 decode steps at least
    wall_ms, cpu_ms = (1e3 * s for s in fit["job_s"])  # server-only steps alone: one block
    # count, so the start-up model's seconds per job
    assert (f"live, refitted on {int(steps)} steps, {cpu_ms:.2g} ms of CPU per visit, "
            f"{wall_ms:.2g} ms wall" in source)
    live = StepModel.from_json(info["step_model"])
    start = server.state.step_models.start.wall  # type: ignore[union-attr]
    assert live != start and live.n_blocks == start.n_blocks
    # one row's decode steps ran >= MIN_SAMPLES times: the block's point at 1 token is theirs
    assert any(t == 1.0 for t, _ in live.block.points) and len(instance) == n
