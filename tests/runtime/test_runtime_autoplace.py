"""Auto placement: instances from measured profiles, emulated links, the measured link."""

from __future__ import annotations

import time

import pytest
import torch
from runtime_kit import TIMEOUT_S

from splitllm.errors import UserError
from splitllm.placement import Placement
from splitllm.planner.instance import evaluate
from splitllm.planner.network import Link, crossing_s
from splitllm.runtime.autoplace import (
    HEADER_BYTES_PER_MESSAGE,
    TOKEN_REPLY_BYTES,
    Request,
    default_sla_s,
    measured_instance,
    plan_placement,
    with_sla,
)
from splitllm.runtime.client import connect, measure_link
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.profile import UnitProfile, profile_units
from splitllm.runtime.transport import EmulatedLink, WebSocketTransport
from splitllm.runtime.units import UnitStack

NAMES = ("embed", "block0", "block1", "head")


def profile(scale: float) -> UnitProfile:
    return UnitProfile(NAMES, 10, (0.001 * scale, 0.01 * scale, 0.01 * scale, 0.005 * scale),
                       (0.0001 * scale, 0.002 * scale, 0.002 * scale, 0.001 * scale), 1)


def test_measured_instance_follows_the_cost_model() -> None:
    link = Link(uplink_bytes_per_s=1e6, downlink_bytes_per_s=2e6, rtt_s=0.05)
    instance = measured_instance(profile(4.0), profile(1.0), link,
                                 Request(prompt_tokens=20, output_tokens=5),
                                 hidden_bytes_per_token=256)
    assert instance.passes == 5 and instance.names == NAMES
    block = instance.units[1]
    assert block.server_s == pytest.approx(0.01 * 2 + 4 * 0.002)  # prefill of 20, 4 decodes
    assert block.client_s == pytest.approx(4 * block.server_s)
    assert block.out_bytes == 256 * (20 + 4) + HEADER_BYTES_PER_MESSAGE * 5
    assert instance.units[-1].out_bytes == TOKEN_REPLY_BYTES * 5
    # All-server: compute on the server, the ids go up and the tokens come down every pass.
    all_server = evaluate(instance, Placement("SSSS"))
    up = 5 * 0.025 + instance.input_bytes / 1e6
    down = 5 * 0.025 + instance.output_bytes / 2e6
    assert all_server.latency_s == pytest.approx(sum(u.server_s for u in instance.units)
                                                 + up + down)


def test_the_sla_decides_how_much_runs_on_the_client() -> None:
    instance = measured_instance(profile(6.0), profile(1.0),
                                 Link(uplink_bytes_per_s=1e7, downlink_bytes_per_s=1e7, rtt_s=0.02),
                                 Request(prompt_tokens=20, output_tokens=5),
                                 hidden_bytes_per_token=256)
    loose = plan_placement(with_sla(instance, 10.0))
    assert loose.placement.sides == "CCCC" and loose.server_work == 0
    server_only = evaluate(instance, Placement("SSSS")).latency_s
    tight = plan_placement(with_sla(instance, server_only * 1.0001))
    assert tight.server_work == pytest.approx(evaluate(instance, Placement("SSSS")).server_work,
                                              rel=0.2)
    middle = plan_placement(with_sla(instance, server_only * 1.3))
    assert 0 < middle.server_work < tight.server_work
    assert default_sla_s(instance) == pytest.approx(1.5 * min(
        evaluate(instance, Placement("CCCC")).latency_s, server_only))
    with pytest.raises(UserError, match="no placement meets the SLA"):
        plan_placement(with_sla(instance, 1e-6))


def test_measured_link_sees_the_emulated_link(llama_server: BackgroundServer) -> None:
    emulated = Link(name="test", uplink_bytes_per_s=4e6, downlink_bytes_per_s=8e6, rtt_s=0.02)
    transport = EmulatedLink(WebSocketTransport(llama_server.ws_url), emulated)
    try:
        link = measure_link(transport, TIMEOUT_S, pings=3)
    finally:
        transport.close()
    assert link.rtt_s == pytest.approx(0.02, abs=0.01)
    assert link.uplink_bytes_per_s == pytest.approx(4e6, rel=0.3)
    assert link.downlink_bytes_per_s == pytest.approx(8e6, rel=0.3)
    assert transport.delay_s > 0


def test_emulated_slowdown_makes_client_units_slower(tiny_llama: LoadedModel,
                                                     llama_server: BackgroundServer) -> None:
    with connect(llama_server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as fast, \
            connect(llama_server.ws_url, tiny_llama, emulate_client_slowdown=5.0,
                    timeout_s=TIMEOUT_S) as slow:
        clock = time.perf_counter()
        normal = fast.generate([5, 6, 7, 8], 6, placement="CCCCCC", stop_at_eos=False)
        fast_s = time.perf_counter() - clock
        clock = time.perf_counter()
        slowed = slow.generate([5, 6, 7, 8], 6, placement="CCCCCC", stop_at_eos=False)
        slow_s = time.perf_counter() - clock
        assert slowed.tokens == normal.tokens
        assert slow_s > 2.5 * fast_s
        assert slow.emulation == "EMULATED client slowdown x5"
        plan = slow.plan(4, 6)
        assert plan.source == "measured" and plan.plan.feasible
        assert slow.client_profile().decode_s[1] > 3 * fast.client_profile().decode_s[1]


def test_kv_bytes_per_token_matches_the_cache(tiny_llama: LoadedModel) -> None:
    stack = UnitStack(tiny_llama.model)
    cache = stack.new_cache(0, stack.n_units)
    stack.run(0, stack.n_units, torch.tensor([[5, 6, 7]]), torch.arange(3)[None], cache)
    assert cache is not None
    assert cache.nbytes() == 3 * sum(stack.kv_bytes_per_token(u) for u in range(stack.n_units))
    measured = profile_units(stack, prompt_tokens=8, decode_steps=2)
    assert measured.names == stack.names and all(t > 0 for t in measured.decode_s)


class _Pipe:
    """A transport that answers every frame with the same frame, instantly."""

    bytes_sent = 0
    bytes_received = 0

    def __init__(self) -> None:
        self.last: str | bytes = b""

    def send(self, data: str | bytes) -> None:
        self.last = data

    def recv(self, timeout_s: float) -> str | bytes:
        return self.last

    def close(self) -> None:
        pass


def test_the_emulated_link_delays_each_frame_by_the_planners_crossing() -> None:
    link = Link(name="t", uplink_bytes_per_s=1e6, downlink_bytes_per_s=4e6, rtt_s=0.002)
    emulated = EmulatedLink(_Pipe(), link)
    emulated.send(b"x" * 3000)
    emulated.recv(1.0)
    assert emulated.delay_s == pytest.approx(crossing_s(link, True, 3000.0)
                                             + crossing_s(link, False, 3000.0))
