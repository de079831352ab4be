"""`splitllm profile`: this machine as a device profile, and the link to a server, from timings.

The model's units are timed as auto placement times them (`profile_units`: a prefill at several
prompt lengths, a decode step at several contexts up to 1k, medians of rounds, in wall and CPU
seconds). The planner's cost model gives each timing's FLOPs and memory bytes; the roofline's
two peaks (efficiency 1) are fitted to one clock's timings on relative error (`--clock cpu`: a
server's work), so the profile predicts what was measured in the planner's own terms and is
accepted wherever a device preset is (`plan --client`, `simulate`, `generate --client-device`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitllm.errors import UserError
from splitllm.planner.costs import ModelCosts
from splitllm.planner.hardware import DeviceProfile
from splitllm.runtime.profile import PROFILE_CONTEXTS, UnitProfile, profile_units
from splitllm.runtime.units import UnitStack

PROMPT_TOKENS = (16, 64, 128)
CLOCKS = ("wall", "cpu")


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One timed pass of the whole model: a prefill of P tokens or a decode step at a context."""

    kind: str  # "prefill" or "decode"
    tokens: int  # the prompt length, or the decode step's context
    seconds: float  # on the clock the profile is fitted to
    flops: float
    mem_bytes: float
    wall_s: float = 0.0
    cpu_s: float = 0.0


def samples_of(costs: ModelCosts, units: UnitProfile, clock: str = "wall") -> list[Sample]:
    """Each pass of a unit profile, whole-model seconds beside the cost model's FLOPs and bytes."""
    passes = [("prefill", p, wall, cpu) for p, wall, cpu
              in zip(units.prompt_tokens, units.prefill_s, units.prefill_cpu_s, strict=True)]
    passes += [("decode", c, wall, cpu) for c, wall, cpu
               in zip(units.contexts, units.decode_s, units.decode_cpu_s, strict=True)]
    out = []
    for kind, tokens, wall, cpu in passes:
        if kind == "prefill":
            flops = sum(u.prefill_flops(tokens) for u in costs.units)
            mem = sum(u.prefill_bytes(tokens) for u in costs.units)
        else:
            flops = sum(float(u.decode_flops(tokens)) for u in costs.units)
            mem = sum(float(u.decode_bytes(tokens)) for u in costs.units)
        wall_s, cpu_s = sum(wall), sum(cpu)
        out.append(Sample(kind=kind, tokens=tokens, seconds=cpu_s if clock == "cpu" else wall_s,
                          flops=flops, mem_bytes=mem, wall_s=wall_s, cpu_s=cpu_s))
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
                   contexts: Sequence[int] = PROFILE_CONTEXTS, clock: str = "wall"
                   ) -> tuple[DeviceProfile, list[Sample]]:
    """Time this machine on the model (`profile_units`: medians of rounds, both clocks) and fit
    its device profile to one clock's seconds; also return the samples."""
    from splitllm.planner.configs import ModelConfig
    from splitllm.planner.costs import model_costs

    if clock not in CLOCKS:
        raise UserError(f"--clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    costs = model_costs(ModelConfig.from_hf_dict(config), weight_bytes=stack.dtype.itemsize,
                        wire_bytes=stack.dtype.itemsize)
    units = profile_units(stack, prompt_tokens=prompt_tokens, contexts=contexts)
    samples = samples_of(costs, units, clock)
    memory = machine_memory_bytes() or math.inf
    return fit_device(samples, name=name, mem_capacity_bytes=memory), samples


def sample_rows(device: DeviceProfile, samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Each sample with the fitted profile's prediction and its relative error."""
    rows = []
    for s in samples:
        predicted = device.time_s(s.flops, s.mem_bytes)
        rows.append({"kind": s.kind, "tokens": s.tokens, "measured_s": s.seconds,
                     "wall_s": s.wall_s, "cpu_s": s.cpu_s,
                     "predicted_s": predicted, "rel_err": (predicted - s.seconds) / s.seconds})
    return rows
