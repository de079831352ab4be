"""Measured per-unit times on this machine: the honest input to `--placement auto`."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from splitllm.runtime.step import StepRow, StepTimes, run_step
from splitllm.runtime.units import UnitStack
from splitllm.stepmodel import StepModel, fit_unit


@dataclass(frozen=True)
class UnitProfile:
    """Seconds per unit for a prefill of `prompt_tokens` tokens and for one decode step."""

    names: tuple[str, ...]
    prompt_tokens: int
    prefill_s: tuple[float, ...]
    decode_s: tuple[float, ...]
    threads: int

    def scaled(self, factor: float) -> UnitProfile:
        """The same profile on a device `factor` times slower."""
        return UnitProfile(self.names, self.prompt_tokens,
                           tuple(t * factor for t in self.prefill_s),
                           tuple(t * factor for t in self.decode_s), self.threads)

    def prefill_at(self, prompt_tokens: int) -> tuple[float, ...]:
        """Prefill seconds per unit for another prompt length (linear in tokens: small P)."""
        ratio = prompt_tokens / self.prompt_tokens
        return tuple(t * ratio for t in self.prefill_s)

    def to_json(self) -> dict[str, Any]:
        return {"names": list(self.names), "prompt_tokens": self.prompt_tokens,
                "prefill_s": list(self.prefill_s), "decode_s": list(self.decode_s),
                "threads": self.threads}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UnitProfile:
        return cls(tuple(data["names"]), int(data["prompt_tokens"]),
                   tuple(float(t) for t in data["prefill_s"]),
                   tuple(float(t) for t in data["decode_s"]), int(data.get("threads", 0)))


def profile_units(stack: UnitStack, prompt_tokens: int = 32, decode_steps: int = 6) -> UnitProfile:
    """Time every unit on a random prompt: the best of two prefills, the median decode step."""
    device = next(stack.model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, stack.vocab_size, (1, prompt_tokens), generator=generator
                        ).to(device)  # [1, P]
    prefill: list[list[float]] = []
    decode: list[list[float]] = []
    for _ in range(2):  # the first round also warms up the allocator and kernels
        cache = stack.new_cache(0, stack.n_units)
        seconds: list[float] = []
        stack.run(0, stack.n_units, ids, torch.arange(prompt_tokens, device=device)[None], cache,
                  seconds)
        prefill.append(seconds)
        decode.clear()
        for step in range(decode_steps):
            seconds = []
            token = ids[:, step:step + 1]  # [1, 1]
            position = torch.tensor([[prompt_tokens + step]], device=device)
            stack.run(0, stack.n_units, token, position, cache, seconds)
            decode.append(seconds)
    best_prefill = tuple(min(run[u] for run in prefill) for u in range(stack.n_units))
    median_decode = tuple(statistics.median(step[u] for step in decode)
                          for u in range(stack.n_units))
    return UnitProfile(stack.names, prompt_tokens, best_prefill, median_decode,
                       torch.get_num_threads())


def measure_step_model(stack: UnitStack, batch_rows: Sequence[int] = (1, 4, 16),
                       prompt_tokens: int = 16, decode_steps: int = 4) -> StepModel:
    """Fit the step model on engine steps: a prefill and a few decode steps at each batch size.

    Each sample is the fastest of its repeats (a prefill on fresh caches, decode steps), so a
    moment of preemption on a shared machine does not end up in the model.
    """
    device = next(stack.model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    n = stack.n_units
    samples: dict[str, list[tuple[int, float]]] = {"embed": [], "block": [], "head": []}
    run_step(stack, _rows(stack, prompt_tokens, 0, generator, device))  # warm-up
    for batch in batch_rows:
        prefill: list[StepTimes] = []
        for _ in range(2):
            caches = [stack.new_cache(0, n) for _ in range(batch)]
            prefill.append(run_step(stack, _rows(stack, prompt_tokens, 0, generator, device,
                                                 caches))[1])
        decode = [run_step(stack, _rows(stack, 1, prompt_tokens + step, generator, device,
                                        caches))[1] for step in range(decode_steps)]
        for runs in (prefill, decode):
            samples["embed"].append((runs[0].unit_tokens[0], min(t.unit_s[0] for t in runs)))
            samples["block"].append((runs[0].unit_tokens[1], min(
                statistics.median(t.unit_s[u] for u in range(1, n - 1)) for t in runs)))
            samples["head"].append((runs[0].unit_tokens[n - 1],
                                    min(t.unit_s[n - 1] for t in runs)))
    return StepModel(fit_unit(samples["embed"]), fit_unit(samples["block"]),
                     fit_unit(samples["head"]), stack.n_blocks)


def _rows(stack: UnitStack, tokens: int, position: int, generator: torch.Generator,
          device: torch.device, caches: Sequence[Any] | None = None) -> list[StepRow]:
    caches = caches if caches is not None else [stack.new_cache(0, stack.n_units)]
    positions = torch.arange(position, position + tokens, device=device)[None]  # [1, t]
    return [StepRow(0, stack.n_units,
                    torch.randint(0, stack.vocab_size, (1, tokens), generator=generator
                                  ).to(device), positions, cache) for cache in caches]
