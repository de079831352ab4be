"""The time of one batched server step, from the cost model's roofline, unit by unit.

A step runs every job of the batch through its units. A unit's time in the step is the
roofline of the whole batch at that unit: the FLOPs of every session it serves, and memory
traffic of its weights once plus every session's KV cache (an embedding table: the rows the
batch looks up, at most the table). Sessions of the same model share weights; different models
run one after the other. A batch of one job takes exactly the job's
solo service time (`instance.phase_times`), so batching only ever helps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from splitllm.planner.costs import ModelCosts, UnitCost
from splitllm.planner.hardware import DeviceProfile
from splitllm.planner.instance import Request, phase_times
from splitllm.planner.speculation import decode_passes
from splitllm.sim.world import RequestType, World
from splitllm.stepmodel import StepModel, UnitFit, jobs_step_s

# (type index, first unit, stop unit, prompt tokens, pass index: 0 = prefill, k = decode step k)
JobShape = tuple[int, int, int, int, int]


@dataclass(frozen=True)
class _Model:
    embed: UnitCost
    block: UnitCost  # every block of a model has the same cost
    head: UnitCost
    n_units: int
    causal: bool


def _work(unit: UnitCost, prompt: int, pass_index: int, causal: bool) -> tuple[float, float]:
    """(FLOPs, KV bytes) a unit spends on one job."""
    if pass_index == 0:
        return unit.prefill_flops(prompt, causal), unit.kv_bytes(prompt)
    ctx = prompt + pass_index
    return unit.decode_flops(ctx), unit.kv_bytes(ctx)


def _weights_read(unit: UnitCost, prompt: int, pass_index: int) -> float:
    """Weight bytes a unit reads for one job (all of them, or an embedding table's rows)."""
    return unit.weight_read_bytes(prompt if pass_index == 0 else 1)


class BatchCost:
    """Step times of batches of jobs on one server device.

    With `measured` (the step model a real engine announces in /v1/info), a step of one
    model's jobs takes what that engine measured instead of the roofline.
    """

    def __init__(self, world: World, measured: StepModel | None = None) -> None:
        self.device: DeviceProfile = world.server.device
        self.measured = measured
        self.types = world.types
        groups: dict[ModelCosts, int] = {}
        self.models: list[_Model] = []
        self.group_of_type: list[int] = []
        for t in world.types:
            if t.model is None:
                self.group_of_type.append(-1)
                continue
            if t.model not in groups:
                u = t.model.units
                groups[t.model] = len(self.models)
                self.models.append(_Model(u[0], u[1], u[-1], len(u), t.decoder))
            self.group_of_type.append(groups[t.model])

    def step_s(self, jobs: list[JobShape]) -> float:
        """Seconds of one step that serves `jobs` together."""
        by_model: dict[int, list[JobShape]] = {}
        for job in jobs:
            by_model.setdefault(self.group_of_type[job[0]], []).append(job)
        return sum(self._model_step_s(self.models[g], js) for g, js in by_model.items())

    def unit_work_s(self, type_index: int, prompt: int, output: int, rows: float) -> np.ndarray:
        """[units] Server-seconds one request's units add to the steps they join when `rows`
        jobs share each step: its own FLOPs and KV reads, and its 1 / rows share of each
        unit's fixed cost (weight reads; a measured step's fixed seconds). At one row: its
        solo time."""
        rtype = self.types[type_index]
        assert rtype.model is not None
        share = 1.0 / max(rows, 1.0)
        measured = self.measured
        if measured is None or measured.n_blocks != len(rtype.model.units) - 2:
            shared = replace(rtype.model, units=tuple(
                replace(u, weight_bytes=u.weight_bytes * share) for u in rtype.model.units))
            times = phase_times(shared, self.device, Request(
                prompt_tokens=prompt, output_tokens=output, speculation=rtype.speculation))
            return times.prefill_s + times.decode_s.sum(axis=1)
        return measured_unit_s(measured, rtype, prompt, output, share)

    def _model_step_s(self, m: _Model, jobs: list[JobShape]) -> float:
        if self.measured is not None and self.measured.n_blocks == m.n_units - 2:
            return jobs_step_s(self.measured, [(a, b, prompt if pass_index == 0 else 1)
                                               for _, a, b, prompt, pass_index in jobs])
        embed_flops = head_flops = embed_read = head_read = 0.0
        embed_used = head_used = False
        edges: list[tuple[int, float, float, int]] = []  # (block position, dF, dKV, d count)
        last = m.n_units - 1
        for _, a, b, prompt, pass_index in jobs:
            if a == 0:
                embed_used = True
                embed_flops += _work(m.embed, prompt, pass_index, m.causal)[0]
                embed_read += _weights_read(m.embed, prompt, pass_index)
            if b == m.n_units:
                head_used = True
                head_flops += _work(m.head, prompt, pass_index, m.causal)[0]
                head_read += _weights_read(m.head, prompt, pass_index)
            lo, hi = max(a, 1), min(b, last)
            if lo < hi:
                flops, kv = _work(m.block, prompt, pass_index, m.causal)
                edges.append((lo, flops, kv, 1))
                edges.append((hi, -flops, -kv, -1))
        total = 0.0
        if embed_used:
            total += self.device.time_s(embed_flops, min(embed_read, m.embed.weight_bytes))
        if head_used:
            total += self.device.time_s(head_flops, min(head_read, m.head.weight_bytes))
        edges.sort(key=lambda e: e[0])
        flops = kv = 0.0
        active, prev = 0, 0
        for pos, d_flops, d_kv, d_count in edges:
            if active and pos > prev:  # blocks [prev, pos) serve the same set of jobs
                total += (pos - prev) * self.device.time_s(flops, m.block.weight_bytes + kv)
            flops, kv, active, prev = flops + d_flops, kv + d_kv, active + d_count, pos
            if not active:  # drop rounding residue between disjoint ranges
                flops = kv = 0.0
        return total


def measured_unit_s(measured: StepModel, rtype: RequestType, prompt: int, output: int,
                    share: float = 1.0) -> np.ndarray:
    """[units] Server-seconds of one request's units in steps a server measured (`measured`),
    its `share` of each unit's fixed seconds per pass (1: alone, the request's solo time).

    Each pass pays the local line of the unit's curve at the step's tokens (1 / share rows:
    the prefill beside the others' decode positions, a decode pass beside theirs): its share
    of the fixed part, all of its own tokens' part."""
    rows = 1.0 / share
    decode = decode_passes(max(output - 1, 0), rtype.speculation) if rtype.decoder else 0
    width = rtype.speculation.positions_per_pass if rtype.speculation else 1
    fits = [measured.embed, *[measured.block] * measured.n_blocks, measured.head]

    def passes_s(fit: UnitFit, passes: int, tokens: int, step_tokens: float) -> float:
        fixed_s, per_token_s = fit.line_at(step_tokens)
        return passes * (fixed_s * share + per_token_s * tokens)

    def unit_s(fit: UnitFit, head: bool) -> float:
        if head:  # one position per pass, beside the other rows' one each
            return passes_s(fit, 1 + decode, 1, rows)
        return (passes_s(fit, 1, prompt, prompt + rows - 1)
                + passes_s(fit, decode, width, rows * width))

    return np.array([unit_s(fit, k == len(fits) - 1) for k, fit in enumerate(fits)])
