"""Measured per-unit times on this machine: the honest input to `--placement auto`.

Each unit is timed, in wall and in this thread's CPU seconds, at a few prompt lengths (prefill)
and a few context lengths spanning the model's use (decode: a step after a KV cache filled to
that length, so a 1k context costs one step, not a 1k prefill); each point is the median of a
few rounds (robust to a moment of preemption on a shared machine). Times at other lengths come
from the cost model's shape fitted to those points per unit:

    prefill_s(P) = fixed + per_token * P + per_pair * P (P + 1) / 2   (weights, linear, attention)
    decode_s(c)  = fixed + per_context * c                             (weights, KV cache reads)

with non-negative coefficients (scipy's NNLS), so a fit never predicts a negative time. Wall
seconds predict latency; CPU seconds predict a server's work (what its engine counts).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from splitllm.runtime.step import StepRow, StepTimes, run_step
from splitllm.runtime.units import SegmentCache, UnitStack
from splitllm.stepmodel import StepModel, fit_unit

PROFILE_PROMPT_TOKENS = (8, 32, 96)  # prefill lengths timed
PROFILE_CONTEXTS = (16, 256, 1024)  # decode contexts timed (capped at the model's positions)
PROFILE_ROUNDS = 3  # each point is the median of this many rounds
STEP_ROUNDS = 5  # each step-model sample is the median of this many rounds (after a warm-up)

Rows = tuple[tuple[float, ...], ...]  # [point][unit] seconds


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
    """Seconds per unit, measured at a few prompt lengths (prefill) and contexts (decode).

    prefill_s / decode_s are wall seconds; prefill_cpu_s / decode_cpu_s the same passes in CPU
    seconds (empty: not measured, e.g. an older server's profile). pass_s: the client loop's
    own seconds per forward pass beyond its units (a no-op pass: sampling, bookkeeping).
    """

    names: tuple[str, ...]
    prompt_tokens: tuple[int, ...]
    prefill_s: Rows  # [prompt length][unit]
    contexts: tuple[int, ...]
    decode_s: Rows  # [context][unit]: one decode step
    threads: int
    prefill_cpu_s: Rows = ()
    decode_cpu_s: Rows = ()
    pass_s: float = 0.0

    @cached_property
    def _prefill_fit(self) -> np.ndarray:  # [3, U]
        return fit_shape(prefill_features(np.array(self.prompt_tokens)), np.array(self.prefill_s))

    @cached_property
    def _decode_fit(self) -> np.ndarray:  # [2, U]
        return fit_shape(decode_features(np.array(self.contexts)), np.array(self.decode_s))

    def cpu(self) -> UnitProfile:
        """The same profile in CPU seconds (wall seconds where CPU ones were not measured)."""
        if not self.prefill_cpu_s:
            return self
        return replace(self, prefill_s=self.prefill_cpu_s, decode_s=self.decode_cpu_s)

    def scaled(self, factor: float, cpu_factor: float | None = None) -> UnitProfile:
        """The same profile on a device `factor` times slower (its CPU seconds `cpu_factor`
        times, default the same)."""
        def times(rows: Rows, by: float) -> Rows:
            return tuple(tuple(t * by for t in row) for row in rows)

        cpu = factor if cpu_factor is None else cpu_factor
        return replace(self, prefill_s=times(self.prefill_s, factor),
                       decode_s=times(self.decode_s, factor),
                       prefill_cpu_s=times(self.prefill_cpu_s, cpu),
                       decode_cpu_s=times(self.decode_cpu_s, cpu))

    def emulated(self, slowdown: float) -> UnitProfile:
        """This device emulated `slowdown` times slower, as the client's emulation does it
        (decoding.py): slowdown x its CPU seconds, or its wall seconds where those are longer.
        Scaling the wall seconds instead would scale their waits for the core as well."""
        if slowdown <= 1.0 or not self.prefill_cpu_s:
            return self.scaled(max(slowdown, 1.0))

        def device(wall: Rows, cpu: Rows) -> Rows:
            return tuple(tuple(max(slowdown * c, w) for w, c in zip(walls, cpus, strict=True))
                         for walls, cpus in zip(wall, cpu, strict=True))

        slowed = self.scaled(slowdown)
        return replace(slowed, prefill_s=device(self.prefill_s, self.prefill_cpu_s),
                       decode_s=device(self.decode_s, self.decode_cpu_s))

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

    def kv_reads_s(self, prompt_tokens: int, steps: int) -> np.ndarray:
        """[U] seconds of the KV reads alone of `steps` decode steps after a prompt (the
        context term a step model linear in tokens lacks)."""
        contexts = np.arange(prompt_tokens + 1, prompt_tokens + steps + 1)  # [steps]
        return float(contexts.sum()) * self._decode_fit[1]

    def to_json(self) -> dict[str, Any]:
        """The profile as published in the server's /v1/info."""
        return {"names": list(self.names), "prompt_tokens": list(self.prompt_tokens),
                "prefill_s": [list(row) for row in self.prefill_s],
                "contexts": list(self.contexts), "decode_s": [list(row) for row in self.decode_s],
                "prefill_cpu_s": [list(row) for row in self.prefill_cpu_s],
                "decode_cpu_s": [list(row) for row in self.decode_cpu_s],
                "threads": self.threads, "pass_s": self.pass_s}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UnitProfile:
        """The profile of a /v1/info document (an older one: wall seconds only)."""
        def rows(key: str) -> Rows:
            return tuple(tuple(float(t) for t in row) for row in data.get(key, ()))

        return cls(names=tuple(data["names"]),
                   prompt_tokens=tuple(int(p) for p in data["prompt_tokens"]),
                   prefill_s=rows("prefill_s"), contexts=tuple(int(c) for c in data["contexts"]),
                   decode_s=rows("decode_s"), threads=int(data.get("threads", 0)),
                   prefill_cpu_s=rows("prefill_cpu_s"), decode_cpu_s=rows("decode_cpu_s"),
                   pass_s=float(data.get("pass_s", 0.0)))


@dataclass(frozen=True)
class _Timed:
    """Wall and CPU seconds per unit of one timed pass."""

    wall_s: tuple[float, ...]
    cpu_s: tuple[float, ...]


def profile_units(stack: UnitStack, prompt_tokens: Sequence[int] = PROFILE_PROMPT_TOKENS,
                  contexts: Sequence[int] = PROFILE_CONTEXTS,
                  rounds: int = PROFILE_ROUNDS) -> UnitProfile:
    """Time every unit: a prefill per prompt length and a decode step per context, in rounds."""
    device = next(stack.model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, stack.vocab_size, (1, max(prompt_tokens) + 1),
                        generator=generator).to(device)  # [1, P]
    contexts = tuple(sorted({min(c, stack.max_positions - 2) for c in contexts}))
    _prefill(stack, ids, prompt_tokens[0])  # warm up the allocator and kernels
    prefill: list[list[_Timed]] = [[] for _ in prompt_tokens]
    decode: list[list[_Timed]] = [[] for _ in contexts]
    for _ in range(max(rounds, 1)):  # rounds interleaved: a slow minute spreads over points
        for i, length in enumerate(prompt_tokens):
            prefill[i].append(_prefill(stack, ids, length))
        for i, context in enumerate(contexts):
            decode[i].append(_decode(stack, ids[:, :1], context))
    return UnitProfile(names=stack.names, prompt_tokens=tuple(prompt_tokens),
                       prefill_s=_median(prefill, "wall_s"), contexts=contexts,
                       decode_s=_median(decode, "wall_s"), threads=torch.get_num_threads(),
                       prefill_cpu_s=_median(prefill, "cpu_s"),
                       decode_cpu_s=_median(decode, "cpu_s"))


def _median(points: list[list[_Timed]], clock: str) -> Rows:
    """[point][unit]: the median over rounds of each unit's seconds on that clock."""
    return tuple(tuple(statistics.median(getattr(t, clock)[u] for t in runs)
                       for u in range(len(runs[0].wall_s))) for runs in points)


@torch.inference_mode()
def _prefill(stack: UnitStack, ids: torch.Tensor, prompt_tokens: int) -> _Timed:
    """Unit seconds of a prefill of ids[:, :P] on a fresh cache."""
    wall: list[float] = []
    cpu: list[float] = []
    stack.run(0, stack.n_units, ids[:, :prompt_tokens],
              torch.arange(prompt_tokens, device=ids.device)[None],
              stack.new_cache(0, stack.n_units), wall, unit_cpu_seconds=cpu)
    return _Timed(tuple(wall), tuple(cpu))


@torch.inference_mode()
def _decode(stack: UnitStack, token: torch.Tensor, context: int) -> _Timed:
    """Unit seconds of one decode step at position `context` after a cache of that length."""
    wall: list[float] = []
    cpu: list[float] = []
    stack.run(0, stack.n_units, token, torch.tensor([[context]], device=token.device),
              filled_cache(stack, context), wall, unit_cpu_seconds=cpu)
    return _Timed(tuple(wall), tuple(cpu))


def filled_cache(stack: UnitStack, context: int) -> SegmentCache | None:
    """A cache of the whole model holding `context` positions of random keys and values: a
    decode step's cost depends on how much it reads, not on what."""
    cache = stack.new_cache(0, stack.n_units)
    if cache is None:
        return None
    cfg = stack.config
    heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    device = next(stack.model.parameters()).device
    for block in range(len(cache.layers)):
        kv = torch.randn(1, heads, context, head_dim, dtype=stack.dtype, device=device)
        cache.update(kv, kv.clone(), cache.first_block + block)  # [1, H, c, d] each
    return cache


def measure_step_models(stack: UnitStack, batch_rows: Sequence[int] = (1, 4, 16),
                        prompt_tokens: int = 8, decode_steps: int = 2,
                        rounds: int = STEP_ROUNDS) -> tuple[StepModel, StepModel]:
    """The step model fitted on engine steps, in wall and in CPU seconds: a prefill and a few
    decode steps at each batch size, each sample the median of its rounds. The sessions' caches
    are the server's own (block-grown): the fused decode path (runtime/fused.py) takes only
    those, and a step model timed on others missed it (the demo's plan put the server's work
    1.5-1.8x too high). A first round over every shape is discarded: the first steps of a
    shape ran 10-20% slow (kernels, packed weights, memory touched the first time). The
    server refits this model from its live steps (runtime/live_steps.py)."""
    device = next(stack.model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    n = stack.n_units
    runs: dict[tuple[int, bool], list[StepTimes]] = {}  # (batch, decode) -> every round's
    for round_index in range(max(rounds, 1) + 1):  # rounds interleaved over the batch sizes
        for batch in batch_rows:
            caches = [stack.new_cache(0, n, grown_in_blocks=True) for _ in range(batch)]
            prefill = run_step(stack, _rows(stack, prompt_tokens, 0, generator, device,
                                            caches))[1]
            decode = [run_step(stack, _rows(stack, 1, prompt_tokens + step, generator, device,
                                            caches))[1] for step in range(decode_steps)]
            if round_index:
                runs.setdefault((batch, False), []).append(prefill)
                runs.setdefault((batch, True), []).extend(decode)

    def fitted(clock: str) -> StepModel:
        def sample(unit_runs: list[StepTimes], units: range) -> tuple[int, float]:
            seconds = [statistics.median(getattr(t, clock)[u] for u in units) for t in unit_runs]
            return unit_runs[0].unit_tokens[units[0]], statistics.median(seconds)

        kinds = (range(0, 1), range(1, n - 1), range(n - 1, n))  # embed, every block, head
        embed, block, head = (fit_unit([sample(r, units) for r in runs.values()])
                              for units in kinds)
        return StepModel(embed, block, head, stack.n_blocks)

    return fitted("unit_s"), fitted("unit_cpu_s")


def _rows(stack: UnitStack, tokens: int, position: int, generator: torch.Generator,
          device: torch.device, caches: Sequence[Any] | None = None) -> list[StepRow]:
    caches = caches if caches is not None else [stack.new_cache(0, stack.n_units,
                                                                grown_in_blocks=True)]
    return [StepRow(0, stack.n_units,
                    torch.randint(0, stack.vocab_size, (1, tokens), generator=generator
                                  ).to(device), position, cache) for cache in caches]
