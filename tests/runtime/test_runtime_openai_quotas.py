"""The OpenAI API counts against per-token quotas (issue 10, item 3), over real sockets.

An API request authorized by a token is a session of that token with one forward in flight at a
time, counted in the same `TokenQuota` as the token's WebSocket sessions: over the limit it gets
HTTP 429 (the official `openai` client raises RateLimitError), its forwards wait for the token's
slots, and whatever way it ends (done, error, client gone mid-stream) it gives both back. Beside
every attack a healthy split session of the other token gets the unsplit model's tokens.
Asserted on replies, the server's counters and the engine's queue, never on time.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from hostile_kit import ALL_SERVER, Greedy, HealthySession, kv_bytes
from openai_kit import Gate, reference
from runtime_kit import TIMEOUT_S, RawClient, metrics, wait_for

from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel

ALPHA, BETA = TOKENS = ("alpha-token", "beta-token")
PROMPT = "quick brown fox"


def api(server: BackgroundServer, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=token, timeout=TIMEOUT_S,
                         max_retries=0)


def complete(server: BackgroundServer, token: str, max_tokens: int) -> str:
    out = api(server, token).completions.create(
        model=server.state.loaded.model_id, prompt=PROMPT, max_tokens=max_tokens, temperature=0)
    return out.choices[0].text


def token_counters(server: BackgroundServer, token: str) -> tuple[float, float]:
    """The token's open sessions and forwards in flight, from the server's /metrics."""
    label = f'{{token="{TOKENS.index(token)}"}}'
    found = metrics(server.http_url, token)
    return found["splitllm_token_sessions" + label], found["splitllm_token_in_flight" + label]


@pytest.fixture(scope="module")
def want(tiny_llama_dir: Path) -> Callable[[int], str]:
    """The unsplit model's greedy text of PROMPT (`splitllm generate --local`)."""
    cache: dict[int, str] = {}

    def text(max_tokens: int) -> str:
        if max_tokens not in cache:
            cache[max_tokens] = reference(tiny_llama_dir, PROMPT, max_tokens, True)["text"]
        return cache[max_tokens]

    return text


def start(client: openai.OpenAI, model: str, kind: str, stream: bool) -> object:
    """Start a chat or text completion, streamed or not."""
    if kind == "chat":
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
            stream=stream)
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=4, stream=stream)


def test_a_token_at_its_session_limit_gets_429_on_the_api(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer],
        want: Callable[[int], str]) -> None:
    server = make_server(tiny_llama, tokens=TOKENS, max_sessions=4)  # 2 sessions per token
    healthy = HealthySession(tiny_llama, server, token=BETA)  # one of beta's two
    holder = RawClient(server.ws_url, token=ALPHA)
    holder.open(ALL_SERVER)
    holder.open(ALL_SERVER)  # alpha's two, on a WebSocket
    client = api(server, ALPHA)
    for kind in ("chat", "text"):
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as refused:
                start(client, tiny_llama.model_id, kind, stream)
            assert refused.value.status_code == 429
            assert (refused.value.code, refused.value.type) == ("rate_limit_exceeded", "requests")
            assert isinstance(refused.value.body, dict)
            assert "token holds 2 sessions" in refused.value.body["message"]
    assert complete(server, BETA, 6) == want(6)  # beta's other session: served, unsplit
    assert healthy.finish() == healthy.want
    holder.close()
    wait_for(lambda: token_counters(server, ALPHA) == (0, 0))
    assert complete(server, ALPHA, 6) == want(6)  # its sessions gone: alpha is served again
    assert token_counters(server, ALPHA) == (0, 0)


def test_api_requests_take_their_tokens_forward_slots_and_sessions(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer],
        want: Callable[[int], str]) -> None:
    server = make_server(tiny_llama, tokens=TOKENS, max_sessions_per_token=3,
                         max_in_flight_per_token=2)
    engine, quota = server.state.engine, server.state.quotas[0]
    beta = Greedy(tiny_llama, RawClient(server.ws_url, token=BETA), seed=150)
    with ThreadPoolExecutor(3) as pool:
        with engine.held_back():
            requests = [pool.submit(complete, server, ALPHA, 5) for _ in range(3)]
            beta.send_prefill()
            # Two of alpha's prefills queued, the third waits for a slot; beta's is queued.
            wait_for(lambda: quota.waiting == 1 and engine.queued() == 3)
            assert len(quota.sessions) == 3 and quota.in_flight == 2
            assert beta.session in {job.session.session_id for job in engine.queue}
            late = RawClient(server.ws_url, token=ALPHA)  # its API requests hold alpha's 3
            late.send_json({"type": "open", "placement": ALL_SERVER})
            assert "token" in late.expect_error("busy")["message"]
            first_step = len(engine.history)
        assert [request.result() for request in requests] == [want(5)] * 3
    assert beta.finish() == beta.want
    steps = list(engine.history)[first_step:]
    assert beta.session in {row.session for row in steps[0]} and len(steps[0]) == 3
    assert (len(quota.sessions), quota.in_flight, quota.waiting) == (0, 0, 0)
    late.close()
    beta.client.close()


def test_a_client_gone_mid_stream_gives_back_its_tokens_slot(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer],
        want: Callable[[int], str]) -> None:
    server = make_server(tiny_llama, tokens=TOKENS, max_sessions=4)  # 2 sessions per token
    healthy = HealthySession(tiny_llama, server, token=BETA)
    client = api(server, ALPHA)
    with Gate(server) as gate:
        gate.let_through(3)  # the prompt and two tokens, then every forward waits here
        stream = client.completions.create(model=tiny_llama.model_id, prompt=PROMPT,
                                           max_tokens=100, temperature=0, stream=True)
        first = next(iter(stream))
        assert want(100).startswith(first.choices[0].text)
        # The fourth forward waits at the gate, holding alpha's one slot in flight.
        wait_for(lambda: gate.passed == 3 and token_counters(server, ALPHA) == (1, 1))
        stream.close()  # the client goes away mid-stream
        client.close()
        passed = gate.passed
        for _ in range(40):  # noticed at once (ASGI 2.3) or at the next token sent (2.4)
            if token_counters(server, ALPHA) == (0, 0):
                break
            gate.let_through(1)
            wait_for(lambda seen=passed: gate.passed > seen
                     or token_counters(server, ALPHA) == (0, 0))
            passed = gate.passed
        assert token_counters(server, ALPHA) == (0, 0)
        assert gate.passed < 20  # of the 100 tokens asked for
    assert healthy.finish() == healthy.want
    assert complete(server, ALPHA, 6) == want(6)


def test_an_api_request_that_fails_gives_back_its_tokens_slot(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer],
        want: Callable[[int], str]) -> None:
    server = make_server(tiny_llama, tokens=TOKENS, max_sessions=2,  # 1 session per token
                         max_kv_bytes=kv_bytes(tiny_llama, 48))
    healthy = HealthySession(tiny_llama, server, token=BETA)
    client = api(server, ALPHA)
    for _ in range(3):  # each failure returns the token's one session and its slot
        with pytest.raises(openai.InternalServerError) as failed:
            client.completions.create(model=tiny_llama.model_id, prompt="fox " * 60,
                                      max_tokens=2)
        assert (failed.value.status_code, failed.value.code) == (503, "over_capacity")
        assert token_counters(server, ALPHA) == (0, 0)
    assert complete(server, ALPHA, 6) == want(6)
    assert healthy.finish() == healthy.want



def test_an_api_requests_idle_session_is_swept_and_the_sweeper_goes_on(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer],
        want: Callable[[int], str]) -> None:
    # The sweeper told a swept session's owner; an API request's owner could not be told, and
    # the sweeper died on it: no session was ever swept again.
    server = make_server(tiny_llama, tokens=TOKENS, idle_timeout_s=1.0)
    swept = 'splitllm_sessions_closed_total{reason="idle_timeout"}'
    with ThreadPoolExecutor(1) as pool, Gate(server):  # the gate opens first
        held = pool.submit(complete, server, ALPHA, 4)  # its forward held: its session idles
        wait_for(lambda: metrics(server.http_url, ALPHA).get(swept, 0) == 1)
        idle = RawClient(server.ws_url, token=BETA)
        session = idle.open("CCCSSS")
        assert idle.expect_error("idle_timeout")["session"] == session  # swept too
        idle.close()
    with pytest.raises(openai.APIError):  # its session is gone when its forward runs
        held.result(timeout=TIMEOUT_S)
    assert metrics(server.http_url, ALPHA)[swept] == 2
    assert token_counters(server, ALPHA) == (0, 0)
    assert complete(server, ALPHA, 6) == want(6)
