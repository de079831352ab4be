"""A server that a hostile client cannot starve (issue 10, items 1, 2 and 5), over real sockets.

Every test keeps a healthy split session open beside the attack: it must still get the unsplit
model's tokens. Nothing here asserts on wall time: a stuck client is detected by the server
closing it, a sweeper by the notice it sends.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable

import httpx
import pytest
import torch
from hostile_kit import (
    ALL_SERVER,
    Greedy,
    HealthySession,
    SocketClient,
    closed_by_server,
    ids,
    token_of,
)
from runtime_kit import TIMEOUT_S, RawClient, metrics, wait_for

from splitllm.runtime import protocol as wire
from splitllm.runtime.decoding import LocalPipe, generate_tokens
from splitllm.runtime.guards import PRE_AUTH_FRAME_BYTES, TransportLimits, UnfinishedBudget
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel

TOKEN = "s3cret"
WRITE_BUFFER_HIGH_WATER = 64 * 1024  # asyncio's default for a transport


def open_connections(server: BackgroundServer) -> int:
    """TCP connections the server holds now (HTTP and WebSocket)."""
    return len(server.server.server_state.connections)


def queued_bytes(server: BackgroundServer) -> int:
    """Bytes waiting in the server's transports for their peers to read."""
    return sum(c.transport.get_write_buffer_size()
               for c in list(server.server.server_state.connections) if c.transport)


def stop_reading(server: BackgroundServer) -> SocketClient:
    """A client that opens a session, asks for probe replies, and never reads a byte."""
    stuck = SocketClient(server, receive_buffer_bytes=4096)
    stuck.send_json({"type": "open", "placement": "SSSSSS"})
    for _ in range(4):  # over the probe limit: each is refused with a small error
        stuck.send_binary(wire.encode_frame({"type": "probe", "reply_bytes": 60 * 2**20}))
    for _ in range(8):  # more than the kernel's socket buffers hold
        stuck.send_binary(wire.encode_frame({"type": "probe",
                                             "reply_bytes": wire.MAX_PROBE_REPLY_BYTES}))
    return stuck


def closed_for(server: BackgroundServer, reason: str) -> float:
    return metrics(server.http_url).get(f'splitllm_sessions_closed_total{{reason="{reason}"}}', 0)


def test_a_client_that_stops_reading_is_dropped(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, transport=TransportLimits(send_timeout_s=1.0))
    healthy = HealthySession(tiny_llama, server)
    stuck = stop_reading(server)
    try:
        # Its reply was not taken in time: the server aborts the connection (and its session).
        wait_for(lambda: closed_for(server, "disconnect") == 1)
        wait_for(lambda: open_connections(server) == 1)  # the healthy one
        assert queued_bytes(server) == 0
        assert healthy.finish() == healthy.want
        assert metrics(server.http_url)['splitllm_errors_total{code="too_large"}'] == 4
    finally:
        stuck.close()


def test_the_idle_sweeper_never_waits_on_a_stuck_connection(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, idle_timeout_s=3.0,
                         transport=TransportLimits(send_timeout_s=600.0))
    stuck = stop_reading(server)
    try:
        wait_for(lambda: queued_bytes(server) > WRITE_BUFFER_HIGH_WATER)  # it is stuck now
        idle = RawClient(server.ws_url)
        session = idle.open("CCCSSS")
        healthy = HealthySession(tiny_llama, server)
        assert healthy.finish() == healthy.want
        # The sweeper closes the stuck client's idle session (its notice cannot be delivered)
        # and still gets to the next idle session.
        assert idle.expect_error("idle_timeout")["session"] == session
        assert closed_for(server, "idle_timeout") == 2
        # At most one reply is queued for a client that does not read.
        assert queued_bytes(server) <= wire.MAX_PROBE_REPLY_BYTES + WRITE_BUFFER_HIGH_WATER
        idle.close()
    finally:
        stuck.close()


def test_nothing_large_is_buffered_or_parsed_before_auth(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, tokens=(TOKEN,))
    healthy = HealthySession(tiny_llama, server, token=TOKEN)
    before = metrics(server.http_url, TOKEN)
    big = SocketClient(server)
    big.send_partial_binary(bytes(60 * 2**20), sent_bytes=64 * 1024)  # a 60 MiB frame begins
    assert big.close_code() == 1009  # refused from its length alone
    fragmented = SocketClient(server)
    chunk = PRE_AUTH_FRAME_BYTES // 4
    fragmented.send_binary(bytes(chunk), fin=False)
    for _ in range(4):  # never finished, and over the limit before auth
        fragmented.send_continuation(bytes(chunk), fin=False)
    assert fragmented.close_code() == 1009
    after = metrics(server.http_url, TOKEN)
    received = "splitllm_wire_bytes_received_total"
    assert after[received] == before[received]  # the app never saw either message
    assert healthy.finish() == healthy.want
    big.close()
    fragmented.close()


def test_anything_but_a_good_open_before_auth_is_fatal(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, tokens=(TOKEN,))
    quick = make_server(tiny_llama, tokens=(TOKEN,), auth_timeout_s=0.5)
    healthy = HealthySession(tiny_llama, server, token=TOKEN)
    healthy_quick = HealthySession(tiny_llama, quick, token=TOKEN, seed=41)  # beside the silent
    frames: list[str | bytes] = [
        "not json", b"\x00", '{"type": "ping"}', '{"type": "open", "placement": "SSSSSS"}',
        '{"type": "open", "placement": "SSSSSS", "token": "wrong"}',
        wire.encode_frame({"type": "probe", "reply_bytes": 10}),
    ]
    for frame in frames:
        client = RawClient(server.ws_url)
        client.send(frame)
        assert client.expect_error("unauthorized")["fatal"] is True
        with pytest.raises(Exception, match="1008"):
            client.recv()
    silent = RawClient(quick.ws_url)  # says nothing: closed after the auth deadline
    assert "no authentication" in silent.expect_error("unauthorized")["message"]
    with pytest.raises(Exception, match="1008"):
        silent.recv()
    assert healthy_quick.finish() == healthy_quick.want
    # The token in the first `open` authorizes the connection: full-size frames from then on.
    in_message = RawClient(server.ws_url)
    in_message.open("SSSSSS", token=TOKEN)
    in_message.send(wire.encode_frame({"type": "probe", "reply_bytes": 3}, bytes(256 * 1024)))
    reply, payload = in_message.recv()
    assert reply["type"] == "probe_reply" and payload == bytes(3)
    in_message.close()
    assert healthy.finish() == healthy.want
    assert metrics(server.http_url, TOKEN)['splitllm_errors_total{code="unauthorized"}'] == 6
    assert metrics(quick.http_url, TOKEN)['splitllm_errors_total{code="unauthorized"}'] == 1


def test_an_authorized_client_gets_no_large_json_parsed(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, tokens=(TOKEN,))
    healthy = HealthySession(tiny_llama, server, token=TOKEN)
    client = RawClient(server.ws_url, token=TOKEN)
    padding = "x" * (8 * 2**20)  # valid JSON: parsed, it would be refused only for its field
    client.send(json.dumps({"type": "ping", "t": 1, "padding": padding}))
    assert "text frame of" in client.expect_error("too_large")["message"]
    header = json.dumps({"type": "probe", "reply_bytes": 1, "padding": padding}).encode()
    client.send(wire.HEADER_LEN.pack(len(header)) + header)
    assert "header limit" in client.expect_error("bad_frame")["message"]
    client.send_json({"type": "ping", "t": 2})  # refused unparsed, and the connection goes on
    assert client.recv()[0]["t"] == 2
    errors = metrics(server.http_url, TOKEN)
    assert errors['splitllm_errors_total{code="too_large"}'] == 1
    assert errors['splitllm_errors_total{code="bad_frame"}'] == 1
    assert 'splitllm_errors_total{code="bad_message"}' not in errors
    assert healthy.finish() == healthy.want
    client.close()


def test_connections_are_capped(tiny_llama: LoadedModel,
                                make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, transport=TransportLimits(max_connections=8,
                                                               header_timeout_s=600.0))
    healthy = HealthySession(tiny_llama, server)
    silent = [socket.create_connection((server.host, server.port), timeout=TIMEOUT_S)
              for _ in range(30)]
    try:
        wait_for(lambda: closed_by_server(silent) == 23)  # refused at once
        assert open_connections(server) == 8  # the healthy one and 7 silent ones
        assert healthy.finish() == healthy.want
    finally:
        for sock in silent:
            sock.close()
    wait_for(lambda: open_connections(server) == 0)
    assert httpx.get(server.http_url + "/health", timeout=TIMEOUT_S).status_code == 200


def test_a_request_must_arrive_before_the_header_deadline(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    # Long enough for the healthy client's own requests, which go out right after connecting.
    server = make_server(tiny_llama, transport=TransportLimits(header_timeout_s=2.0))
    healthy = HealthySession(tiny_llama, server)
    silent = [socket.create_connection((server.host, server.port), timeout=TIMEOUT_S)
              for _ in range(10)]
    slow = [socket.create_connection((server.host, server.port), timeout=TIMEOUT_S)
            for _ in range(3)]
    for sock in slow:  # headers that never end
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    try:
        wait_for(lambda: closed_by_server(silent + slow) == 13)
        wait_for(lambda: open_connections(server) == 1)
        assert httpx.get(server.http_url + "/health", timeout=TIMEOUT_S).status_code == 200
        assert healthy.finish() == healthy.want
    finally:
        for sock in silent + slow:
            sock.close()


def test_hostile_values_get_defined_errors(tiny_llama: LoadedModel,
                                           llama_server: BackgroundServer) -> None:
    healthy = HealthySession(tiny_llama, llama_server)
    bad = RawClient(llama_server.ws_url)
    huge = "9" * 5000  # past Python's int_max_str_digits: json.loads raises ValueError
    bad.send('{"type": "ping", "t": ' + huge + "}")
    bad.expect_error("bad_frame")
    header = ('{"type": "probe", "reply_bytes": ' + huge + "}").encode()
    bad.send(wire.HEADER_LEN.pack(len(header)) + header)
    bad.expect_error("bad_frame")
    session = bad.open("CCSSSC")  # server segment: units [2, 5)
    good = {"type": "forward", "session": session, "seq": 1, "units": [2, 5],
            "positions": [0, 1], "dtype": "float32", "shape": [1, 1, 64]}
    for field, value in [("shape", [True, 1, 64]), ("shape", [1.0, 1, 64]),
                         ("positions", [0.0, 1.0]), ("units", [2, 5.0]), ("seq", True),
                         ("seq", 2**63), ("return_logits", "yes")]:
        bad.send(wire.encode_frame({**good, field: value}, bytes(64 * 4)))
        assert field in bad.expect_error("bad_message")["message"]
    bad.send_json({"type": "open", "placement": "SSSSSS", "sampling": {"temperature": 1e-300}})
    assert "greedy" in bad.expect_error("bad_message")["message"]
    bad.send(wire.encode_frame(good, bytes(64 * 4)))  # the connection and session still work
    assert bad.recv()[0]["type"] == "hidden"
    bad.close()
    assert healthy.finish() == healthy.want


class BrokenSampler:
    """A sampler with a bug: it raises after the step that computed its row."""

    greedy = False  # as the session's sampling (temperature 1): the engine asks the sampler

    def __call__(self, logits: torch.Tensor, position: int) -> int:
        raise RuntimeError("a sampler bug")


def test_a_session_that_cannot_sample_fails_alone(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama)
    engine = server.state.engine
    narrow = RawClient(server.ws_url)  # a top_p that is 0 in float32: no token survived it
    narrow_session = narrow.open(ALL_SERVER, sampling={"temperature": 1.0, "top_p": 1e-300})
    broken = RawClient(server.ws_url)
    broken_session = broken.open(ALL_SERVER, sampling={"temperature": 1.0})
    server.state.sessions[broken_session][0].sampler = BrokenSampler()  # type: ignore[assignment]
    healthy = Greedy(tiny_llama, RawClient(server.ws_url), seed=160)
    prompt = [5, 6, 7]
    with engine.held_back():  # all three rows in one step, the healthy one last
        narrow.forward(narrow_session, (0, 6), (0, 3), ids(prompt))
        broken.forward(broken_session, (0, 6), (0, 3), ids(prompt))
        healthy.send_prefill()
        wait_for(lambda: engine.queued() == 3)
        first_step = len(engine.history)
    assert healthy.finish() == healthy.want
    assert len(engine.history[first_step]) == 3
    most_likely = next(iter(generate_tokens(LocalPipe(tiny_llama.model), prompt, 1)))
    assert token_of(narrow.recv()[0]) == most_likely  # top_p keeps the most likely token
    assert "a sampler bug" in broken.expect_error("internal")["message"]
    assert set(server.state.sessions) == {narrow_session, healthy.session}  # it alone closed
    for client in (narrow, broken, healthy.client):
        client.close()


def test_http_needs_a_bearer_token_and_publishes_no_schema(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, tokens=(TOKEN,))
    healthy = HealthySession(tiny_llama, server, token=TOKEN)
    url = server.http_url
    for path in ("/docs", "/redoc", "/openapi.json"):
        for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
            assert httpx.get(url + path, headers=headers, timeout=TIMEOUT_S).status_code == 404
    for value, status in [(TOKEN, 401), (f"Basic {TOKEN}", 401), (f"Bearer {TOKEN}", 200),
                          (f"bearer {TOKEN}", 200)]:
        headers = {"Authorization": value}
        assert httpx.get(url + "/v1/info", headers=headers, timeout=TIMEOUT_S).status_code == status
        assert httpx.get(url + "/metrics", headers=headers, timeout=TIMEOUT_S).status_code == status
    bare = SocketClient(server, authorization=TOKEN)  # a bare token on the upgrade is refused
    bare.send_json({"type": "open", "placement": "SSSSSS"})
    assert [m["code"] for m in bare.messages()] == ["unauthorized"]
    assert bare.protocol.close_rcvd is not None and bare.protocol.close_rcvd.code == 1008
    bare.close()
    assert healthy.finish() == healthy.want


def unfinished_budget(server: BackgroundServer) -> UnfinishedBudget:
    budget: UnfinishedBudget = server.server.config.ws_protocol_class.budget
    return budget


def test_an_unfinished_message_must_finish_in_time(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, transport=TransportLimits(message_timeout_s=2.0))
    healthy = HealthySession(tiny_llama, server)
    partial = SocketClient(server)  # authorized (no token): full-size frames are allowed
    partial.send_partial_binary(bytes(2**20), sent_bytes=64 * 1024)
    fragmented = SocketClient(server)
    fragmented.send_binary(bytes(64 * 1024), fin=False)
    fragmented.send_continuation(bytes(64 * 1024), fin=False)  # and never the last fragment
    assert partial.close_code() == 1008
    assert fragmented.close_code() == 1008
    wait_for(lambda: unfinished_budget(server).held_bytes == 0)
    assert healthy.finish() == healthy.want
    partial.close()
    fragmented.close()


def test_unfinished_messages_share_one_byte_budget(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    limit, sent = 2 * 2**20, 500 * 1024  # room for 4 unfinished messages of `sent` bytes
    server = make_server(tiny_llama, transport=TransportLimits(
        max_unfinished_bytes=limit, message_timeout_s=600.0))
    budget = unfinished_budget(server)
    healthy = HealthySession(tiny_llama, server)
    attackers = [SocketClient(server) for _ in range(8)]
    for attacker in attackers:  # the start of a 4 MiB frame each, never finished
        with contextlib.suppress(OSError):  # the server closed it (and reset what it sent)
            attacker.send_partial_binary(bytes(4 * 2**20), sent_bytes=sent)
    # Whichever would pass the limit is closed: 4 hold what they sent (less the frame's
    # header), 4 are gone. Server-side counts: the survivors' sockets get pings, too.
    wait_for(lambda: open_connections(server) == 1 + 4)  # the healthy one and 4 survivors
    wait_for(lambda: sorted(budget.held.values()) == [sent - 14] * 4)  # all read now
    assert budget.held_bytes <= limit
    assert healthy.finish() == healthy.want  # small messages, each finished in one read
    for attacker in attackers:
        attacker.close()
    wait_for(lambda: budget.held_bytes == 0 and not budget.held)
    big = RawClient(server.ws_url)  # with the budget free again, a big message gets through
    big.send(wire.encode_frame({"type": "probe", "reply_bytes": 5}, bytes(limit - 2**10)))
    reply, payload = big.recv()
    assert reply["type"] == "probe_reply" and payload == bytes(5)
    big.close()
