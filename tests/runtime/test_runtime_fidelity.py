"""The fidelity grid: its arithmetic on a fake bench with known times, one real quick point."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from splitllm.cli import main
from splitllm.placement import Placement
from splitllm.planner.instance import Instance, Unit, evaluate
from splitllm.planner.network import Link, session_open_s
from splitllm.runtime.fidelity import (
    METRICS,
    Condition,
    Figures,
    close_s,
    median_figures,
    multi_switch,
    predict,
    promised,
    results_json,
    run_grid,
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
                placements: Sequence[str]) -> dict[str, list[Figures]]:
        measured = {}
        for placement in placements:
            self.measured.append((condition, prompt_tokens, new_tokens, placement))
            whole, first = self.instances(condition, prompt_tokens, new_tokens)
            session = self.session_bytes(condition, prompt_tokens, new_tokens, placement)
            truth = predict(whole, first, Placement(placement), new_tokens, session)
            f = FACTORS["slow" if condition.client_slowdown > 1 else "loopback"]
            measured[placement] = [Figures(**{m: getattr(truth, m) / f for m in METRICS})]
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
    results = run_grid(bench, conditions=conditions, lengths=((8, 4), (16, 1)), sla_factor=1.3)
    assert len(results) == len(bench.measured)
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
    results = run_grid(bench, conditions=(Condition(),), lengths=((8, 4),), sla_factor=3.0)
    placements = [r.point.placement for r in results]
    assert len(placements) == len(set(placements))
    kinds = [k for r in results for k in r.point.kinds]
    assert sorted(kinds) == sorted(("server-only", "best-single-cut", "exact", "multi-switch"))


def test_saving_and_report(tmp_path: Path) -> None:
    bench = FakeBench()
    results = run_grid(bench, conditions=(Condition(),), lengths=((8, 4),), sla_factor=1.3)
    document = results_json(results)
    for r in results:  # measured = predicted / 1.25: e2e residual 0.2 x predicted e2e
        residual = visit_residual_s(r)
        visits = {"SSSS": 1, "CSSC": 1, "CCCC": 0}.get(r.point.placement)
        if visits is not None:
            assert residual == (None if not visits else
                                pytest.approx(-0.2 * r.predicted.e2e_s / (visits * 4)))
    # Both sides scaled by the same factor: the measured saving equals the planned one.
    for row in document["savings"]:
        assert row["gap_points"] == pytest.approx(0.0, abs=1e-9)
    write_report(results, tmp_path, "EMULATED: nothing (a fake bench)")
    assert json.loads((tmp_path / "results.json").read_text())["points"] == len(results)
    assert "EMULATED" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "predicted_vs_measured.png").stat().st_size > 0


class RoundsBench(FakeBench):
    """Three rounds of each placement: the prediction times a known factor per round, one set
    of factors for server-only and another for the splits (a slow round falls unevenly)."""

    BASE, SPLIT = (1.0, 1.3, 0.9), (1.2, 1.0, 1.1)

    def measure(self, condition: Condition, prompt_tokens: int, new_tokens: int,
                placements: Sequence[str]) -> dict[str, list[Figures]]:
        truth = {p: figures[0] for p, figures in
                 super().measure(condition, prompt_tokens, new_tokens, placements).items()}
        return {p: [Figures(**{m: getattr(truth[p], m) * f for m in METRICS})
                    for f in (self.BASE if "C" not in p else self.SPLIT)]
                for p in placements}


def test_the_measured_saving_is_the_median_of_the_rounds_paired_savings(tmp_path: Path
                                                                        ) -> None:
    results = run_grid(RoundsBench(), conditions=(Condition(),), lengths=((8, 4),),
                       sla_factor=1.3)
    base = next(r for r in results if "server-only" in r.point.kinds)
    rows = results_json(results)["savings"]
    assert {row["placement"] for row in rows} == {r.point.placement for r in results} - {"SSSS"}
    write_report(results, tmp_path, "EMULATED: nothing (a fake bench)")
    report = (tmp_path / "report.md").read_text()
    for row in rows:
        split = next(r for r in results if r.point.placement == row["placement"])
        # Measured = the prediction / 1.25 (FakeBench) x the round's factor, paired by round.
        ratio = split.predicted.server_cpu_s / base.predicted.server_cpu_s
        expected = [1 - ratio * s / b for s, b in zip(RoundsBench.SPLIT, RoundsBench.BASE,
                                                      strict=True)]
        assert row["round_savings"] == pytest.approx(expected)
        assert (row["prompt_tokens"], row["new_tokens"]) == (8, 4)
        assert row["planned_saving"] == pytest.approx(1 - ratio)
        # The rounds' split/server-only: 1.2, 0.77, 1.22; their median 1.2 (the medians'
        # ratio, 1.1 / 1.0, would pair the split's third round with server-only's first).
        assert row["measured_saving"] == pytest.approx(1 - ratio * 1.2)
        assert row["gap_points"] == pytest.approx(-100 * ratio * 0.2)
        # The report shows the median and the rounds' range beside the plan.
        assert (f"| 8 / 4 | {'/'.join(row['kinds'])} `{row['placement']}` | "
                f"{row['planned_saving']:.1%} | {row['measured_saving']:.1%} | "
                f"{min(expected):.1%} / {max(expected):.1%} | {row['gap_points']:+.1f} |"
                in report)
    # Every round's figures are kept beside their medians.
    point = results_json(results)["results"][0]
    assert [run["server_cpu_s"] for run in point["runs"]] == pytest.approx(
        [results[0].predicted.server_cpu_s / 1.25 * f for f in RoundsBench.BASE])
    assert point["measured"]["server_cpu_s"] == pytest.approx(
        results[0].predicted.server_cpu_s / 1.25)


def test_the_warm_up_runs_server_segments_of_several_lengths() -> None:
    """What lets the server's live step model tell a visit's fixed cost from a block's: one
    row's steps through 30, 15 and 8 blocks of SmolLM2's 32 units (live_steps.job_fit)."""
    segments = {placement: [seg.stop - seg.start for seg in Placement(placement).segments()
                            if seg.side == "S"] for placement in warm_up_placements(32)}
    assert list(segments.values()) == [[32], [30], [15, 8]]


def test_a_real_quick_point(tiny_llama: LoadedModel, llama_server: BackgroundServer,
                            capsys: pytest.CaptureFixture[str]) -> None:
    opts = FidelityOptions(server=llama_server.ws_url, repeats=1)
    bench = RealBench(tiny_llama, opts)
    try:
        results = run_grid(bench, conditions=(Condition(),), lengths=((8, 3),), sla_factor=1.3)
        fixed_costs = bench.fixed_costs()
    finally:
        bench.close()
    # Progress on stderr: the connection's warm-up, then each point before it is measured.
    placements = len({r.point.placement for r in results})
    assert capsys.readouterr().err.splitlines() == [
        "splitllm fidelity: loopback: connecting, warming up",
        f"splitllm fidelity: loopback, P=8 G=3: {placements} placement(s) x 1 rounds"]
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
