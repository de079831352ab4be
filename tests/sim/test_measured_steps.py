"""The simulator's batched server on the step model a real engine measured (/v1/info)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from sim_kit import tiny_model, tiny_world

from splitllm.planner.hardware import DeviceProfile
from splitllm.sim.batching import BatchCost
from splitllm.sim.world import ServerSpec
from splitllm.stepmodel import StepModel, UnitFit, jobs_step_s

MEASURED = StepModel(embed=UnitFit(0.001, 0.0001), block=UnitFit(0.2, 0.01),
                     head=UnitFit(0.05, 0.002), n_blocks=1)


def test_measured_steps_replace_the_roofline() -> None:
    world = tiny_world((0.0,), prompt=2, output=2)  # embed, one block, head
    server = DeviceProfile(name="server", peak_flops_per_s=1000.0,
                           mem_bandwidth_bytes_per_s=1000.0, mem_capacity_bytes=1e15,
                           efficiency=1.0)
    world = replace(world, types=(replace(world.types[0], model=tiny_model()),),
                    server=ServerSpec(server, "batched"))
    cost = BatchCost(world, MEASURED)
    decode, prefill, whole = (0, 1, 2, 2, 1), (0, 1, 2, 2, 0), (0, 0, 3, 2, 1)
    assert cost.step_s([decode]) == pytest.approx(0.2 + 0.01)
    # The block runs once for both rows: its fixed time is shared, not paid twice.
    assert cost.step_s([decode, decode]) == pytest.approx(0.2 + 0.02)
    assert cost.step_s([prefill, decode]) == pytest.approx(0.2 + 0.03)
    assert cost.step_s([whole, decode]) == pytest.approx(0.0011 + 0.22 + 0.052)
    assert BatchCost(world).step_s([decode, decode]) != cost.step_s([decode, decode])


def test_jobs_step_s_counts_each_unit_once_over_its_rows() -> None:
    model = replace(MEASURED, n_blocks=3)  # units: embed, 3 blocks, head
    # rows over blocks 1-2 and 2-4: block unit 2 runs once over both rows' tokens
    got = jobs_step_s(model, [(1, 3, 1), (2, 5, 4)])
    want = model.block.seconds(1) + model.block.seconds(5) + model.block.seconds(4) \
        + model.head.seconds(1)
    assert got == pytest.approx(want)
