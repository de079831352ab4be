"""How well a measured profile predicts SmolLM2's unit times outside its measured points.

Run: .venv/bin/python benchmarks/bench_profile_fit.py

Profiles the whole model as a server does at start (`profile_units`: prefill at 16/48/96 tokens,
decode after each), then times a prefill of 32 and 256 tokens and a decode step at context ~301
directly, and prints each beside the fitted prediction and the old one-point linear estimate
(the 32-token prefill scaled by P / 32). One thread; figures are wall seconds, so run it on a
quiet machine.
"""

from __future__ import annotations

import statistics
import time

import torch

from splitllm.runtime.models import load_model
from splitllm.runtime.profile import profile_units
from splitllm.runtime.units import UnitStack


def prefill_s(stack: UnitStack, ids: torch.Tensor, tokens: int) -> float:
    """Best of two whole-model prefills of `tokens` tokens."""
    runs = []
    for _ in range(2):
        seconds: list[float] = []
        stack.run(0, stack.n_units, ids[:, :tokens], torch.arange(tokens)[None],
                  stack.new_cache(0, stack.n_units), seconds)
        runs.append(sum(seconds))
    return min(runs)


def decode_s(stack: UnitStack, ids: torch.Tensor, prompt_tokens: int, steps: int = 3) -> float:
    """Median whole-model decode step after a prompt of `prompt_tokens` tokens."""
    cache = stack.new_cache(0, stack.n_units)
    stack.run(0, stack.n_units, ids[:, :prompt_tokens], torch.arange(prompt_tokens)[None], cache)
    times = []
    for k in range(steps):
        seconds: list[float] = []
        p = prompt_tokens + k
        stack.run(0, stack.n_units, ids[:, p:p + 1], torch.tensor([[p]]), cache, seconds)
        times.append(sum(seconds))
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    stack = UnitStack(load_model("smollm2").model)
    clock = time.perf_counter()
    profile = profile_units(stack)
    print(f"profile_units: {time.perf_counter() - clock:.2f} s")
    ids = torch.randint(0, stack.vocab_size, (1, 400), generator=torch.Generator().manual_seed(1))
    at_32 = prefill_s(stack, ids, 32)
    for tokens in (32, 256):
        measured = at_32 if tokens == 32 else prefill_s(stack, ids, tokens)
        print(f"prefill P={tokens}: measured {measured:.3f} s, fitted "
              f"{sum(profile.prefill_at(tokens)):.3f} s, one-point linear "
              f"{at_32 * tokens / 32:.3f} s")
    step_s = decode_s(stack, ids, 299)  # contexts 300..302
    print(f"decode at context ~301: measured {step_s * 1e3:.1f} ms, fitted "
          f"{sum(profile.decode_at(301)) * 1e3:.1f} ms, shortest measured context "
          f"({profile.contexts[0]}) {sum(profile.decode_s[0]) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
