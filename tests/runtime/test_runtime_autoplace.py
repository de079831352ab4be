"""Auto placement: instances from measured profiles, emulated links, the measured link, and
predicted wire bytes against a real generation's."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from runtime_kit import TIMEOUT_S, random_prompt

from splitllm.errors import UserError
from splitllm.placement import CLIENT, SERVER, Placement
from splitllm.planner.instance import evaluate
from splitllm.planner.network import Link, crossing_s, session_open_s
from splitllm.runtime.autoplace import (
    AutoPlan,
    Request,
    default_sla_s,
    measured_instance,
    plan_placement,
    plan_request,
    profile_server_times,
    with_sla,
)
from splitllm.runtime.client import connect
from splitllm.runtime.decoding import SplitPipe, generate_tokens
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.link_probe import measure_link
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.profile import UnitProfile, profile_units
from splitllm.runtime.remote import RemoteSession
from splitllm.runtime.transport import EmulatedLink, WebSocketTransport
from splitllm.runtime.units import UnitStack
from splitllm.runtime.wire_bytes import RequestBytes, WireFormat, request_bytes, session_bytes

NAMES = ("embed", "block0", "block1", "head")
PREFILL_S = (0.001, 0.01, 0.01, 0.005)  # per unit, a prefill of 10 tokens
DECODE_S = (0.0001, 0.002, 0.002, 0.001)  # per unit, one decode step at any context


def profile(scale: float) -> UnitProfile:
    """Prefill linear in the prompt length, decode flat in the context."""
    lengths = (10, 20, 40)
    return UnitProfile(names=NAMES, prompt_tokens=lengths,
                       prefill_s=tuple(tuple(t * scale * p / 10 for t in PREFILL_S)
                                       for p in lengths),
                       contexts=(10, 30), decode_s=(tuple(t * scale for t in DECODE_S),) * 2,
                       threads=1)


def sizes(prompt_tokens: int, new_tokens: int, hidden_size: int = 64) -> RequestBytes:
    fmt = WireFormat(n_units=len(NAMES), hidden_size=hidden_size, wire_dtype="float32",
                     vocab_size=320)
    return request_bytes(fmt, prompt_tokens, new_tokens)


def test_measured_instance_follows_the_cost_model() -> None:
    link = Link(uplink_bytes_per_s=1e6, downlink_bytes_per_s=2e6, rtt_s=0.05)
    request = Request(prompt_tokens=20, output_tokens=5)
    instance = measured_instance(profile(4.0), profile_server_times(profile(1.0), request), link,
                                 request, sizes(20, 5))
    assert instance.passes == 5 and instance.names == NAMES
    block = instance.units[1]
    assert block.server_s == pytest.approx(0.01 * 2 + 4 * 0.002)  # prefill of 20, 4 decodes
    assert block.client_s == pytest.approx(4 * block.server_s)
    # 256 bytes of hidden state per token (64 float32) and one JSON header per message (5).
    assert 256 * (20 + 4) + 5 * 100 < block.out_bytes < 256 * (20 + 4) + 5 * 200
    assert 5 * 50 < instance.units[-1].out_bytes == instance.output_bytes < 5 * 150
    assert 8 * (20 + 4) + 5 * 100 < instance.input_bytes < 8 * (20 + 4) + 5 * 200  # int64 ids
    # All-server: compute on the server, the ids go up and the tokens come down every pass,
    # after the session's opening (one round trip; its messages' bytes are the caller's).
    assert instance.session_open_s == 0.05
    all_server = evaluate(instance, Placement("SSSS"))
    up = 5 * 0.025 + instance.input_bytes / 1e6
    down = 5 * 0.025 + instance.output_bytes / 2e6
    assert all_server.latency_s == pytest.approx(sum(u.server_s for u in instance.units)
                                                 + up + down + 0.05)


def test_profiles_fit_the_cost_model_shape_to_their_points() -> None:
    # Per unit: prefill = 2 ms + 0.1 ms/token + 0.2 us per causal pair; decode 1 ms + 5 us/ctx.
    def prefill_s(p: int) -> float:
        return 2e-3 + 1e-4 * p + 2e-7 * p * (p + 1) / 2

    def decode_s(c: int) -> float:
        return 1e-3 + 5e-6 * c

    lengths, contexts = (16, 48, 96), (18, 50, 98)
    measured = UnitProfile(names=("embed", "head"), prompt_tokens=lengths,
                           prefill_s=tuple((prefill_s(p), 2 * prefill_s(p)) for p in lengths),
                           contexts=contexts, decode_s=tuple((decode_s(c), 0.0) for c in contexts),
                           threads=1)
    assert measured.prefill_at(400) == pytest.approx((prefill_s(400), 2 * prefill_s(400)))
    assert measured.decode_at(1000) == pytest.approx((decode_s(1000), 0.0), abs=1e-12)
    steps = measured.decode_steps_s(100, 50)  # contexts 101 .. 150
    assert steps[0] == pytest.approx(sum(decode_s(c) for c in range(101, 151)))
    # What one 32-token point scaled linearly predicted (the old profile): 14% off at 400.
    fitted = measured.prefill_at(400)[0]
    assert abs(prefill_s(32) * 400 / 32 - fitted) > 0.1 * fitted
    assert UnitProfile.from_json(measured.to_json()) == measured
    assert measured.scaled(3.0).prefill_at(400)[1] == pytest.approx(6 * prefill_s(400))


def test_the_sla_decides_how_much_runs_on_the_client() -> None:
    request = Request(prompt_tokens=20, output_tokens=5)
    instance = measured_instance(profile(6.0), profile_server_times(profile(1.0), request),
                                 Link(uplink_bytes_per_s=1e7, downlink_bytes_per_s=1e7, rtt_s=0.02),
                                 request, sizes(20, 5))
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


def test_auto_placement_keeps_its_headroom_where_a_placement_is_that_fast() -> None:
    request = Request(prompt_tokens=20, output_tokens=5)
    instance = measured_instance(profile(6.0), profile_server_times(profile(1.0), request),
                                 Link(uplink_bytes_per_s=1e7, downlink_bytes_per_s=1e7, rtt_s=0.02),
                                 request, sizes(20, 5))
    server_only = evaluate(instance, Placement("SSSS")).latency_s
    sla_s = server_only * 1.3
    on_the_sla = plan_request(instance, "test", sla_s, headroom=0.0)
    spared = plan_request(instance, "test", sla_s, headroom=0.2)
    assert spared.instance.sla_s == on_the_sla.instance.sla_s == sla_s  # the request's SLA
    assert spared.headroom == 0.2 and spared.plan.latency_s <= 0.8 * sla_s
    assert on_the_sla.plan.latency_s > 0.8 * sla_s  # without it, the plan spends the SLA
    assert spared.plan.server_work > on_the_sla.plan.server_work  # what the margin costs
    # Nothing within 0.9 x an SLA just above server-only: the least work within the SLA.
    tight = plan_request(instance, "test", server_only * 1.0001, headroom=0.1)
    assert tight.headroom == 0.0 and tight.plan.latency_s <= server_only * 1.0001
    with pytest.raises(UserError, match="headroom must be in"):
        plan_request(instance, "test", sla_s, headroom=1.0)


class VirtualClock:
    """A clock that only the emulated link's delays move."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += seconds


def test_measured_link_sees_the_emulated_link(llama_server: BackgroundServer) -> None:
    shape = Link(name="test", uplink_bytes_per_s=4e6, downlink_bytes_per_s=8e6, rtt_s=0.02)
    clock = VirtualClock()
    transport = EmulatedLink(WebSocketTransport(llama_server.ws_url), shape, sleep=clock.sleep)
    try:
        # Real frames to the real server; only the emulated delays count, so the measurement
        # recovers the shape however loaded the machine is.
        link = measure_link(transport, TIMEOUT_S, pings=3, clock=clock)
    finally:
        transport.close()
    assert link.rtt_s == pytest.approx(0.02, rel=0.01)
    assert link.uplink_bytes_per_s == pytest.approx(4e6, rel=0.01)
    assert link.downlink_bytes_per_s == pytest.approx(8e6, rel=0.01)
    assert transport.delay_s == pytest.approx(clock.now_s)
    real = EmulatedLink(WebSocketTransport(llama_server.ws_url), shape)
    try:
        measured = measure_link(real, TIMEOUT_S, pings=3)
    finally:
        real.close()
    print(f"wall-clock measurement of the emulated link: {measured}")
    assert measured.rtt_s >= 0.02  # every ping waits out the emulated RTT, load only adds


def test_emulated_slowdown_makes_client_units_slower(
        tiny_llama: LoadedModel, llama_server: BackgroundServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    measured = profile_units(UnitStack(tiny_llama.model))  # once: each call times afresh
    monkeypatch.setattr("splitllm.runtime.client.profile_units", lambda stack: measured)
    with connect(llama_server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as fast, \
            connect(llama_server.ws_url, tiny_llama, emulate_client_slowdown=5.0,
                    timeout_s=TIMEOUT_S) as slow:
        normal = fast.generate([5, 6, 7, 8], 6, placement="CCCCCC", stop_at_eos=False)
        slowed = slow.generate([5, 6, 7, 8], 6, placement="CCCCCC", stop_at_eos=False)
        assert slowed.tokens == normal.tokens
        # client_busy_s is compute x 5; the emulation sleeps the other 4/5 of it, so the wall
        # time holds all of it whatever the load (the compute itself varies under load).
        print(f"slowed: wall {slowed.wall_s:.3f} s, client busy {slowed.client_busy_s:.3f} s; "
              f"normal: wall {normal.wall_s:.3f} s, busy {normal.client_busy_s:.3f} s")
        assert slowed.wall_s >= 0.999 * slowed.client_busy_s > 0
        assert slow.emulation == "EMULATED client slowdown x5"
        # The units' times, and the loop's own cost per pass measured beside them.
        assert replace(fast.client_profile(), pass_s=0.0) == measured
        assert replace(slow.client_profile(), pass_s=0.0) == measured.emulated(5.0)
        assert fast.client_profile().pass_s > 0
        plan = slow.plan(4, 6)
        assert plan.source.startswith("measured; server: the server's engine step model (")
        assert "rows per step" in plan.source
        assert plan.plan.feasible
        decided: list[AutoPlan] = []  # placement="auto": plans once, says so, then generates
        auto = slow.generate([5, 6, 7, 8], 6, placement="auto", stop_at_eos=False,
                             on_plan=decided.append)
        assert len(decided) == 1 and auto.auto is decided[0]
        assert auto.placement == str(decided[0].plan.placement) and auto.tokens == normal.tokens


def wire_walk(sizes: RequestBytes, sides: str) -> tuple[float, float, int]:
    """(bytes up, bytes down, messages) a placement moves, restated here as the check."""
    up = down = 0.0
    crossings = 0
    if sides[0] == SERVER:
        up, crossings = sizes.ids_up, 1
    for cut in range(1, len(sides)):
        if sides[cut] != sides[cut - 1]:
            crossings += 1
            if sides[cut] == SERVER:
                up += sizes.hidden_up[cut - 1]
            else:
                down += sizes.hidden_down[cut - 1]
    if sides[-1] == SERVER:
        down, crossings = down + sizes.token_down, crossings + 1
    return up, down, crossings


@pytest.mark.parametrize("placement", ["SSSSSS", "CSSCSS", "SCCCCS", "CCCSSC"])
def test_predicted_bytes_match_a_real_generation(placement: str, tiny_llama: LoadedModel,
                                                 llama_server: BackgroundServer) -> None:
    stack = UnitStack(tiny_llama.model)
    prompt, new_tokens = random_prompt(random.Random(30), 11), 12
    fmt = WireFormat(n_units=stack.n_units, hidden_size=stack.hidden_size, wire_dtype="float32",
                     vocab_size=stack.vocab_size)
    predicted_up, predicted_down, crossings = wire_walk(
        request_bytes(fmt, len(prompt), new_tokens), placement)
    transport = WebSocketTransport(llama_server.ws_url)
    try:
        remote = RemoteSession(transport, Placement(placement), stack.n_units, timeout_s=TIMEOUT_S)
        sent, received = transport.bytes_sent, transport.bytes_received  # after `open`
        pipe = SplitPipe(stack, Placement(placement), remote)
        tokens = list(generate_tokens(pipe, prompt, new_tokens))
        up, down = transport.bytes_sent - sent, transport.bytes_received - received
        remote.close()
    finally:
        transport.close()
    assert len(tokens) == new_tokens
    print(f"{placement}: predicted up {predicted_up:.0f} down {predicted_down:.0f}, "
          f"measured up {up} down {down}")
    # Headers differ from the prediction only in digit counts (seq, positions, token ids).
    slack = 4 * crossings * new_tokens
    assert abs(up - predicted_up) <= slack and abs(down - predicted_down) <= slack
    assert CLIENT in placement or up > 11 * 8  # the ids went up


@pytest.mark.parametrize("placement", ["SSSSSS", "CSSCSC"])
def test_a_sessions_bytes_are_its_passes_and_its_session(placement: str, tiny_llama: LoadedModel,
                                                        llama_server: BackgroundServer) -> None:
    """What Session.generate counts (every message of the generation, the session's `open`,
    `opened`, `close` and `closed` too) against the prediction, per direction."""
    prompt, new_tokens = random_prompt(random.Random(31), 11), 12
    with connect(llama_server.ws_url, tiny_llama) as session:
        stack = session.stack
        generated = session.generate(prompt, new_tokens, placement=placement, chat=False,
                                     stop_at_eos=False)
    fmt = WireFormat(n_units=stack.n_units, hidden_size=stack.hidden_size, wire_dtype="float32",
                     vocab_size=stack.vocab_size)
    passes_up, passes_down, crossings = wire_walk(
        request_bytes(fmt, len(prompt), new_tokens), placement)
    opened = session_bytes(Placement(placement), stack.names, wire_dtype="float32",
                           prompt_tokens=len(prompt), new_tokens=new_tokens)
    up, down = generated.bytes_sent, generated.bytes_received
    predicted_up = passes_up + opened.open_up + opened.close_up
    predicted_down = passes_down + opened.open_down + opened.close_down
    print(f"{placement}: predicted up {predicted_up:.0f} down {predicted_down:.0f}, "
          f"measured up {up} down {down}")
    assert len(generated.tokens) == new_tokens
    # The session's messages are ~40% of a server-only generation's bytes here: left out,
    # the prediction would miss by far more than the digit counts' slack.
    assert opened.total > 8 * new_tokens
    slack = 4 * crossings * new_tokens + 8  # digit counts of headers and of the stats
    assert abs(up - predicted_up) <= slack and abs(down - predicted_down) <= slack


def test_auto_placement_opens_the_session_with_its_real_messages(
        tiny_llama: LoadedModel, llama_server: BackgroundServer) -> None:
    """The instance `placement="auto"` plans on pays one opening of the session over the
    measured link, with the `open` and `opened` messages' real bytes, in every plan that runs a
    unit on the server (and none in the client-only plan)."""
    with connect(llama_server.ws_url, tiny_llama) as session:
        instance, _ = session.instance(11, 12)
        link, n = session.measure_link(), session.stack.n_units
        opened = session_bytes(Placement("S" * n), session.stack.names, wire_dtype="float32",
                               prompt_tokens=11, new_tokens=12)
    assert opened.open_up > 0 and opened.open_down > 0
    assert instance.session_open_s == session_open_s(link, opened.open_up, opened.open_down)
    bare = replace(instance, session_open_s=0.0)
    for sides, paid in (("S" * n, 1), ("C" * n, 0)):
        assert evaluate(instance, Placement(sides)).latency_s == pytest.approx(
            evaluate(bare, Placement(sides)).latency_s + paid * instance.session_open_s)


def test_kv_bytes_per_token_matches_the_cache(tiny_llama: LoadedModel) -> None:
    stack = UnitStack(tiny_llama.model)
    cache = stack.new_cache(0, stack.n_units)
    stack.run(0, stack.n_units, torch.tensor([[5, 6, 7]]), torch.arange(3)[None], cache)
    assert cache is not None
    assert cache.nbytes() == 3 * sum(stack.kv_bytes_per_token(u) for u in range(stack.n_units))
    measured = profile_units(stack, prompt_tokens=(4, 8, 16), contexts=(5, 9, 17), rounds=1)
    assert measured.names == stack.names and measured.contexts == (5, 9, 17)
    assert all(t > 0 for row in measured.decode_s for t in row)
    assert np.all(np.diff([measured.prefill_at(p) for p in (1, 10, 100)], axis=0) >= 0)


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
