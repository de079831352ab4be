"""The server over real sockets: bad input, auth, disconnects, timeouts, concurrency, metrics."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch
from runtime_kit import TIMEOUT_S, RawClient, metrics, random_prompt, wait_for
from websockets.exceptions import ConnectionClosed

from splitllm.errors import UserError
from splitllm.placement import Placement
from splitllm.runtime.client import connect
from splitllm.runtime.decoding import (
    LocalPipe,
    SplitPipe,
    decode_one_token,
    generate_tokens,
    prefill,
)
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.remote import RemoteSession
from splitllm.runtime.step import run_step
from splitllm.runtime.transport import ServerError, WebSocketTransport
from splitllm.runtime.units import UnitStack

D = 64  # hidden size of the tiny models


def hidden(tokens: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(1, tokens, D).to(dtype)  # [1, T, D]


def test_health_info_and_metrics(llama_server: BackgroundServer) -> None:
    url = llama_server.http_url
    assert httpx.get(url + "/health", timeout=TIMEOUT_S).json()["status"] == "ok"
    info = httpx.get(url + "/v1/info", timeout=TIMEOUT_S).json()
    assert info["units"] == ["embed", "block0", "block1", "block2", "block3", "head"]
    assert info["dtype"] == "float32" and info["protocol"] == 1
    assert info["limits"]["max_frame_bytes"] > 0 and info["limits"]["max_context"] == 256
    response = httpx.get(url + "/metrics", timeout=TIMEOUT_S)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    for line in response.text.splitlines():
        assert line.startswith("# ") or len(line.split(" ")) == 2, line
    values = metrics(url)
    assert 'splitllm_unit_busy_seconds_total{unit="block3"}' in values
    assert "splitllm_open_sessions" in values and "splitllm_server_cpu_seconds_total" in values


def test_bad_input_gets_clear_errors_while_a_healthy_session_keeps_going(
        tiny_llama: LoadedModel, llama_server: BackgroundServer) -> None:
    stack = UnitStack(tiny_llama.model)
    prompt = random_prompt(random.Random(20), 9)
    want = list(generate_tokens(LocalPipe(tiny_llama.model), prompt, 6))
    # The healthy session: prefill now, decode after the misbehaviour below.
    transport = WebSocketTransport(llama_server.ws_url)
    placement = Placement("CSSCSS")
    remote = RemoteSession(transport, placement, stack.n_units, timeout_s=TIMEOUT_S)
    pipe = SplitPipe(stack, placement, remote)
    got = [prefill(pipe, prompt)]

    bad = RawClient(llama_server.ws_url)
    bad.send(b"\x00")
    bad.expect_error("bad_frame")
    bad.send("this is not json")
    bad.expect_error("bad_frame")
    bad.send("[" * 60_000)  # json's RecursionError, not a dropped connection
    bad.expect_error("bad_frame")
    bad.send_json({"type": "open", "placement": "CCS"})
    assert "6 units" in bad.expect_error("bad_placement")["message"]
    session = bad.open("CCSSSC")  # server segment: units [2, 5)
    bad.forward("nope", (2, 5), (0, 1), hidden(1))
    bad.expect_error("unknown_session")
    bad.forward(session, (4, 9), (0, 1), hidden(1))
    assert "out of bounds" in bad.expect_error("bad_units")["message"]
    bad.forward(session, (1, 3), (0, 1), hidden(1))
    assert "not a server segment" in bad.expect_error("bad_units")["message"]
    bad.forward(session, (2, 5), (0, 2), hidden(2)[:, :, :32])
    bad.expect_error("bad_shape")
    bad.forward(session, (2, 5), (0, 3), hidden(2))  # 3 positions, 2 tokens
    bad.expect_error("bad_shape")
    bad.forward(session, (2, 5), (0, 2), hidden(2, torch.float16))
    assert "float32" in bad.expect_error("bad_dtype")["message"]
    bad.forward(session, (2, 5), (0, 2), torch.tensor([[5, 6]]))  # ids into a block
    bad.expect_error("bad_dtype")
    bad.forward(session, (2, 5), (3, 5), hidden(2))  # the cache holds nothing yet
    assert "do not follow" in bad.expect_error("bad_positions")["message"]
    bad.forward(session, (2, 5), (0, 2), torch.full((1, 2, D), float("nan")))
    bad.expect_error("bad_values")
    bad.forward(session, (2, 5), (0, 2000), hidden(2000))
    bad.expect_error("too_large")  # over max_tokens_per_message
    # After all that, the misbehaving client's own session still works.
    bad.forward(session, (2, 5), (0, 2), hidden(2), seq=7)
    reply, payload = bad.recv()
    assert reply["type"] == "hidden" and reply["seq"] == 7 and len(payload) == 2 * D * 4
    bad.forward(session, (2, 5), (0, 1), hidden(1))  # replaying a position
    bad.expect_error("bad_positions")
    bad.close()

    for position in range(len(prompt), len(prompt) + 5):
        got.append(decode_one_token(pipe, got[-1], position))
    assert got == want
    remote.close()
    transport.close()
    assert metrics(llama_server.http_url)['splitllm_errors_total{code="bad_shape"}'] >= 2


def test_frames_over_the_size_limit(tiny_llama: LoadedModel,
                                    make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, max_frame_bytes=64 * 1024)
    client = RawClient(server.ws_url)
    session = client.open("SSSSSC")
    client.forward(session, (0, 5), (0, 9000), torch.zeros(1, 9000, dtype=torch.int64))
    assert "over the limit" in client.expect_error("too_large")["message"]
    client.send_json({"type": "ping", "t": 1})
    assert client.recv()[0] == {"type": "pong", "t": 1, "server_time": pytest.approx(
        time.time(), abs=60)}
    # Far over the limit, the transport itself refuses the frame and closes the connection
    # (1009). The close can reach the client while it is still sending the frame: then the send
    # fails (broken pipe, and the reset may drop the close frame itself), else the next recv.
    with pytest.raises(ConnectionClosed) as closed:
        client.send(bytes(1024 * 1024))
        client.recv()
    close_frame = closed.value.rcvd
    assert close_frame is None or close_frame.code == 1009, close_frame
    wait_for(lambda: metrics(server.http_url)["splitllm_open_sessions"] == 0)
    other = RawClient(server.ws_url)  # the server keeps serving
    other.send_json({"type": "ping", "t": 2})
    assert other.recv()[0]["type"] == "pong"
    other.close()


def test_bearer_token_is_required(tiny_llama: LoadedModel,
                                  make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, tokens=("s3cret",))
    assert httpx.get(server.http_url + "/health", timeout=TIMEOUT_S).status_code == 200
    assert httpx.get(server.http_url + "/v1/info", timeout=TIMEOUT_S).status_code == 401
    assert httpx.get(server.http_url + "/metrics", timeout=TIMEOUT_S,
                     headers={"Authorization": "Bearer wrong"}).status_code == 401
    for token in (None, "wrong"):
        client = RawClient(server.ws_url, token=token)
        client.send_json({"type": "open", "placement": "SSSSSS"})
        assert client.expect_error("unauthorized")["fatal"] is True
        with pytest.raises(Exception, match="1008"):
            client.recv()
    in_message = RawClient(server.ws_url)
    in_message.open("SSSSSS", token="s3cret")  # for clients that cannot set headers
    in_message.close()
    with pytest.raises(UserError, match="unauthorized"):
        connect(server.ws_url, tiny_llama, timeout_s=TIMEOUT_S)
    with connect(server.ws_url, tiny_llama, token="s3cret", timeout_s=TIMEOUT_S) as session:
        assert len(session.generate([5, 6, 7], 3, placement="CSSSSC").tokens) >= 1
    values = metrics(server.http_url, token="s3cret")
    assert values['splitllm_errors_total{code="unauthorized"}'] == 2


def test_disconnect_mid_generation_frees_the_caches(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama)
    client = RawClient(server.ws_url)
    session = client.open("SSSCCC")
    client.forward(session, (0, 3), (0, 8), torch.arange(3, 11)[None])
    assert client.recv()[0]["type"] == "hidden"
    other = RawClient(server.ws_url)
    other_session = other.open("CSSSSS")
    other.forward(other_session, (1, 6), (0, 8), hidden(8))
    values = metrics(server.http_url)
    assert values["splitllm_open_sessions"] == 2 and values["splitllm_kv_cache_bytes"] > 0
    client.close()  # after a reply
    other.close()  # with a forward still in flight
    wait_for(lambda: metrics(server.http_url)["splitllm_open_sessions"] == 0)
    values = metrics(server.http_url)
    assert values["splitllm_kv_cache_bytes"] == 0
    assert values['splitllm_sessions_closed_total{reason="disconnect"}'] == 2


def test_a_reply_timeout_closes_the_connection_so_a_late_reply_is_never_misread(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama)
    prompt = random_prompt(random.Random(25), 9)
    real_run, release = server.state.stack.run, threading.Event()

    def held_run(*args: Any, **kwargs: Any) -> torch.Tensor:
        release.wait(TIMEOUT_S)  # the reply cannot come before the client gave up
        return real_run(*args, **kwargs)

    server.state.stack.run = held_run  # type: ignore[method-assign]
    with connect(server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as session:
        remote = RemoteSession(session.transport, Placement("SSSSSS"), 6, timeout_s=TIMEOUT_S)
        remote.timeout_s = 0.0  # give up at once: the `token` reply arrives late
        with pytest.raises(ServerError, match="timeout"):
            remote.forward((0, 6), torch.tensor([prompt]), (0, len(prompt)), return_logits=False)
        release.set()
        # The late reply would answer the next request: the client drops the connection
        # instead, which also frees the session on the server.
        wait_for(lambda: metrics(server.http_url)["splitllm_open_sessions"] == 0)
        dropped = session.transport
        with pytest.raises(ServerError, match=r"timed out.*connect again"):
            dropped.recv(TIMEOUT_S)
        # A generation counts the dropped connection as lost: it connects again (resume.py).
        result = session.generate(prompt, 2, placement="SSSSSS", stop_at_eos=False)
        assert result.reconnects == 1 and session.transport is not dropped
        assert list(result.tokens) == list(generate_tokens(LocalPipe(tiny_llama.model), prompt, 2))


def test_idle_sessions_time_out(tiny_llama: LoadedModel,
                                make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, idle_timeout_s=1.0)
    client = RawClient(server.ws_url)
    session = client.open("CCCSSS")
    client.forward(session, (3, 6), (0, 2), hidden(2))
    assert client.recv()[0]["type"] == "token"
    notice = client.expect_error("idle_timeout")
    assert notice["session"] == session
    assert metrics(server.http_url)["splitllm_open_sessions"] == 0
    client.forward(session, (3, 6), (2, 3), hidden(1))
    client.expect_error("unknown_session")
    client.close()


def test_sixteen_sessions_at_once(tiny_llama: LoadedModel,
                                  make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama)
    stack = UnitStack(tiny_llama.model)
    rng = random.Random(21)
    jobs = [(random_prompt(rng, rng.randint(4, 12)),
             "".join(rng.choice("CS") for _ in range(stack.n_units))) for _ in range(16)]
    wants = [list(generate_tokens(LocalPipe(tiny_llama.model), prompt, 8)) for prompt, _ in jobs]
    all_open = threading.Barrier(17, timeout=TIMEOUT_S)

    def run(job: tuple[list[int], str]) -> list[int]:
        prompt, placement = job
        placement = "S" + placement[1:]  # every job holds a server session
        transport = WebSocketTransport(server.ws_url)
        try:
            remote = RemoteSession(transport, Placement(placement), stack.n_units,
                                   timeout_s=TIMEOUT_S)
            all_open.wait()  # 16 sessions are open on the server at this point
            all_open.wait()
            pipe = SplitPipe(stack, Placement(placement), remote)
            tokens = list(generate_tokens(pipe, prompt, 8))
            remote.close()
            return tokens
        finally:
            transport.close()

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        all_open.wait()
        assert metrics(server.http_url)["splitllm_open_sessions"] == 16
        all_open.wait()
        results = [f.result(timeout=TIMEOUT_S * 3) for f in futures]
    assert results == wants
    assert metrics(server.http_url)["splitllm_open_sessions"] == 0


def test_compute_runs_off_the_event_loop(tiny_llama: LoadedModel,
                                         make_server: Callable[..., BackgroundServer],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    server = make_server(tiny_llama)
    started, release = threading.Event(), threading.Event()

    def held_step(*args: Any, **kwargs: Any) -> Any:
        started.set()
        release.wait(TIMEOUT_S)  # an engine step that lasts until the test lets it finish
        return run_step(*args, **kwargs)

    monkeypatch.setattr("splitllm.runtime.engine.run_step", held_step)
    busy = RawClient(server.ws_url)
    session = busy.open("CCCSSS")
    busy.forward(session, (3, 6), (0, 2), hidden(2))
    assert started.wait(TIMEOUT_S)
    # The forward cannot finish before `release`: these answers come while it is computing.
    assert httpx.get(server.http_url + "/health", timeout=TIMEOUT_S).status_code == 200
    pinger = RawClient(server.ws_url)
    pinger.send_json({"type": "ping", "t": "x"})
    assert pinger.recv()[0]["type"] == "pong"
    assert not release.is_set() and metrics(server.http_url)["splitllm_open_sessions"] == 1
    release.set()
    assert busy.recv()[0]["type"] == "token"
    busy.close()
    pinger.close()


def test_client_errors_are_clear(tiny_llama: LoadedModel, llama_server: BackgroundServer,
                                 tiny_gpt2: LoadedModel) -> None:
    with pytest.raises(UserError, match="another model"):
        connect(llama_server.ws_url, tiny_gpt2, timeout_s=TIMEOUT_S)
    with pytest.raises(UserError, match="cannot reach"):
        connect("ws://127.0.0.1:9", tiny_llama, timeout_s=TIMEOUT_S)
    with connect(llama_server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as session:
        with pytest.raises(UserError, match="6 units"):
            session.generate([4, 5], 2, placement="CS")
        with pytest.raises(ServerError, match="bad_positions"):
            session.generate(list(range(3, 300)), 2, placement="SSSSSS", prefill_chunk=512)
        # The connection survives a rejected request.
        assert len(session.generate([4, 5], 2, placement="SSSSSS", stop_at_eos=False).tokens) == 2
