"""A prompt's engine step, the fused blocks against the model's own path, side by side.

The engine sends a prompt chunk of up to `fused.SESSION_POSITIONS` positions through the fused
blocks (runtime/fused.py: the products by oneDNN on the packed weights, norms, rotary, K/V
writes and attention by the kernel's parts); before, a prompt of more than FAST_ROWS positions
sent its whole step by the model's own modules. For each prompt length P, one step of one
session's P-token prompt through every unit of SmolLM2 (fp32, one thread, pinned to core 0
where the machine allows), beside `--decode-rows` other sessions' decode rows, on both paths
in alternating rounds: each path's median seconds, their ratio, and the largest difference of
their logits (the same tokens, fresh caches).

    .venv/bin/python benchmarks/bench_prefill.py [--prompts 8,17,32,62,128,256,512]
        [--decode-rows 0] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from splitllm.runtime.engine import Engine, EngineConfig
from splitllm.runtime.gemv import FastPaths, fast_paths
from splitllm.runtime.metrics import ServerMetrics
from splitllm.runtime.models import load_model
from splitllm.runtime.step import StepRow, run_step
from splitllm.runtime.units import UnitStack

HELD = 20  # the decode rows' context


def one_step(stack: UnitStack, prompt: torch.Tensor, decode_rows: int,
             fused: bool) -> tuple[float, torch.Tensor]:
    """Seconds of one step: the prompt [1, P] beside `decode_rows` sessions' decode rows (each
    with `HELD` positions held); and the prompt's logits [1, V]."""
    n = stack.n_units
    caches = [stack.new_cache(0, n, grown_in_blocks=True) for _ in range(decode_rows + 1)]
    with fast_paths(FastPaths(fused=fused)):
        for cache in caches[1:]:
            run_step(stack, [StepRow(0, n, torch.zeros((1, HELD), dtype=torch.long), 0, cache)])
        rows = [StepRow(0, n, prompt, 0, caches[0]),
                *(StepRow(0, n, torch.ones((1, 1), dtype=torch.long), HELD, cache)
                  for cache in caches[1:])]
        start = time.perf_counter()
        outputs, _ = run_step(stack, rows)
        seconds = time.perf_counter() - start
    logits = outputs[0].out
    assert logits is not None
    return seconds, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", default="8,17,32,62,128,256,512")
    parser.add_argument("--decode-rows", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    model = load_model("smollm2").model
    stack = UnitStack(model)
    Engine(stack, ServerMetrics(stack.names), EngineConfig(), threads=1, start=False)  # the
    # engine's set-up of the stack: packed weights, huge pages, the fused kernel compiled
    generator = torch.Generator().manual_seed(0)
    print(f"SmolLM2 fp32, one thread; a prompt beside {args.decode_rows} decode rows; median of "
          f"{args.rounds} alternating rounds (the first of each path discarded)")
    print("| prompt tokens | model's path (ms) | fused (ms) | fused / model's path | max |logits "
          "difference| |\n|---|---|---|---|---|")
    with torch.inference_mode():
        for tokens in (int(p) for p in args.prompts.split(",")):
            prompt = torch.randint(0, int(model.config.vocab_size), (1, tokens),
                                   generator=generator)
            seconds: dict[bool, list[float]] = {True: [], False: []}
            logits: dict[bool, torch.Tensor] = {}
            for round_index in range(args.rounds + 1):
                for fused in ((True, False) if round_index % 2 else (False, True)):
                    s, logits[fused] = one_step(stack, prompt, args.decode_rows, fused)
                    if round_index:
                        seconds[fused].append(s)
            slow, fast = (statistics.median(seconds[f]) for f in (False, True))
            diff = float((logits[True] - logits[False]).abs().max())
            print(f"| {tokens} | {slow * 1e3:.1f} | {fast * 1e3:.1f} | {fast / slow:.2f} | "
                  f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
