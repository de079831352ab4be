"""Measured per-unit times on this machine: the honest input to `--placement auto`.

Each unit is timed at a few prompt lengths (prefill) and a few context lengths (decode); times
at other lengths come from the cost model's shape fitted to those points per unit:

    prefill_s(P) = fixed + per_token * P + per_pair * P (P + 1) / 2   (weights, linear, attention)
    decode_s(c)  = fixed + per_context * c                             (weights, KV cache reads)

with non-negative coefficients (scipy's NNLS), so a fit never predicts a negative time.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from splitllm.runtime.step import StepRow, StepTimes, run_step
from splitllm.runtime.units import UnitStack
from splitllm.stepmodel import StepModel, fit_unit

PROFILE_PROMPT_TOKENS = (16, 48, 96)  # prefill lengths timed; decode is timed after each
DECODE_STEPS = 3  # decode steps timed per context (their median counts)


def prefill_features(prompt_tokens: np.ndarray) -> np.ndarray:
    """[1, P, causal pairs] per prompt length: the prefill cost model's terms."""
    p = prompt_tokens.astype(float)
    return np.stack([np.ones_like(p), p, p * (p + 1) / 2], axis=-1)  # [N, 3]


def decode_features(contexts: np.ndarray) -> np.ndarray:
    """[1, context] per context length: the decode cost model's terms."""
    c = contexts.astype(float)
    return np.stack([np.ones_like(c), c], axis=-1)  # [N, 2]


def fit_shape(features: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Non-negative coefficients per unit: features [N, K], seconds [N, U] -> [K, U]."""
    return np.stack([nnls(features, seconds[:, u])[0] for u in range(seconds.shape[1])], axis=1)


@dataclass(frozen=True)
class UnitProfile:
    """Seconds per unit, measured at a few prompt lengths (prefill) and contexts (decode)."""

    names: tuple[str, ...]
    prompt_tokens: tuple[int, ...]
    prefill_s: tuple[tuple[float, ...], ...]  # [prompt length][unit]
    contexts: tuple[int, ...]
    decode_s: tuple[tuple[float, ...], ...]  # [context][unit]: one decode step
    threads: int

    @cached_property
    def _prefill_fit(self) -> np.ndarray:  # [3, U]
        return fit_shape(prefill_features(np.array(self.prompt_tokens)), np.array(self.prefill_s))

    @cached_property
    def _decode_fit(self) -> np.ndarray:  # [2, U]
        return fit_shape(decode_features(np.array(self.contexts)), np.array(self.decode_s))

    def scaled(self, factor: float) -> UnitProfile:
        """The same profile on a device `factor` times slower."""
        def times(rows: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
            return tuple(tuple(t * factor for t in row) for row in rows)

        return UnitProfile(names=self.names, prompt_tokens=self.prompt_tokens,
                           prefill_s=times(self.prefill_s), contexts=self.contexts,
                           decode_s=times(self.decode_s), threads=self.threads)

    def prefill_at(self, prompt_tokens: int) -> tuple[float, ...]:
        """Prefill seconds per unit for a prompt of this length (the fitted shape)."""
        row = prefill_features(np.array([prompt_tokens])) @ self._prefill_fit  # [1, U]
        return tuple(float(t) for t in row[0])

    def decode_at(self, context_tokens: int) -> tuple[float, ...]:
        """Seconds per unit of one decode step attending to this many positions."""
        row = decode_features(np.array([context_tokens])) @ self._decode_fit  # [1, U]
        return tuple(float(t) for t in row[0])

    def decode_steps_s(self, prompt_tokens: int, steps: int) -> tuple[float, ...]:
        """Seconds per unit of `steps` decode steps after a prompt (contexts P+1 .. P+steps)."""
        contexts = np.arange(prompt_tokens + 1, prompt_tokens + steps + 1)  # [steps]
        total = decode_features(contexts).sum(axis=0) @ self._decode_fit  # [U]
        return tuple(float(t) for t in total)

    def to_json(self) -> dict[str, Any]:
        """The profile as published in the server's /v1/info."""
        return {"names": list(self.names), "prompt_tokens": list(self.prompt_tokens),
                "prefill_s": [list(row) for row in self.prefill_s],
                "contexts": list(self.contexts), "decode_s": [list(row) for row in self.decode_s],
                "threads": self.threads}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UnitProfile:
        """The profile of a /v1/info document."""
        def rows(key: str) -> tuple[tuple[float, ...], ...]:
            return tuple(tuple(float(t) for t in row) for row in data[key])

        return cls(names=tuple(data["names"]),
                   prompt_tokens=tuple(int(p) for p in data["prompt_tokens"]),
                   prefill_s=rows("prefill_s"), contexts=tuple(int(c) for c in data["contexts"]),
                   decode_s=rows("decode_s"), threads=int(data.get("threads", 0)))


def profile_units(stack: UnitStack, prompt_tokens: tuple[int, ...] = PROFILE_PROMPT_TOKENS,
                  decode_steps: int = DECODE_STEPS) -> UnitProfile:
    """Time every unit on random prompts: a prefill per length, then a few decode steps."""
    device = next(stack.model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    longest = max(prompt_tokens)
    ids = torch.randint(0, stack.vocab_size, (1, longest + decode_steps),
                        generator=generator).to(device)  # [1, P + steps]
    _time_pass(stack, ids, prompt_tokens[0], decode_steps)  # warm up the allocator and kernels
    prefill, decode = [], []
    for length in prompt_tokens:
        prefill_s, decode_steps_s = _time_pass(stack, ids, length, decode_steps)
        prefill.append(prefill_s)
        decode.append(tuple(statistics.median(step[u] for step in decode_steps_s)
                            for u in range(stack.n_units)))
    # The median step attends to the prompt plus about half the steps.
    contexts = tuple(length + (decode_steps + 1) // 2 for length in prompt_tokens)
    return UnitProfile(names=stack.names, prompt_tokens=tuple(prompt_tokens),
                       prefill_s=tuple(prefill), contexts=contexts, decode_s=tuple(decode),
                       threads=torch.get_num_threads())


def _time_pass(stack: UnitStack, ids: torch.Tensor, prompt_tokens: int, decode_steps: int
               ) -> tuple[tuple[float, ...], list[list[float]]]:
    """Unit seconds of a prefill of ids[:, :P] and of each decode step after it."""
    device = ids.device
    cache = stack.new_cache(0, stack.n_units)
    seconds: list[float] = []
    stack.run(0, stack.n_units, ids[:, :prompt_tokens],
              torch.arange(prompt_tokens, device=device)[None], cache, seconds)
    steps = []
    for step in range(decode_steps):
        position = prompt_tokens + step
        step_s: list[float] = []
        stack.run(0, stack.n_units, ids[:, position:position + 1],
                  torch.tensor([[position]], device=device), cache, step_s)
        steps.append(step_s)
    return tuple(seconds), steps


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
