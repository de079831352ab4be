"""`splitllm profile`: this machine as a device profile, and the link to a server, from timings.

The model's units are timed on random prompts: a prefill at several prompt lengths and a few
decode steps after each (their contexts). The planner's cost model gives each timing's FLOPs and
memory bytes; the roofline's two peaks (efficiency 1) are fitted to the timings on relative
error, so the profile predicts what was measured in the planner's own terms and is accepted
wherever a device preset is (`plan --client`, `simulate` scenarios, `generate --client-device`).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from splitllm.planner.costs import ModelCosts
from splitllm.planner.hardware import DeviceProfile
from splitllm.runtime.units import UnitStack

PROMPT_TOKENS = (16, 64, 128)
DECODE_STEPS = 4


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One timed pass of the whole model: a prefill of P tokens or a decode step at a context."""

    kind: str  # "prefill" or "decode"
    tokens: int  # the prompt length, or the decode step's context
    seconds: float
    flops: float
    mem_bytes: float


def time_passes(stack: UnitStack, prompt_tokens: Sequence[int], decode_steps: int
                ) -> list[tuple[str, int, float]]:
    """(kind, tokens, seconds) of a prefill per length and the decode steps after it."""
    generator = torch.Generator().manual_seed(0)
    longest = max(prompt_tokens) + decode_steps
    ids = torch.randint(0, stack.vocab_size, (1, longest), generator=generator)  # [1, T]
    timed = []
    for round_ in range(2):  # the first round warms up the allocator and kernels
        for length in prompt_tokens:
            cache = stack.new_cache(0, stack.n_units)
            seconds: list[float] = []
            with torch.inference_mode():
                stack.run(0, stack.n_units, ids[:, :length], torch.arange(length)[None], cache,
                          seconds)
                steps = []
                for position in range(length, length + decode_steps):
                    step: list[float] = []
                    stack.run(0, stack.n_units, ids[:, position:position + 1],
                              torch.tensor([[position]]), cache, step)
                    steps.append(sum(step))
            if round_:
                timed.append(("prefill", length, sum(seconds)))
                timed.append(("decode", length + decode_steps // 2 + 1, statistics.median(steps)))
    return timed


def samples_of(costs: ModelCosts, timed: Sequence[tuple[str, int, float]]) -> list[Sample]:
    """Each timing with the cost model's FLOPs and memory bytes of that pass."""
    out = []
    for kind, tokens, seconds in timed:
        if kind == "prefill":
            flops = sum(u.prefill_flops(tokens) for u in costs.units)
            mem = sum(u.prefill_bytes(tokens) for u in costs.units)
        else:
            flops = sum(float(u.decode_flops(tokens)) for u in costs.units)
            mem = sum(float(u.decode_bytes(tokens)) for u in costs.units)
        out.append(Sample(kind=kind, tokens=tokens, seconds=seconds, flops=flops, mem_bytes=mem))
    return out


def fit_device(samples: Sequence[Sample], *, name: str, mem_capacity_bytes: float
               ) -> DeviceProfile:
    """The roofline peaks (efficiency 1) that best predict the samples on relative error."""
    from scipy.optimize import minimize

    flops = np.array([s.flops for s in samples])
    mem = np.array([s.mem_bytes for s in samples])
    seconds = np.array([s.seconds for s in samples])

    def loss(log_peaks: np.ndarray) -> float:
        predicted = np.maximum(flops / np.exp(log_peaks[0]), mem / np.exp(log_peaks[1]))
        return float(np.sum(np.log(predicted / seconds) ** 2))

    start = np.log([np.median(flops / seconds), np.median(mem / seconds)])
    best = minimize(loss, start, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-10})
    peak, bandwidth = (float(v) for v in np.exp(best.x))
    return DeviceProfile(name=name, peak_flops_per_s=peak, mem_bandwidth_bytes_per_s=bandwidth,
                         mem_capacity_bytes=mem_capacity_bytes, efficiency=1.0)


def machine_memory_bytes() -> float:
    """Physical memory of this machine (0 where the OS does not say)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0.0


def profile_device(stack: UnitStack, config: dict[str, Any], *, name: str,
                   prompt_tokens: Sequence[int] = PROMPT_TOKENS,
                   decode_steps: int = DECODE_STEPS) -> tuple[DeviceProfile, list[Sample]]:
    """Time this machine on the model and fit its device profile; also return the samples."""
    from splitllm.planner.configs import ModelConfig
    from splitllm.planner.costs import model_costs

    costs = model_costs(ModelConfig.from_hf_dict(config), weight_bytes=stack.dtype.itemsize,
                        wire_bytes=stack.dtype.itemsize)
    samples = samples_of(costs, time_passes(stack, prompt_tokens, decode_steps))
    memory = machine_memory_bytes() or math.inf
    return fit_device(samples, name=name, mem_capacity_bytes=memory), samples


def sample_rows(device: DeviceProfile, samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Each sample with the fitted profile's prediction and its relative error."""
    rows = []
    for s in samples:
        predicted = device.time_s(s.flops, s.mem_bytes)
        rows.append({"kind": s.kind, "tokens": s.tokens, "measured_s": s.seconds,
                     "predicted_s": predicted, "rel_err": (predicted - s.seconds) / s.seconds})
    return rows
