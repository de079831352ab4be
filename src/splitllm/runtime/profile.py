"""Measured per-unit times on this machine: the honest input to `--placement auto`."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch

from splitllm.runtime.units import UnitStack


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
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, stack.vocab_size, (1, prompt_tokens), generator=generator)  # [1, P]
    prefill: list[list[float]] = []
    decode: list[list[float]] = []
    for _ in range(2):  # the first round also warms up the allocator and kernels
        cache = stack.new_cache(0, stack.n_units)
        seconds: list[float] = []
        stack.run(0, stack.n_units, ids, torch.arange(prompt_tokens)[None], cache, seconds)
        prefill.append(seconds)
        decode.clear()
        for step in range(decode_steps):
            seconds = []
            token = ids[:, step:step + 1]  # [1, 1]
            position = torch.tensor([[prompt_tokens + step]])
            stack.run(0, stack.n_units, token, position, cache, seconds)
            decode.append(seconds)
    best_prefill = tuple(min(run[u] for run in prefill) for u in range(stack.n_units))
    median_decode = tuple(statistics.median(step[u] for step in decode)
                          for u in range(stack.n_units))
    return UnitProfile(stack.names, prompt_tokens, best_prefill, median_decode,
                       torch.get_num_threads())
