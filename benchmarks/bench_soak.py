"""Soak a real `splitllm serve` process: concurrent split sessions, then open/close cycles.

Reports, for N concurrent sessions of T tokens (embedding and head on the client, every block
on the server, one connection each): errors, sessions with the unsplit model's tokens, the
per-token latency p50/p99 over all decode steps, tokens per second over the whole run; then
the server process's RSS after W warm-up open/close cycles and after C more. The sessions and
cycles are the test suite's (tests/runtime/soak_kit.py).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_soak.py [--sessions 64] [--tokens 32]
        [--cycles 1000] [--model DIR]   (default: the tests' tiny random llama)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "runtime"))
from process_kit import ServerProcess
from runtime_kit import llama_config, save_tiny_model
from soak_kit import concurrent_sessions, cycles, percentile, soak_prompts, unsplit_tokens

from splitllm.runtime.models import load_model
from splitllm.runtime.units import UnitStack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model directory (default: a tiny llama)")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=12)
    parser.add_argument("--warm-up", type=int, default=100)
    parser.add_argument("--cycles", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or save_tiny_model(Path(tmp) / "tiny-llama", llama_config())
        loaded = load_model(model_dir)
        vocab = int(loaded.model.config.vocab_size)
        prompts = soak_prompts(args.sessions, args.prompt_tokens, vocab)
        wants = unsplit_tokens(loaded, prompts, args.tokens)
        server = ServerProcess(model_dir, Path(tmp)).start().wait_serving()
        try:
            began = time.perf_counter()
            runs = concurrent_sessions(loaded, server.ws_url, prompts, wants)
            wall_s = time.perf_counter() - began
            assert server.proc is not None
            process = psutil.Process(server.proc.pid)
            n_units = UnitStack(loaded.model).n_units
            cycles(server.ws_url, n_units, prompts[0], args.warm_up)
            baseline = process.memory_info().rss
            began = time.perf_counter()
            cycles(server.ws_url, n_units, prompts[0], args.cycles)
            cycles_s = time.perf_counter() - began
            after = process.memory_info().rss
        finally:
            server.stop()
    steps_ms = [s * 1000 for run in runs for s in run.token_s]
    table = Table(title=f"soak: {args.sessions} concurrent split sessions x {args.tokens} "
                        f"tokens, then {args.cycles} open/close cycles ({loaded.model_id})")
    for column in ("errors", "unsplit tokens", "per-token p50 ms", "per-token p99 ms",
                   "tokens/s", "RSS baseline MiB", "RSS after MiB", "cycles/s"):
        table.add_column(column)
    table.add_row(str(sum(run.error is not None for run in runs)),
                  f"{sum(run.tokens == run.want for run in runs)}/{len(runs)}",
                  f"{percentile(steps_ms, 0.5):.1f}", f"{percentile(steps_ms, 0.99):.1f}",
                  f"{sum(len(run.tokens) for run in runs) / wall_s:.0f}",
                  f"{baseline / 2**20:.1f}", f"{after / 2**20:.1f} ({after / baseline - 1:+.1%})",
                  f"{args.cycles / cycles_s:.0f}")
    Console(width=140).print(table)
    for run in runs:
        if run.error:
            print(f"error: {run.error}")


if __name__ == "__main__":
    main()
