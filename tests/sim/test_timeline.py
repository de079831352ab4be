"""Exact event timelines on tiny hand-made workloads, and batched step times by hand."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from sim_kit import synthetic_world, tiny_model, tiny_world

from splitllm.placement import Placement
from splitllm.planner.costs import UnitCost
from splitllm.planner.hardware import DeviceProfile
from splitllm.planner.network import Link
from splitllm.sim.batching import BatchCost
from splitllm.sim.builtin import builtin_world
from splitllm.sim.dists import Dist
from splitllm.sim.run import run_policy
from splitllm.sim.walk import WalkBuilder
from splitllm.sim.world import ServerSpec, Trace

ONE_S = Dist("fixed", (1.0,), integer=False)
HALF_RTT = Link(name="rtt", uplink_bytes_per_s=1e15, downlink_bytes_per_s=1e15, rtt_s=0.2)


def _same(log: tuple[tuple[int, int, float, float], ...], expected: list[tuple]) -> None:
    assert [row[:2] for row in log] == [row[:2] for row in expected]
    np.testing.assert_allclose([row[2:] for row in log], [row[2:] for row in expected],
                               rtol=1e-12, atol=1e-12)


def _two_jobs(scheduler: str):
    trace = Trace((0.0, 0.5), (0, 0))  # one replay lasts 1 s at its own rate of 2/s
    world = synthetic_world(ONE_S, trace.natural_rate_per_s, trace.period_s, scheduler,
                            link=HALF_RTT, trace=trace)
    return run_policy(world, "server-only", log=True)


def test_fcfs_second_request_waits_for_the_first() -> None:
    rec = _two_jobs("fcfs")
    # r0: 0.1 s up, served 0.1-1.1, 0.1 s down; r1 reaches the server at 0.6, waits until 1.1
    _same(rec.job_log, [(0, 0, 0.1, 1.1), (1, 0, 0.6, 2.1)])
    assert rec.finished_at_s.tolist() == pytest.approx([1.2, 2.2])


def test_processor_sharing_splits_the_server() -> None:
    rec = _two_jobs("ps")
    # r0 alone 0.1-0.6 (half done), then both at half speed: r0 ends at 1.6; r1 has 0.5 done
    # by then and finishes alone at 2.1
    _same(rec.job_log, [(0, 0, 0.1, 1.6), (1, 0, 0.6, 2.1)])
    assert rec.finished_at_s.tolist() == pytest.approx([1.7, 2.2])


def test_split_placement_walks_client_link_server_per_pass() -> None:
    # tiny model: server 1000 FLOP/s, client 100 FLOP/s; link 0.2 s RTT, 100 B/s each way.
    # P = 2, G = 2, placement C S C (embed and head on the client).
    # r0 opens its server session first: one round trip, 0-0.2; pass 0: embed 0 s;
    #   up 0.1 + 20 B / 100 = 0.3 -> server 0.5-0.7 (200 FLOP);
    #   down 0.3 -> 1.0; head 100 FLOP on the client 1.0 -> first token at 2.0.
    #   pass 1: up 0.1 + 0.1 -> 2.2; server 2.2-2.3; down 0.2 -> 2.5; head 0.5 -> 3.0.
    # r1 arrives at 0.1, opens until 0.3: server at 0.6, waits for r0 until 0.7, served until
    #   0.9; token at 2.2; pass 1 reaches the server at 2.4 (free since 2.3), done 2.5,
    #   finished 3.2. (Without the opening every time is 0.2 s earlier.)
    rec = run_policy(tiny_world((0.0, 0.1), prompt=2, output=2), "fixed:CSC", log=True)
    _same(rec.job_log, [(0, 0, 0.5, 0.7), (1, 0, 0.6, 0.9), (0, 1, 2.2, 2.3), (1, 1, 2.4, 2.5)])
    assert rec.first_token_at_s.tolist() == pytest.approx([2.0, 2.2])
    assert rec.finished_at_s.tolist() == pytest.approx([3.0, 3.2])
    assert rec.server_work_s.tolist() == pytest.approx([0.3, 0.3])


def test_client_only_request_never_touches_the_server() -> None:
    rec = run_policy(tiny_world((0.0,), prompt=2, output=2), "fixed:CCC", log=True)
    # prefill on the client: block 2.0 s + head 1.0 s; one decode step: 1.0 + 0.5 s
    assert rec.job_log == ()
    assert rec.first_token_at_s.tolist() == pytest.approx([3.0])
    assert rec.finished_at_s.tolist() == pytest.approx([4.5])
    assert rec.busy_total_s == 0.0


def _batch_world(max_batch: int = 32):
    """The tiny model with weights and a KV cache, on a server with 1000 B/s of memory."""
    model = tiny_model()
    block = UnitCost(name="block0", params=0, linear_flops_per_token=100.0,  # 200 B weights,
                     attn_flops_per_token_ctx=0.0, weight_bytes=200.0,  # 10 B/token KV
                     kv_bytes_per_token=10.0, out_bytes_per_token=10.0)
    model = replace(model, units=(model.units[0], block, model.units[2]))
    world = tiny_world((0.0,), prompt=2, output=2)
    server = DeviceProfile(name="server", peak_flops_per_s=1000.0, mem_bandwidth_bytes_per_s=1000.0,
                           mem_capacity_bytes=1e15, efficiency=1.0)
    rtype = replace(world.types[0], model=model)
    return replace(world, types=(rtype,), server=ServerSpec(server, "batched", max_batch=max_batch))


def test_batched_step_reads_weights_once_and_every_kv_cache() -> None:
    cost = BatchCost(_batch_world())
    decode = (0, 1, 2, 2, 1)  # block only, P = 2, decode step 1: context 3
    prefill = (0, 1, 2, 2, 0)
    # decode alone: max(100 FLOP / 1000, (200 + 30) B / 1000) = 0.23 s
    assert cost.step_s([decode]) == pytest.approx(0.23)
    # two decodes: max(0.2, (200 + 2 * 30) / 1000) = 0.26 s, not 0.46
    assert cost.step_s([decode, decode]) == pytest.approx(0.26)
    # prefill (200 FLOP, 20 B KV written) + decode: max(0.3, 0.25) = 0.3 s, compute-bound
    assert cost.step_s([prefill, decode]) == pytest.approx(0.3)
    # a job over all units adds the embedding (free) and the head (50 FLOP at step 1)
    assert cost.step_s([(0, 0, 3, 2, 1), decode]) == pytest.approx(0.26 + 0.05)


def test_batch_of_one_takes_the_solo_service_time() -> None:
    world = builtin_world("mixed")
    world = replace(world, server=replace(world.server, scheduler="batched"))
    cost, builder = BatchCost(world), WalkBuilder(world)
    for type_index, placement in ((0, "S" * 34), (0, "C" * 3 + "S" * 28 + "CCC"),
                                  (2, "C" + "S" * 11 + "CC"), (4, "S" * 32)):
        walk = builder.walk(type_index, 0, 300, 5, Placement(placement))
        for j, solo_s in enumerate(walk.service_s):
            a, b = walk.server_segments[j % walk.jobs_per_pass]
            shape = (type_index, a, b, 300, j // walk.jobs_per_pass)
            assert cost.step_s([shape]) == pytest.approx(solo_s, rel=1e-9)


def test_batched_with_batches_of_one_is_fcfs() -> None:
    world = builtin_world("mixed").with_rate(2.0)
    world = replace(world, duration_s=40.0, warmup_s=0.0)
    fcfs = run_policy(world, "exact")
    batched = run_policy(replace(world, server=replace(world.server, scheduler="batched",
                                                     max_batch=1)), "exact")
    np.testing.assert_allclose(batched.finished_at_s, fcfs.finished_at_s, rtol=1e-9)
    assert batched.busy_total_s == pytest.approx(fcfs.busy_total_s, rel=1e-9)


def test_batching_charges_all_busy_time_and_never_slows_a_step_down() -> None:
    world = builtin_world("mixed").with_rate(3.0)
    world = replace(world, duration_s=40.0, warmup_s=0.0,
                    server=replace(world.server, scheduler="batched"))
    rec = run_policy(world, "server-only", log=True)
    done = ~np.isnan(rec.finished_at_s)
    assert rec.server_work_s[done].sum() <= rec.busy_total_s * (1 + 1e-9)
    assert rec.server_work_s.sum() == pytest.approx(rec.busy_total_s, rel=1e-9)
    fcfs = run_policy(replace(world, server=replace(world.server, scheduler="fcfs")),
                    "server-only")
    assert rec.busy_total_s < fcfs.busy_total_s  # batching shares weight reads
