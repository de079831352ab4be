"""Where a forward's time goes inside a real server: timestamps from its message to its reply.

A diagnostic for `loadtest_tails.py --trace-out PATH`: the server child imports this module and
calls `install(PATH)` before it serves; every forward then appends one JSON line to PATH, with
perf-counter times (seconds) at its message (`start`: parsed, before its connection's slot),
its task (`task`), its queue (`put`), the start of each engine step it ran in (`step_start`),
the engine's delivery (`deliver`: its last step done), the event loop's callback (`settle`)
and its reply sent (`sent`), with its `session:seq` (`key`), its units (`units`: [start,
stop)) and its tokens in each step (`step_tokens`). `lines_from` reads them back,
`parts_table` prints each part, `steps_table` prices every real step by the step model for
its own rows.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from splitllm.stepmodel import StepModel, jobs_step_s

PARTS: dict[str, Callable[[dict[str, Any]], float]] = {
    "message -> its task": lambda r: r["task"] - r["start"],
    "task -> queue (checks)": lambda r: r["put"] - r["task"],
    "queue -> its first step": lambda r: r["step_start"][0] - r["put"],
    "its first step -> delivery": lambda r: r["deliver"] - r["step_start"][0],
    "delivery -> event loop's callback": lambda r: r["settle"] - r["deliver"],
    "callback -> reply sent": lambda r: r["sent"] - r["settle"],
    "message -> reply sent": lambda r: r["sent"] - r["start"],
}


def install(path: str) -> None:
    """Wrap the server's connection and engine so that each forward's times go to `path`."""
    from splitllm.runtime import connection, engine

    times: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def mark(key: str, name: str, value: Any, many: bool = False) -> None:
        with lock:
            entry = times.setdefault(key, {})
            if many:
                entry.setdefault(name, []).append(value)
            else:
                entry.setdefault(name, value)

    def done(key: str) -> None:
        with lock:
            entry = times.pop(key, None)
        if entry is not None:
            entry["key"] = key
            with open(path, "a") as out:
                out.write(json.dumps(entry) + "\n")

    def key(header: Any) -> str:
        return f"{header.session}:{header.seq}"

    start_forward, run_forward = connection.Connection._start_forward, \
        connection.Connection._run_forward
    submit, put, run, settle = (engine.Engine.submit, engine.Engine.put, engine.Engine._run,
                                engine._settle)

    async def traced_start(self: Any, header: Any, payload: Any) -> None:
        mark(key(header), "start", time.perf_counter())
        await start_forward(self, header, payload)

    async def traced_run_forward(self: Any, session: Any, header: Any, payload: Any) -> None:
        mark(key(header), "task", time.perf_counter())
        try:
            await run_forward(self, session, header, payload)
        finally:
            mark(key(header), "sent", time.perf_counter())
            done(key(header))

    def traced_submit(self: Any, session: Any, header: Any, payload: Any) -> Any:
        future: Any = submit(self, session, header, payload)
        future.trace_key = key(header)
        return future

    def traced_put(self: Any, job: Any) -> None:
        job_key, deliver = key(job.header), job.deliver

        def traced_deliver(outcome: Any) -> None:
            mark(job_key, "deliver", time.perf_counter())
            deliver(outcome)

        mark(job_key, "put", time.perf_counter())
        job.deliver = traced_deliver
        put(self, job)

    def traced_run(self: Any, picks: list[tuple[Any, int]]) -> None:
        begin = time.perf_counter()  # marked before the step: it delivers what it finishes
        for job, take in picks:
            mark(key(job.header), "step_start", begin, many=True)
            mark(key(job.header), "step_tokens", take, many=True)
            mark(key(job.header), "units", list(job.header.units))
        run(self, picks)

    def traced_settle(future: Any, outcome: Any) -> None:
        if hasattr(future, "trace_key"):
            mark(future.trace_key, "settle", time.perf_counter())
        settle(future, outcome)

    connection.Connection._start_forward = traced_start  # type: ignore[method-assign]
    connection.Connection._run_forward = traced_run_forward  # type: ignore[method-assign]
    engine.Engine.submit = traced_submit  # type: ignore[method-assign]
    engine.Engine.put = traced_put  # type: ignore[method-assign]
    engine.Engine._run = traced_run  # type: ignore[method-assign]
    engine._settle = traced_settle


def lines_from(path: Path, offset: int) -> list[dict[str, Any]]:
    """The complete forwards written to `path` after byte `offset`."""
    if not path.exists():
        return []
    with path.open() as trace:
        trace.seek(offset)
        text = trace.read()
    text = text[:text.rfind("\n") + 1]  # whole lines only: a reply may be being written
    entries = [json.loads(line) for line in text.splitlines()]
    return [e for e in entries if all(n in e for n in ("start", "task", "put", "step_start",
                                                        "deliver", "settle", "sent"))]


def parts_table(entries: Sequence[dict[str, Any]]) -> str:
    """Each part's mean, median and p90 in ms over the forwards."""
    if not entries:
        return "(no forward traced)"
    steps = statistics.fmean(len(e["step_start"]) for e in entries)
    lines = [f"inside the server, {len(entries)} forwards ({steps:.2f} steps each): part mean / "
             "p50 / p90 (ms)"]
    for name, part in PARTS.items():
        ms = sorted(1e3 * part(e) for e in entries)
        lines.append(f"  {name}: {statistics.fmean(ms):.2f} / {ms[len(ms) // 2]:.2f} / "
                     f"{ms[int(0.9 * (len(ms) - 1))]:.2f}")
    return "\n".join(lines)


Step = tuple[float, float, list[tuple[int, int, int]]]  # (start, end, jobs: start, stop, tokens)


def real_steps(entries: Sequence[dict[str, Any]]) -> list[Step]:
    """Every real step, by start: its forwards' shared start, its end the last delivery of
    those whose last step it was (a step that finished none is left out), its rows as the step
    model's jobs."""
    steps: dict[float, list[tuple[dict[str, Any], int]]] = {}
    for e in entries:
        for start, tokens in zip(e["step_start"], e.get("step_tokens", ()), strict=False):
            steps.setdefault(start, []).append((e, tokens))
    out = []
    for t in sorted(steps):
        finished = [e["deliver"] for e, _ in steps[t] if e["step_start"][-1] == t]
        if finished:
            out.append((t, max(finished), [(e["units"][0], e["units"][1], tokens)
                                           for e, tokens in steps[t]]))
    return out


def priced_steps(entries: Sequence[dict[str, Any]], model: StepModel
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Every real step (`real_steps`): its start, its seconds and the step model's seconds for
    its own rows (its units and its seconds per job, as the simulator prices a step); and the
    rows of them all."""
    steps = real_steps(entries)
    return (np.array([start for start, _, _ in steps]),
            np.array([end - start for start, end, _ in steps]),
            np.array([jobs_step_s(model, jobs) for _, _, jobs in steps]),
            sum(len(jobs) for _, _, jobs in steps))


def steps_table(entries: Sequence[dict[str, Any]], model: StepModel) -> str:
    """Every real step beside the step model's seconds for its own rows (`priced_steps`);
    their ratio per step and over each second of the probe."""
    starts, real, priced, rows = priced_steps(entries, model)
    if not len(starts):
        return "(no step's rows traced)"
    ratio = real / priced
    second = np.floor(starts - starts[0]).astype(int)
    windows = " ".join(f"{real[second == k].sum() / priced[second == k].sum():.2f}"
                       for k in np.unique(second))
    return (f"{len(starts)} real steps priced by the step model for their own rows: measured "
            f"{real.sum():.2f} s, the model {priced.sum():.2f} s (its units and "
            f"{model.job_s * 1e3:.2f} ms a job x {rows}); measured over the model per step: "
            f"median {np.median(ratio):.2f}, coefficient of variation "
            f"{ratio.std() / ratio.mean():.2f}; over each second of the probe: {windows}")
