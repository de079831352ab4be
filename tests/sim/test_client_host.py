"""Clients sharing one machine: their real CPU processor-shared on its cores, a pass never
shorter than its device's time, and the server slowed while those cores compute."""

from __future__ import annotations

from dataclasses import replace

import pytest
from sim_kit import tiny_world

from splitllm.sim.client_host import ClientHost, SharedCores
from splitllm.sim.engine import Kind, NewEvent
from splitllm.sim.run import run_policy
from splitllm.sim.world import World


def _finish_times(cores: float, jobs: list[tuple[float, float]]) -> dict[int, float]:
    """Run `jobs` (arrival s, CPU s) on SharedCores; when each finished."""
    done: dict[int, float] = {}

    def on_done(now_s: float, a: int, _b: int) -> NewEvent | None:
        done[a] = now_s
        return None

    shared = SharedCores(cores, on_done)
    events: list[NewEvent] = [(at_s, -1, a, 0) for a, (at_s, _) in enumerate(jobs)]
    while events:
        events.sort()
        now_s, kind, a, b = events.pop(0)
        if kind == -1:
            wake = shared.arrive(now_s, a, 0, jobs[a][1])
            events += [wake] if wake is not None else []
        else:
            assert kind == Kind.CLIENT_WAKE
            events += shared.wake(now_s, a, b)
    return done


def test_jobs_on_one_core_share_it_and_on_two_cores_run_side_by_side() -> None:
    # two 1 s jobs at once on one core: each at half speed, both done at 2 s
    assert _finish_times(1.0, [(0.0, 1.0), (0.0, 1.0)]) == pytest.approx({0: 2.0, 1: 2.0})
    # on two cores: each its own, done at 1 s
    assert _finish_times(2.0, [(0.0, 1.0), (0.0, 1.0)]) == pytest.approx({0: 1.0, 1: 1.0})
    # staggered on one core: job 0 alone 0-0.5 (half done), then both at half speed: job 0
    # ends at 1.5, job 1 has 0.5 done by then and finishes alone at 2.0
    assert _finish_times(1.0, [(0.0, 1.0), (0.5, 1.0)]) == pytest.approx({0: 1.5, 1: 2.0})
    # three jobs on two cores: each at 2/3 speed until the 0.5 s one ends at 0.75; the other
    # two then run a core each: 1 - 0.5 = 0.5 s more, done at 1.25
    assert _finish_times(2.0, [(0.0, 0.5), (0.0, 1.0), (0.0, 1.0)]) == pytest.approx(
        {0: 0.75, 1: 1.25, 2: 1.25})


def _client_only(host: ClientHost | None, arrivals: tuple[float, ...] = (0.0, 0.0)) -> World:
    """The tiny model entirely on its client: 4.5 s of the client device's time a request
    (prefill: block 2.0 + head 1.0 s; one decode step: 1.0 + 0.5 s)."""
    return replace(tiny_world(arrivals, prompt=2, output=2), client_host=host)


def test_a_pass_lasts_its_cpu_on_the_shared_core_when_that_exceeds_its_device_time() -> None:
    # real CPU = the device's time: two at once each take twice it (9 s), not 4.5
    one_to_one = ClientHost(cores=1.0, cpu_per_client_s=(1.0,))
    assert run_policy(_client_only(one_to_one), "fixed:CCC").finished_at_s.tolist() == (
        pytest.approx([9.0, 9.0]))
    # alone, CPU twice the device's time: 9 s
    twice = ClientHost(cores=1.0, cpu_per_client_s=(2.0,))
    assert run_policy(_client_only(twice, (0.0,)), "fixed:CCC").finished_at_s.tolist() == (
        pytest.approx([9.0]))
    # each client its own device: 4.5 s both
    assert run_policy(_client_only(None), "fixed:CCC").finished_at_s.tolist() == (
        pytest.approx([4.5, 4.5]))


def test_a_machine_whose_passes_cost_more_cpu_shares_its_core_longer() -> None:
    # the clients measured at 2x the calibrated CPU: two requests' 9 s of CPU each, 18 s
    host = ClientHost(cores=1.0, cpu_per_client_s=(1.0,), cpu_per_visit_s=0.25)
    assert host.scaled_cpu(2.0) == ClientHost(cores=1.0, cpu_per_client_s=(2.0,),
                                              cpu_per_visit_s=0.5)
    assert run_policy(_client_only(host.scaled_cpu(2.0)), "fixed:CCC").finished_at_s.tolist(
    ) == pytest.approx([18.0, 18.0])


def test_a_pass_is_never_shorter_than_its_device_time() -> None:
    # 1.125 s of CPU each, 2.25 s shared: the clients sleep up to their device's 4.5 s
    quarter = ClientHost(cores=1.0, cpu_per_client_s=(0.25,))
    rec = run_policy(_client_only(quarter), "fixed:CCC")
    assert rec.finished_at_s.tolist() == pytest.approx([4.5, 4.5])
    assert rec.client_cores_busy_s == pytest.approx(2.25)


def test_the_server_is_slowed_while_the_clients_cores_compute() -> None:
    # The tiny model split C S C, P = 2, G = 2 (test_timeline's walk), on the batched server
    # (the load test's): a first server job runs 0.5-0.7 on an idle server. r0, of a client
    # class whose CPU is 10x its device's time, computes its head's 1 s for 10 s from 0.7 on
    # the clients' one core; r1, of a class whose units cost no CPU, arrives at 1.0 and
    # reaches the server at 1.5 with that core busy: its step takes x3, 1.5-2.1.
    world = tiny_world((0.0, 1.0), prompt=2, output=2, scheduler="batched")
    client = world.clients[0]
    world = replace(world, clients=(client, replace(client, name="busy")),
                    trace=replace(world.trace, class_index=(1, 0)),
                    client_host=ClientHost(cores=1.0, cpu_per_client_s=(0.0, 10.0),
                                           server_slowdown=3.0))
    log = run_policy(world, "fixed:CSC", log=True).job_log
    assert list(log[:2]) == [pytest.approx((0, 0, 0.5, 0.7)), pytest.approx((1, 0, 1.5, 2.1))]
    assert world.client_host is not None
    unslowed = replace(world, client_host=replace(world.client_host, server_slowdown=1.0))
    log = run_policy(unslowed, "fixed:CSC", log=True).job_log
    assert list(log[:2]) == [pytest.approx((0, 0, 0.5, 0.7)), pytest.approx((1, 0, 1.5, 1.7))]
    # a visit's transport work keeps the core busy but moves little memory: no slowdown
    transport = ClientHost(cores=1.0, cpu_per_client_s=(0.0, 0.0), cpu_per_visit_s=10.0,
                           server_slowdown=3.0)
    logs = [run_policy(replace(world, client_host=replace(transport, server_slowdown=s)),
                       "fixed:CSC", log=True).job_log for s in (3.0, 1.0)]
    assert logs[0] == logs[1] and logs[0][1][2] > 10.0  # r1 waited for the core


def test_a_clients_units_take_more_cpu_while_the_server_computes() -> None:
    # As above, but r1 (whose units cost no CPU) arrives at 0.1: its job reaches the server at
    # 0.6 and its step starts at 0.7, as r0's ends; r0's head then starts on the clients' core
    # with the server computing: its 10 s of CPU take x3 (the same memory shared); its last
    # pass's head (5 s of CPU) starts with the server idle.
    world = tiny_world((0.0, 0.1), prompt=2, output=2, scheduler="batched")
    client = world.clients[0]
    host = ClientHost(cores=1.0, cpu_per_client_s=(0.0, 10.0), server_slowdown=3.0)
    world = replace(world, clients=(client, replace(client, name="busy")),
                    trace=replace(world.trace, class_index=(1, 0)), client_host=host)
    assert run_policy(world, "fixed:CSC").client_cores_busy_s == pytest.approx(30.0 + 5.0)
    unslowed = replace(world, client_host=replace(host, server_slowdown=1.0))
    assert run_policy(unslowed, "fixed:CSC").client_cores_busy_s == pytest.approx(10.0 + 5.0)


def test_the_server_factor_grows_with_the_busy_share_of_the_clients_cores() -> None:
    host = ClientHost(cores=2.0, server_slowdown=2.0)
    assert host.server_factor(0.0) == 1.0
    assert host.server_factor(0.5) == pytest.approx(1.5)
    assert host.server_factor(1.0) == pytest.approx(2.0)
    assert host.server_factor(3.0) == pytest.approx(2.0)  # never beyond all cores busy
    assert host.cpu_s(0, 2.0, 1) == 0.0  # no CPU per client second given: none
    assert ClientHost(cpu_per_client_s=(0.1, 0.5), cpu_per_visit_s=0.01).cpu_s(1, 2.0, 3) == (
        pytest.approx(1.03))



def test_a_load_reading_policy_reads_the_load_at_a_cpu_cost_until_its_requests_finish() -> None:
    # One client-only request at 0 (4.5 s of device time, its CPU the same) on one core; a
    # load-reading policy's clients read the load every 1 s at 0.1 s of CPU: each read shares
    # the core for 0.2 s (both at half speed), costing the request 0.1 s. Reads at 1-4 leave
    # 3.8 s of its CPU done at 4.2, the rest (0.7 s) done at 4.9; the read scheduled at 4 (still
    # unfinished then) runs at 5, and none after: 5 reads, 4.5 + 0.5 core-seconds busy.
    host = ClientHost(cores=1.0, cpu_per_client_s=(1.0,), poll_s=1.0, cpu_per_poll_s=0.1)
    world = _client_only(host, (0.0,))
    aware = run_policy(world, "exact-load-aware")
    assert aware.placements == ("CCC",)
    assert aware.finished_at_s.tolist() == pytest.approx([4.9])
    assert aware.client_cores_busy_s == pytest.approx(5.0)
    # a policy that reads no load reads none: the request alone, done at its device's 4.5 s
    blind = run_policy(world, "exact")
    assert blind.placements == ("CCC",)
    assert blind.finished_at_s.tolist() == pytest.approx([4.5])
    assert blind.client_cores_busy_s == pytest.approx(4.5)
    # reads cost their CPU times the clients' measured factor, like the rest of their CPU
    assert host.scaled_cpu(2.0).cpu_per_poll_s == pytest.approx(0.2)
