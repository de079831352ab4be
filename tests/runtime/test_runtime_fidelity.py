"""The fidelity grid: its arithmetic on a fake bench with known times, one real quick point."""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from scipy import stats

from splitllm.cli import main
from splitllm.placement import Placement
from splitllm.planner.instance import Instance, Unit, evaluate
from splitllm.planner.network import Link, session_open_s
from splitllm.runtime.fidelity import (
    METRICS,
    Condition,
    Figures,
    Rounds,
    Saving,
    close_s,
    measure_point,
    median_figures,
    multi_switch,
    predict,
    promised,
    results_json,
    run_grid,
    saving,
    summarize,
    visit_residual_s,
    wire_bytes,
)
from splitllm.runtime.fidelity_run import (
    FidelityOptions,
    RealBench,
    header_text,
    warm_up_placements,
    write_report,
)
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.wire_bytes import NO_SESSION, SessionBytes, session_bytes

LINK = Link(uplink_bytes_per_s=1e6, downlink_bytes_per_s=2e6, rtt_s=0.02)
# Each metric's measured value is the prediction divided by this: relative error f - 1 exactly.
FACTORS = {"loopback": 1.25, "slow": 0.8}
ONE_ROUND = Rounds(first=1, most=1, half_width_points=2.0)
SESSION = SessionBytes(open_up=100, open_down=400, close_up=40, close_down=160)


def instance(passes: int, client_factor: float) -> Instance:
    """Four units, the blocks 10 ms on the server per pass (half of it CPU seconds: the server's
    work), the client client_factor slower."""
    seconds = (0.001, 0.01, 0.01, 0.002)
    units = tuple(Unit(name=name, client_s=s * passes * client_factor, server_s=s * passes,
                       server_work=s * passes / 2, out_bytes=1000.0 * (i + 1))
                  for i, (name, s) in enumerate(zip(("embed", "b0", "b1", "head"), seconds,
                                                    strict=True)))
    return Instance(units=units, link=LINK, sla_s=float("inf"), input_bytes=64.0 * passes,
                    output_bytes=16.0 * passes, passes=passes)


class FakeBench:
    """Known instances; measurements are the predictions scaled by a known factor."""

    def __init__(self) -> None:
        self.measured: list[tuple[Condition, int, int, str]] = []

    def instances(self, condition: Condition, prompt_tokens: int, new_tokens: int
                  ) -> tuple[Instance, Instance]:
        factor = condition.client_slowdown * 2
        return instance(new_tokens, factor), instance(1, factor)

    def session_bytes(self, condition: Condition, prompt_tokens: int, new_tokens: int,
                      placement: str) -> SessionBytes:
        return SESSION if "S" in placement else NO_SESSION

    def measure(self, condition: Condition, prompt_tokens: int, new_tokens: int,
                placements: Sequence[str], rounds: int) -> dict[str, list[Figures]]:
        measured = {}
        for placement in placements:
            self.measured.append((condition, prompt_tokens, new_tokens, placement))
            whole, first = self.instances(condition, prompt_tokens, new_tokens)
            session = self.session_bytes(condition, prompt_tokens, new_tokens, placement)
            truth = predict(whole, first, Placement(placement), new_tokens, session)
            f = FACTORS["slow" if condition.client_slowdown > 1 else "loopback"]
            measured[placement] = [Figures(**{m: getattr(truth, m) / f for m in METRICS})
                                   ] * rounds
        return measured


def test_predict_follows_the_instance() -> None:
    whole, first = instance(5, 2.0), instance(1, 2.0)
    figures = predict(whole, first, Placement("CSSC"), 5)
    assert figures.e2e_s == pytest.approx(evaluate(whole, Placement("CSSC")).latency_s)
    assert figures.ttft_s == pytest.approx(evaluate(first, Placement("CSSC")).latency_s)
    assert figures.tpot_s == pytest.approx((figures.e2e_s - figures.ttft_s) / 4)
    # The server's work is its CPU seconds; its busy (wall) seconds are its units' latency.
    assert figures.server_cpu_s == pytest.approx(0.02 * 5 / 2)
    assert figures.server_busy_s == pytest.approx(0.02 * 5)
    # A visit's fixed part of the server's steps (job_s, wall; job_work_s, CPU) is in both,
    # per visit and pass: one visit (CSSC) x 5 passes; two visits (SCSC) x 5 passes.
    fixed = replace(whole, job_s=0.003, job_work_s=0.001)
    for placement, visited in (("CSSC", 1), ("SCSC", 2)):
        bare, paid = (predict(w, first, Placement(placement), 5) for w in (whole, fixed))
        assert paid.server_busy_s == pytest.approx(bare.server_busy_s + 0.003 * 5 * visited)
        assert paid.server_cpu_s == pytest.approx(bare.server_cpu_s + 0.001 * 5 * visited)
    # Up after embed (1000 B), down after b1 (3000 B); server-only: the ids and the tokens.
    assert wire_bytes(whole, Placement("CSSC")) == 4000.0
    assert wire_bytes(whole, Placement("SSSS")) == 64.0 * 5 + 16.0 * 5
    assert wire_bytes(whole, Placement("CCCC")) == 0.0


def test_the_session_is_opened_before_the_first_token_and_closed_after_the_last() -> None:
    opening = session_open_s(LINK, SESSION.open_up, SESSION.open_down)
    whole, first = (replace(instance(n, 2.0), session_open_s=opening) for n in (5, 1))
    bare = predict(instance(5, 2.0), instance(1, 2.0), Placement("CSSC"), 5)
    figures = predict(whole, first, Placement("CSSC"), 5, SESSION)
    # A round trip each (RTT 20 ms), the bytes at 1 MB/s up and 2 MB/s down.
    open_s, closing_s = 0.02 + 100 / 1e6 + 400 / 2e6, 0.02 + 40 / 1e6 + 160 / 2e6
    assert opening == pytest.approx(open_s)
    assert close_s(LINK, SESSION) == pytest.approx(closing_s)
    assert figures.ttft_s == pytest.approx(bare.ttft_s + open_s)
    assert figures.e2e_s == pytest.approx(bare.e2e_s + open_s + closing_s)
    assert figures.tpot_s == pytest.approx((figures.e2e_s - figures.ttft_s) / 4)
    assert figures.wire_bytes == bare.wire_bytes + 700
    assert figures.server_cpu_s == bare.server_cpu_s  # the server's work is its units'
    assert close_s(LINK, NO_SESSION) == 0.0
    # A client-only plan opens no session: nothing on top.
    assert predict(whole, first, Placement("CCCC"), 5) == predict(
        instance(5, 2.0), instance(1, 2.0), Placement("CCCC"), 5)


class FakeSession:
    """What `promised` reads of a Session: instances per request, unit names, wire dtype."""

    stack = type("Stack", (), {"names": ("embed", "b0", "b1", "head")})()
    wire_dtype = "float32"

    def instance(self, prompt_tokens: int, new_tokens: int, *devices: object
                 ) -> tuple[Instance, str]:
        return instance(new_tokens, 2.0), "measured"


def test_a_promise_is_for_the_tokens_generated_and_opens_a_session() -> None:
    # The demo's answer ends at EOS after 32 of its 64 tokens: its prediction is for 32.
    placement = Placement("CSSC")
    figures = promised(FakeSession(), placement, 10, 32)  # type: ignore[arg-type]
    opened = session_bytes(placement, FakeSession.stack.names, wire_dtype="float32",
                           prompt_tokens=10, new_tokens=32)
    assert figures == predict(instance(32, 2.0), instance(1, 2.0), placement, 32, opened)
    assert figures.e2e_s < promised(FakeSession(), placement, 10, 64).e2e_s  # type: ignore[arg-type]
    assert opened.total > 0 and figures.wire_bytes == wire_bytes(instance(32, 2.0), placement) \
        + opened.total
    # A given instance (the plan's, with its SLA) is used as it is for the whole generation.
    given = promised(FakeSession(), placement, 10, 32, whole=instance(40, 2.0))  # type: ignore[arg-type]
    assert given.server_cpu_s == pytest.approx(evaluate(instance(40, 2.0), placement).server_work)


def test_a_measured_figure_is_each_metrics_median_over_runs() -> None:
    runs = [Figures(*(float(10 * i + m) for m in range(len(METRICS)))) for i in (3, 1, 2)]
    assert median_figures(runs) == Figures(*(float(20 + m) for m in range(len(METRICS))))
    slow_first = [Figures(ttft_s=9.0, tpot_s=1.0, e2e_s=1.0, server_cpu_s=1.0, wire_bytes=1.0,
                          server_busy_s=1.0), runs[0], runs[1]]
    assert median_figures(slow_first).ttft_s == 10.0 and median_figures(slow_first).tpot_s == 11.0


def test_grid_errors_are_computed_exactly() -> None:
    bench = FakeBench()
    conditions = (Condition(), Condition(link="wifi", client_slowdown=2.0))
    results = run_grid(bench, conditions=conditions, lengths=((8, 4), (16, 1)), sla_factor=1.3,
                       rounds=ONE_ROUND)
    # Every placement of the 4 points once, and server-only once more after the rest.
    assert len(bench.measured) == len(results) + 4
    assert {r.point.placement for r in results} >= {"SSSS", str(multi_switch(4))}
    for r in results:
        f = FACTORS["slow" if r.point.condition.client_slowdown > 1 else "loopback"]
        for metric in METRICS:
            if getattr(r.measured, metric):
                assert r.rel_err(metric) == pytest.approx(f - 1)
    summary = summarize(results)
    assert summary["points"] == len(results)
    for metric in ("ttft_s", "e2e_s", "server_cpu_s"):
        errors = [abs(r.rel_err(metric)) for r in results]
        assert summary["metrics"][metric]["median_abs_rel_err"] == statistics.median(errors)
        assert summary["metrics"][metric]["max_abs_rel_err"] == pytest.approx(0.25)
    # A single output token has no time per output token: those points do not count for tpot.
    tpot_points = [r for r in results if r.point.new_tokens > 1]
    assert summary["metrics"]["tpot_s"]["max_abs_rel_err"] == pytest.approx(
        max(abs(r.rel_err("tpot_s")) for r in tpot_points))


def test_each_placement_is_measured_once_with_all_its_kinds() -> None:
    bench = FakeBench()
    results = run_grid(bench, conditions=(Condition(),), lengths=((8, 4),), sla_factor=3.0,
                       rounds=ONE_ROUND)
    placements = [r.point.placement for r in results]
    assert len(placements) == len(set(placements))
    kinds = [k for r in results for k in r.point.kinds]
    assert sorted(kinds) == sorted(("server-only", "best-single-cut", "exact", "multi-switch"))


def test_saving_and_report(tmp_path: Path) -> None:
    bench = FakeBench()
    results = run_grid(bench, conditions=(Condition(),), lengths=((8, 4),), sla_factor=1.3,
                       rounds=Rounds(first=2, most=5, half_width_points=2.0))
    document = results_json(results)
    for r in results:  # measured = predicted / 1.25: e2e residual 0.2 x predicted e2e
        residual = visit_residual_s(r)
        visits = {"SSSS": 1, "CSSC": 1, "CCCC": 0}.get(r.point.placement)
        if visits is not None:
            assert residual == (None if not visits else
                                pytest.approx(-0.2 * r.predicted.e2e_s / (visits * 4)))
    # Both sides scaled by the same factor: the measured saving equals the planned one, in
    # every round alike, so its interval is a point inside the target.
    for row in document["savings"]:
        assert row["gap_points"] == pytest.approx(0.0, abs=1e-9)
        assert (row["half_width_points"], row["verdict"]) == (0.0, "within")
    splits = len(document["savings"])
    assert splits == len(results) - 1
    assert summarize(results)["saving_verdicts"] == document["saving_verdicts"] == {
        "splits": splits, "within_target": splits, "within": splits, "missed": 0,
        "undecided": 0}
    write_report(results, tmp_path, "EMULATED: nothing (a fake bench)")
    assert json.loads((tmp_path / "results.json").read_text())["points"] == len(results)
    assert "EMULATED" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "predicted_vs_measured.png").stat().st_size > 0


class RoundsBench(FakeBench):
    """Three rounds of each placement, then server-only's last run: the prediction times a
    known factor per run, one set of factors for server-only and another for the splits (a
    slow round falls unevenly)."""

    BASE, SPLIT = (1.0, 1.3, 0.9, 1.1), (1.2, 1.0, 1.1)

    def measure(self, condition: Condition, prompt_tokens: int, new_tokens: int,
                placements: Sequence[str], rounds: int) -> dict[str, list[Figures]]:
        first = rounds == 3  # else server-only's last run
        truth = {p: figures[0] for p, figures in
                 super().measure(condition, prompt_tokens, new_tokens, placements, 1).items()}
        return {p: [Figures(**{m: getattr(truth[p], m) * f for m in METRICS})
                    for f in (self.SPLIT if "C" in p else
                              self.BASE[:3] if first else self.BASE[3:])]
                for p in placements}


def test_the_measured_saving_is_the_mean_of_the_rounds_paired_savings(tmp_path: Path) -> None:
    results = run_grid(RoundsBench(), conditions=(Condition(),), lengths=((8, 4),),
                       sla_factor=1.3, rounds=Rounds(first=3, most=3, half_width_points=2.0))
    base = next(r for r in results if "server-only" in r.point.kinds)
    rows = results_json(results)["savings"]
    assert {row["placement"] for row in rows} == {r.point.placement for r in results} - {"SSSS"}
    write_report(results, tmp_path, "EMULATED: nothing (a fake bench)")
    report = (tmp_path / "report.md").read_text()
    for row in rows:
        split = next(r for r in results if r.point.placement == row["placement"])
        # Measured = the prediction / 1.25 (FakeBench) x the run's factor; each of the split's
        # rounds against the mean of server-only's before and after it: 1.15, 1.15, 1.0.
        ratio = split.predicted.server_cpu_s / base.predicted.server_cpu_s
        paired = (1.2 / 1.15, 1.0 / 1.1, 1.1 / 1.0)
        expected = [1 - ratio * r for r in paired]
        assert row["round_savings"] == pytest.approx(expected)
        assert (row["prompt_tokens"], row["new_tokens"]) == (8, 4)
        assert row["planned_saving"] == pytest.approx(1 - ratio)
        # Their mean 1.0175231 (the medians' ratio, 1.1 / 1.1, would pair the split's third
        # round with server-only's last); the interval: t(0.975, 2 degrees of freedom) = 4.3027
        # x their sd / sqrt(3).
        assert row["measured_saving"] == pytest.approx(1 - ratio * 1.0175230566)
        assert row["gap_points"] == pytest.approx(-100 * ratio * 0.0175230566)
        assert row["rounds"] == 3
        assert row["half_width_points"] == pytest.approx(
            100 * 4.302652729749464 * ratio * statistics.stdev(paired) / 3 ** 0.5)
        # The report shows the mean, its interval and the rounds' range beside the plan.
        assert (f"| 8 / 4 | {'/'.join(row['kinds'])} `{row['placement']}` | "
                f"{row['planned_saving']:.1%} | {row['measured_saving']:.1%} "
                f"± {row['half_width_points']:.1f} | 3 | "
                f"{min(expected):.1%} / {max(expected):.1%} | {row['gap_points']:+.1f} | "
                f"{row['verdict']} |" in report)
    # Every run's figures are kept beside their medians.
    point = results_json(results)["results"][0]
    assert [run["server_cpu_s"] for run in point["runs"]] == pytest.approx(
        [results[0].predicted.server_cpu_s / 1.25 * f for f in RoundsBench.BASE])
    assert point["measured"]["server_cpu_s"] == pytest.approx(
        results[0].predicted.server_cpu_s / 1.25 * 1.05)


def test_a_savings_estimate_and_interval_on_known_numbers() -> None:
    # Mean 0.33, sd sqrt(0.002 / 3); t(0.975, 3 degrees of freedom) = 3.1824.
    four = saving([0.30, 0.34, 0.32, 0.36])
    assert four.estimate == pytest.approx(0.33) and four.rounds == 4
    assert four.half_width == pytest.approx(3.182446305284263 * (0.002 / 3) ** 0.5 / 2)
    assert four.half_width == pytest.approx(0.041085, abs=1e-6)
    # The same rounds twice over: the same mean, a narrower interval (t(0.975, 7) = 2.3646).
    eight = saving([0.30, 0.34, 0.32, 0.36] * 2)
    assert eight.estimate == pytest.approx(0.33)
    assert eight.half_width == pytest.approx(2.364624251592785 * (0.004 / 7) ** 0.5 / 8 ** 0.5)
    # One round has no interval; equal rounds an interval of nothing.
    assert saving([0.4]) == Saving(estimate=0.4, half_width=math.inf, rounds=1)
    assert saving([0.25, 0.25, 0.25]).half_width == 0.0


@pytest.mark.parametrize(("estimate", "half_width", "planned", "verdict"), [
    (0.33, 0.041, 0.33, "undecided"),  # -4.1 to +4.1 points around the plan: either way
    (0.33, 0.01, 0.32, "within"),  # 0 to +2 points: a 3-point miss excluded
    (0.33, 0.029, 0.33, "within"),  # -2.9 to +2.9
    (0.40, 0.02, 0.33, "missed"),  # +5 to +9 points: meeting the target excluded
    (0.26, 0.02, 0.33, "missed"),  # -9 to -5
    (0.37, 0.02, 0.33, "undecided"),  # +2 to +6
    (0.4, math.inf, 0.4, "undecided"),  # one round
])
def test_an_interval_says_whether_a_3_point_miss_is_excluded(
        estimate: float, half_width: float, planned: float, verdict: str) -> None:
    assert Saving(estimate=estimate, half_width=half_width, rounds=9).verdict(planned) == verdict


class ScriptedBench:
    """Server CPU seconds known per placement and round (the round the placement is in, so a
    split's k-th round pairs with server-only's k-th): server-only always 1 s."""

    def __init__(self, cpu_s: dict[str, Sequence[float]]) -> None:
        self.cpu_s = cpu_s
        self.calls: list[tuple[list[str], int]] = []
        self.ran: dict[str, int] = dict.fromkeys(cpu_s, 0)

    def measure(self, condition: Condition, prompt_tokens: int, new_tokens: int,
                placements: Sequence[str], rounds: int) -> dict[str, list[Figures]]:
        self.calls.append((list(placements), rounds))
        runs: dict[str, list[Figures]] = {p: [] for p in placements}
        for _ in range(rounds):
            for p in placements:
                cpu = self.cpu_s[p][self.ran[p] % len(self.cpu_s[p])]
                self.ran[p] += 1
                runs[p].append(Figures(ttft_s=0.1, tpot_s=0.01, e2e_s=0.2, server_cpu_s=cpu,
                                       wire_bytes=1.0, server_busy_s=cpu))
        return runs


def test_only_splits_with_wide_intervals_get_more_rounds_up_to_the_cap(
        capsys: pytest.CaptureFixture[str]) -> None:
    quiet, settling, noisy = "CSSC", "CSCC", "SSCC"
    cpu_s = {"SSSS": [1.0],
             quiet: [0.6],  # every round saves 40%: an interval of nothing at once
             settling: [0.57, 0.64] + [0.6] * 40,  # wide at first, narrows as rounds come
             noisy: [0.5, 0.7]}  # 50% and 30% in turn: never within ±2 points in 12 rounds
    bench = ScriptedBench(cpu_s)
    rounds = Rounds(first=3, most=12, half_width_points=2.0)
    runs = measure_point(bench, Condition(), prompt_tokens=8, new_tokens=4,  # type: ignore[arg-type]
                         placements=list(cpu_s), rounds=rounds)

    def half_width_points(placement: str, n: int) -> float:  # the t interval, restated
        savings = [1 - c for c in (cpu_s[placement] * 12)[:n]]
        return 100 * float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(savings) / n ** 0.5

    # A round counts once server-only has run after it too: after n rounds, n - 1 of them.
    settled_at = 1 + next(n for n in range(2, 12) if half_width_points(settling, n) <= 2.0)
    assert settled_at == 8  # 7 rounds counted: ±3.1 points after 5, ±2.3 after 6, ±1.9 after 7
    assert half_width_points(noisy, 11) > 2.0
    # Server-only and the noisy split ran to the cap, server-only once more after them; the
    # settling split stopped once narrow; the quiet one never ran again: its rounds are the
    # point's first ones.
    assert {p: len(r) for p, r in runs.items()} == {"SSSS": 13, quiet: 3, settling: settled_at,
                                                     noisy: 12}
    assert bench.calls[0] == (list(cpu_s), 3)
    assert bench.calls[1:] == [(["SSSS", settling, noisy], 1)] * (settled_at - 3) + [
        (["SSSS", noisy], 1)] * (12 - settled_at) + [(["SSSS"], 1)]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "splitllm fidelity: loopback, P=8 G=4: 4 placement(s) x 3 rounds"
    assert lines[1].startswith("splitllm fidelity: loopback, P=8 G=4: round 4 of at most 12: "
                               "2 split(s), widest ±")
    assert lines[-1].startswith("splitllm fidelity: loopback, P=8 G=4: round 12 of at most "
                                "12: 1 split(s)")
    assert len(lines) == 1 + 12 - 3
    # Already narrow after the first rounds: no more rounds, whatever the cap.
    calm = ScriptedBench({"SSSS": [1.0], quiet: [0.6]})
    assert len(measure_point(calm, Condition(), prompt_tokens=8, new_tokens=4,  # type: ignore[arg-type]
                             placements=["SSSS", quiet], rounds=rounds)["SSSS"]) == 4
    assert calm.calls == [(["SSSS", quiet], 3), (["SSSS"], 1)]


def test_the_warm_up_runs_server_segments_of_several_lengths() -> None:
    """One row's steps through 30, 15 and 8 blocks of SmolLM2's 32 units: the server's live
    step model holds each kind of visit before the grid is measured (live_steps.job_s)."""
    segments = {placement: [seg.stop - seg.start for seg in Placement(placement).segments()
                            if seg.side == "S"] for placement in warm_up_placements(32)}
    assert list(segments.values()) == [[32], [30], [15, 8]]


def test_a_real_quick_point(tiny_llama: LoadedModel, llama_server: BackgroundServer,
                            capsys: pytest.CaptureFixture[str]) -> None:
    # Two rounds of each placement (one of them counted: server-only has not run after the
    # second yet), then one more of server-only and every other placement, then server-only's
    # last run: one round has no interval.
    opts = FidelityOptions(server=llama_server.ws_url,
                           rounds=Rounds(first=2, most=3, half_width_points=0.001))
    bench = RealBench(tiny_llama, opts)
    try:
        results = run_grid(bench, conditions=(Condition(),), lengths=((8, 3),), sla_factor=1.3,
                           rounds=opts.rounds)
        fixed_costs = bench.fixed_costs()
    finally:
        bench.close()
    # Progress on stderr: the connection's warm-up, then each point before it is measured,
    # then its further round.
    placements = {r.point.placement for r in results}
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == [
        "splitllm fidelity: loopback: connecting, warming up",
        f"splitllm fidelity: loopback, P=8 G=3: {len(placements)} placement(s) x 2 rounds"]
    assert len(lines) == 3 and lines[2].startswith(
        f"splitllm fidelity: loopback, P=8 G=3: round 3 of at most 3: {len(placements) - 1} "
        "split(s)")
    assert {r.point.placement: len(r.runs) for r in results} == {
        p: 3 if "C" in p else 4 for p in placements}
    rows = results_json(results)["savings"]
    assert {row["placement"]: row["rounds"] for row in rows} == {
        p: 3 for p in placements if "C" in p}
    # What the condition's planning measured beside the units, in the report's header.
    assert len(fixed_costs) == 1 and fixed_costs[0].startswith("loopback: RTT")
    assert "a visit" in fixed_costs[0] and "per pass" in fixed_costs[0]
    header = header_text("tiny", opts, server_started=False, fixed_costs=fixed_costs)
    assert f"- measured: {fixed_costs[0]}" in header
    by_kind = {k: r for r in results for k in r.point.kinds}
    server_only = by_kind["server-only"]
    assert server_only.measured.server_cpu_s > 0 and server_only.predicted.server_cpu_s > 0
    assert server_only.measured.wire_bytes > 0
    for r in results:
        no_server = "S" not in r.point.placement
        assert (r.measured.server_cpu_s == 0) == no_server
        assert (r.measured.wire_bytes == 0) == no_server
        assert (r.predicted.wire_bytes == 0) == no_server
        assert r.measured.e2e_s >= r.measured.ttft_s > 0
    # Real frames against the prediction's: the passes' messages and the session's four, the
    # same frames but for digit counts (sequence numbers, positions, token ids, stats).
    for r in results:
        visits = sum(seg.side == "S" for seg in Placement(r.point.placement).segments())
        messages = (4 + 2 * 3 * visits) if visits else 0  # a forward and its reply per pass
        assert abs(r.predicted.wire_bytes - r.measured.wire_bytes) <= 4 * messages


@pytest.mark.parametrize("args", [["--repeats", "0"], ["--sla-factor", "0.5"], ["--threads", "0"]])
def test_bad_fidelity_options_are_one_line_and_exit_2(
        args: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["splitllm", "fidelity", "--quick", *args])
    with pytest.raises(SystemExit) as exited:
        main()  # before any model is loaded or server started
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {args[0]} must be at least 1, got {args[1]}"]


@pytest.mark.parametrize(("args", "got"), [(["--max-rounds", "5"], "5 and 2"),
                                           (["--saving-half-width", "0"], "40 and 0")])
def test_bad_rounds_options_are_one_line_and_exit_2(
        args: list[str], got: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["splitllm", "fidelity", "--quick", *args])
    with pytest.raises(SystemExit) as exited:
        main()  # before any model is loaded or server started
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --max-rounds must be at least --repeats (9) and --saving-half-width above 0, "
        f"got {got}"]
