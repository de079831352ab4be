"""Runtime speed, side by side in one run on loopback (no emulation).

- decode tokens/s of split generations against the unsplit model (target >= 0.9x),
- round-trip overhead per token per server segment (one switch up, one down),
- bytes on the wire per decoded token for each wire dtype.

Thread budget: the unsplit model runs with N torch threads; a split runs its client with N
threads and the server (its own process) with N threads. A split pass is strictly sequential
(the client waits while the server computes and vice versa), so at any instant at most N
threads compute in both cases.

    .venv/bin/python benchmarks/bench_runtime.py [--model smollm2] [--threads 1] [--tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from splitllm.placement import Placement
from splitllm.runtime.client import Session, connect
from splitllm.runtime.decoding import LocalPipe, SplitPipe, timed_generation
from splitllm.runtime.demo import free_port, start_server, stop_server, wait_healthy
from splitllm.runtime.models import LoadedModel, encode_prompt, load_model, resolve_model_dir
from splitllm.runtime.units import UnitStack

PROMPT = "Write a short story about a robot who learns to paint."


@dataclass(frozen=True)
class Run:
    """One configuration's decode speed and wire traffic."""

    name: str
    placement: str
    tpot_s: float
    round_trips_per_token: int
    bytes_per_token: float

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.tpot_s


def local_run(loaded: LoadedModel, ids: list[int], tokens: int
              ) -> Callable[[], tuple[float, float]]:
    def run() -> tuple[float, float]:
        timed = timed_generation(LocalPipe(loaded.model), ids, tokens)
        return timed.tpot_s, 0
    return run


def sliced_run(loaded: LoadedModel, ids: list[int], tokens: int
               ) -> Callable[[], tuple[float, float]]:
    stack = UnitStack(loaded.model)

    def run() -> tuple[float, float]:
        pipe = SplitPipe(stack, Placement("C" * stack.n_units), None)
        return timed_generation(pipe, ids, tokens).tpot_s, 0
    return run


def split_run(session: Session, ids: list[int], tokens: int, placement: str
              ) -> Callable[[], tuple[float, float]]:
    # Decode traffic only: what a generation moves beyond a prefill-only (1 token) generation.
    first = session.generate(ids, 1, placement=placement, stop_at_eos=False)
    prefill_bytes = first.bytes_sent + first.bytes_received

    def run() -> tuple[float, float]:
        result = session.generate(ids, tokens, placement=placement, stop_at_eos=False)
        decode_bytes = result.bytes_sent + result.bytes_received - prefill_bytes
        return result.tpot_s, decode_bytes / (len(result.tokens) - 1)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    console = Console(width=120)
    torch.set_num_threads(args.threads)
    resolve_model_dir(args.model)
    loaded = load_model(args.model)
    ids = encode_prompt(loaded, PROMPT)
    n = UnitStack(loaded.model).n_units
    half = n // 2
    placements = {
        "all-server": ("S" * n, 1),
        "half (C..C S..S)": ("C" * half + "S" * (n - half), 1),
        "3 switches (C S C S)": ("C" * (half // 2) + "S" * (half - half // 2)
                                 + "C" * (half // 2) + "S" * (n - half - half // 2), 2),
        "5 switches (C S C S C S)": _alternating(n, 6),
    }
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc = start_server(args.model, port, log, threads=args.threads)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc, log)
            runs = _measure(loaded, ids, args, placements, f"ws://127.0.0.1:{port}")
        finally:
            stop_server(proc)
    _print(console, runs, args, loaded, len(ids))


def _alternating(n: int, segments: int) -> tuple[str, int]:
    size = n // segments
    sides = "".join(("C" if i % 2 == 0 else "S") * size for i in range(segments - 1))
    sides += "S" * (n - len(sides))
    return sides, segments // 2


def _measure(loaded: LoadedModel, ids: list[int], args: argparse.Namespace,
             placements: dict[str, tuple[str, int]], url: str) -> list[Run]:
    n = len(placements["all-server"][0])
    half, half_trips = placements["half (C..C S..S)"]
    with connect(url, loaded) as fp32, connect(url, loaded, wire_dtype="bf16") as bf16, \
            connect(url, loaded, wire_dtype="fp16") as fp16:
        fp32.generate(ids, 2, placement="S" * n)  # warm up the server
        configs: list[tuple[str, str, int, Callable[[], tuple[float, float]]]] = [
            ("unsplit (HF forward)", "local", 0, local_run(loaded, ids, args.tokens)),
            ("units in-process (all C)", "C" * n, 0, sliced_run(loaded, ids, args.tokens)),
            *[(name, placement, trips, split_run(fp32, ids, args.tokens, placement))
              for name, (placement, trips) in placements.items()],
            ("half, bf16 wire", half, half_trips, split_run(bf16, ids, args.tokens, half)),
            ("half, fp16 wire", half, half_trips, split_run(fp16, ids, args.tokens, half)),
        ]
        # Rounds interleave the configurations, so that load from other processes on a
        # shared machine hits all of them alike; the best round of each is reported.
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in configs}
        for _ in range(args.rounds):
            for name, _, _, run in configs:
                samples[name].append(run())
    return [Run(name, placement, min(t for t, _ in samples[name]), trips,
                statistics.median(b for _, b in samples[name]))
            for name, placement, trips, _ in configs]


def _print(console: Console, runs: list[Run], args: argparse.Namespace, loaded: LoadedModel,
           prompt_tokens: int) -> None:
    base = runs[0]
    local_units = runs[1]
    table = Table(title=f"Decode speed on loopback: {loaded.model_id}, {args.threads} thread(s) "
                        f"per process, prompt {prompt_tokens} tokens, {args.tokens} new tokens, "
                        f"best of {args.rounds} interleaved rounds")
    for column in ("configuration", "placement", "tokens/s", "vs unsplit", "TPOT ms",
                   "overhead ms / round trip", "wire bytes / token"):
        table.add_column(column, justify="left" if column in ("configuration", "placement")
                         else "right")
    for run in runs:
        overhead = ""
        if run.round_trips_per_token:
            extra_s = (run.tpot_s - local_units.tpot_s) / run.round_trips_per_token
            overhead = f"{extra_s * 1e3:.2f}"
        table.add_row(run.name, _compact(run.placement), f"{run.tokens_per_s:.2f}",
                      f"{run.tokens_per_s / base.tokens_per_s:.3f}x", f"{run.tpot_s * 1e3:.1f}",
                      overhead, f"{run.bytes_per_token:,.0f}" if run.bytes_per_token else "")
    console.print(table)
    console.print("round trip = one server segment per pass (hidden states up, output down); "
                  "overhead is measured against the same units run in-process")


def _compact(sides: str) -> str:
    if sides == "local":
        return sides
    return " ".join(f"{s.side}{s.stop - s.start}" for s in Placement(sides).segments())


if __name__ == "__main__":
    clock = time.perf_counter()
    main()
    print(f"benchmark took {time.perf_counter() - clock:.0f} s")
