"""Where one session's decode token goes: a per-token timeline of the in-process driver's step.

Wraps the engine's parts (the step, its checks, scheduling, the row, the lane's kernels, the
metrics, the result, the driver's next forward) with `time.perf_counter_ns` timers, runs one
session alone (server-only, SmolLM2 fp32, one thread pinned to core 0, as the benchmark's solo
rounds), and prints each part's mean per token (inclusive: a part's children are inside it)
against the token interval the benchmark's verdict measures, and what no part explains. Each
timer costs ~0.3 us; the garbage collector's pauses are timed by its callbacks. Alternate
`--variant`s in one process to compare (the same rounds, interleaved).

    .venv/bin/python benchmarks/engine_timeline.py [--tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from engine_driver import InProcessDriver
from splitllm.runtime import engine, fused_kernel, lane, sampling, session, step
from splitllm.runtime.engine import EngineConfig
from splitllm.runtime.models import encode_prompt, load_model
from splitllm.runtime.units import UnitStack

PROMPT = "Write a short story about a robot who learns to paint."
_spent_ns: defaultdict[str, int] = defaultdict(int)
_calls: defaultdict[str, int] = defaultdict(int)
_armed = [False]  # timing from the first token on: the prompt's step is not a decode step


def _timed(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def timed(*args: Any, **kwargs: Any) -> Any:
        armed, clock = _armed[0], time.perf_counter_ns()
        try:
            return func(*args, **kwargs)
        finally:
            if armed:
                _spent_ns[name] += time.perf_counter_ns() - clock
                _calls[name] += 1
    return timed


# (owner, attribute, the part's name): inclusive timers, outermost first
PARTS = (
    (engine.Engine, "step", "engine step (all below)"),
    (engine.Engine, "_prepare", "  checks: session.prepare"),
    (engine, "schedule", "  schedule"),
    (engine.Engine, "_row", "  the row (StepRow)"),
    (engine, "run_step", "  run_step (lane below)"),
    (step, "decode_lane", "    decode_lane (holds)"),
    (lane.DecodeLane, "run", "    lane.run (kernels below)"),
    (fused_kernel, "run_blocks", "      run_blocks (30 blocks)"),
    (fused_kernel, "head_rows", "      head_rows (norm + LM head)"),
    (engine.ServerMetrics, "record_step", "  metrics.record_step"),
    (engine.Engine, "_outcome", "  the result (_finish)"),
    (sampling.Sampler, "each", "    sampler"),
    (session.ServerSession, "record", "    session.record"),
    (InProcessDriver, "_settle", "  driver: deliver + next forward"),
    (engine.Engine, "put", "    engine.put"),
)
FINE = (  # --fine: the parts inside the parts above
    (session.ServerSession, "check", "    session.check"),
    (session, "decode_tensor", "    decode_tensor"),
    (session.ServerSession, "_reserve_kv", "    session._reserve_kv"),
    (lane.DecodeLane, "holds", "      lane.holds"),
    (lane.DecodeLane, "_input", "      lane._input"),
    (lane.RotaryTable, "rows", "      rotary rows"),
    (lane.DecodeLane, "_hold", "      lane._hold"),
    (step, "_lane_step", "    _lane_step (lane.run inside)"),
    (InProcessDriver, "_submit", "    driver: its forward (header, payload, put)"),
    (lane.DecodeLane, "_weights_hold", "        lane._weights_hold"),
    (lane, "_build", "      lane._build (spread over the steps)"),
    (lane.RotaryTable, "holds", "        rotary holds"),
)


def install_timers(fine: bool) -> None:
    for owner, attribute, name in PARTS + (FINE if fine else ()):
        setattr(owner, attribute, _timed(name, getattr(owner, attribute)))
    settle = InProcessDriver._settle

    def arm(*args: Any) -> None:
        settle(*args)
        _armed[0] = True

    InProcessDriver._settle = arm  # type: ignore[method-assign]
    clock = [0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            clock[0] = time.perf_counter_ns()
        elif _armed[0]:
            _spent_ns[f"gc generation {info['generation']}"] += time.perf_counter_ns() - clock[0]
            _calls[f"gc generation {info['generation']}"] += 1

    gc.callbacks.append(on_gc)


def one_round(driver: InProcessDriver, ids: list[int], tokens: int) -> tuple[float, dict[str,
                                                                                    float]]:
    """The median token interval (s) of one run and each part's mean ns per decode token."""
    _spent_ns.clear()
    _calls.clear()
    _armed[0] = False
    stamps = driver.run(ids, 1, tokens).stamps[0]
    steps = _calls["engine step (all below)"]
    interval_s = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return interval_s, {name: spent / steps for name, spent in _spent_ns.items()} | {
        "steps": float(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fine", action="store_true", help="time the parts' parts too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {0})
    loaded = load_model("smollm2")
    ids = encode_prompt(loaded, PROMPT)
    driver = InProcessDriver(UnitStack(loaded.model), config=EngineConfig(), client_units=0,
                             client_core=None)
    driver.run(ids, 1, 8)  # warm up: compile, huge pages, packed weights
    install_timers(args.fine)
    rounds = [one_round(driver, ids, args.tokens) for _ in range(args.rounds)]
    names = list(dict.fromkeys(name for _, parts in rounds for name in parts))
    interval_ms = statistics.median(interval for interval, _ in rounds) * 1e3
    print(f"one session, {args.tokens} tokens x {args.rounds} rounds (prompt {len(ids)} tokens),"
          f" load average {os.getloadavg()[0]:.1f}; median of the rounds' means, ms per step:")
    print(f"{'token interval (the verdict measures this)':48s} {interval_ms:8.3f}")
    for name in names:
        values = [parts.get(name, 0.0) for _, parts in rounds]
        scale = 1.0 if name == "steps" else 1e-6
        print(f"{name:48s} {statistics.median(values) * scale:8.3f}")
    step_ms = statistics.median(parts["engine step (all below)"] for _, parts in rounds) * 1e-6
    print(f"{'outside the step (the loop, its lock, wakeups)':48s} {interval_ms - step_ms:8.3f}")
    python_ms = [(parts["engine step (all below)"] - parts["      run_blocks (30 blocks)"]
                  - parts["      head_rows (norm + LM head)"]) * 1e-6 for _, parts in rounds]
    print(f"{'the step outside its two kernels (each round)':48s} "
          + " ".join(f"{ms:.3f}" for ms in python_ms)
          + f"  median {statistics.median(python_ms):.3f}")


if __name__ == "__main__":
    main()
