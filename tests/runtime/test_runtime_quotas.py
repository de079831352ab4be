"""Fairness, quotas and the KV memory cap (issue 10, items 3 and 4), over real sockets.

A healthy all-server session runs beside every attack and must still get the unsplit model's
tokens. Fairness is asserted on the engine's step composition (which rows ran in which step),
never on time: the attackers' forwards are held back until queued, so the first step is known.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import httpx
from hostile_kit import ALL_SERVER, Greedy, ids, kv_bytes, token_of
from runtime_kit import TIMEOUT_S, RawClient, random_prompt, wait_for

from splitllm.runtime.decoding import LocalPipe, generate_tokens
from splitllm.runtime.engine import EngineConfig, Scheduled
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel


def rows_of(step: tuple[Scheduled, ...], session: str) -> int:
    """Tokens the session ran in this step."""
    return sum(row.tokens for row in step if row.session == session)


def test_long_prompts_on_other_connections_share_each_step(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    budget = 64
    server = make_server(tiny_llama, engine=EngineConfig(max_batch_tokens=budget))
    engine = server.state.engine
    attackers = [RawClient(server.ws_url) for _ in range(4)]
    healthy = Greedy(tiny_llama, RawClient(server.ws_url), seed=40)
    long_prompt = random_prompt(random.Random(41), 200)
    with engine.held_back():
        sessions = []
        for attacker in attackers:  # queued first: plain FCFS would run them before anyone else
            sessions.append(attacker.open(ALL_SERVER))
            attacker.forward(sessions[-1], (0, 6), (0, len(long_prompt)), ids(long_prompt))
        healthy.send_prefill()
        wait_for(lambda: engine.queued() == 5)
        first_step = len(engine.history)
    assert healthy.finish() == healthy.want
    want_attack = list(generate_tokens(LocalPipe(tiny_llama.model), long_prompt, 1))
    for attacker in attackers:
        assert token_of(attacker.recv()[0]) == want_attack[0]
        attacker.close()
    steps = list(engine.history)[first_step:]
    # The healthy prompt ran whole in the first step, beside an equal share of each attacker's.
    assert rows_of(steps[0], healthy.session) == len(healthy.prompt)
    shares = [rows_of(steps[0], s) for s in sessions]  # max-min fair: 55 tokens in 4 shares
    assert sum(shares) == budget - len(healthy.prompt) and set(shares) <= {13, 14}, shares
    # Every later healthy token was one decode row of its own step (beside whatever was queued).
    decode_steps = [s for s in steps[1:] if rows_of(s, healthy.session) == 1]
    assert len(decode_steps) == len(healthy.want) - 1
    healthy.client.close()


def test_sessions_on_one_connection_batch_and_in_flight_is_bounded(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, max_in_flight_per_connection=3)
    engine = server.state.engine
    client = RawClient(server.ws_url)
    runs = [Greedy(tiny_llama, client, seed=50 + k, new_tokens=1) for k in range(5)]
    healthy = Greedy(tiny_llama, RawClient(server.ws_url), seed=60)
    with engine.held_back():
        for run in runs:  # pipelined: none waits for the reply of the one before
            run.send_prefill()
        wait_for(lambda: engine.queued() == 3)  # the connection's limit: it reads no more
        first_step = len(engine.history)
    by_session = {}
    for _ in runs:  # replies come as forwards finish, matched by session
        reply = client.recv()[0]
        by_session[reply["session"]] = token_of(reply)
    assert [by_session[run.session] for run in runs] == [run.want[0] for run in runs]
    steps = list(engine.history)[first_step:]
    assert len(steps[0]) == 3  # three sessions of one connection in one step, no more
    assert {row.session for row in steps[0]} == {run.session for run in runs[:3]}
    healthy.send_prefill()
    assert healthy.finish() == healthy.want
    client.close()
    healthy.client.close()


def test_a_few_connections_cannot_take_every_session(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama)  # the default quotas: 64 sessions, 8 per connection
    greedy = [RawClient(server.ws_url) for _ in range(5)]
    opened = []
    for client in greedy:
        count = 0
        while True:
            client.send_json({"type": "open", "placement": ALL_SERVER})
            reply = client.recv()[0]
            if reply["type"] != "opened":
                assert reply["code"] == "busy", reply
                break
            count += 1
        opened.append(count)
    assert opened == [server.state.config.max_sessions_per_connection] * 5
    healthy = Greedy(tiny_llama, RawClient(server.ws_url), seed=70)
    healthy.send_prefill()
    assert healthy.finish() == healthy.want
    for client in [*greedy, healthy.client]:
        client.close()


def test_rejected_forwards_do_not_keep_a_session_alive(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    timeout_s = 5.0
    server = make_server(tiny_llama, idle_timeout_s=timeout_s)
    healthy = Greedy(tiny_llama, RawClient(server.ws_url), seed=80)
    healthy.send_prefill()
    squatter = RawClient(server.ws_url)
    session = squatter.open(ALL_SERVER)  # the clock starts here: no valid work will follow
    opened_at = server.state.sessions[session][0].last_active
    for _ in healthy.want:  # beside the healthy session: its valid work, the squatter's not
        squatter.forward(session, (0, 6), (100, 101), ids([5]))  # wrong positions: rejected
        squatter.expect_error("bad_positions")
        healthy.decode()
    assert healthy.got == healthy.want
    assert server.state.sessions[session][0].last_active == opened_at  # not refreshed
    healthy.client.send_json({"type": "close", "session": healthy.session})
    assert healthy.client.recv()[0]["type"] == "closed"
    codes = []
    stop = threading.Event()
    # Rejected forwards go on until the sweeper closes the session: 400 of them, each followed
    # by a 0.05 s pause, outlast the timeout and a sweep (a slower machine only adds time).
    for _ in range(400):
        squatter.forward(session, (0, 6), (100, 101), ids([5]))
        codes.append(squatter.recv()[0]["code"])
        if codes[-1] in ("idle_timeout", "unknown_session"):
            break
        stop.wait(0.05)
    assert codes[-1] in ("idle_timeout", "unknown_session"), codes[-3:]
    assert set(codes[:-1]) == {"bad_positions"}
    assert not server.state.sessions
    squatter.close()
    healthy.client.close()


def test_a_session_over_the_kv_cap_gets_over_capacity(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    cap = kv_bytes(tiny_llama, 128)  # 8 blocks of 16 positions
    server = make_server(tiny_llama, max_kv_bytes=cap)
    budget = server.state.kv_budget
    healthy = Greedy(tiny_llama, RawClient(server.ws_url), seed=90)
    healthy.send_prefill()
    healthy.decode()
    attacker = RawClient(server.ws_url)
    greedy = attacker.open(ALL_SERVER)
    attacker.forward(greedy, (0, 6), (0, 115), ids(random_prompt(random.Random(91), 115)))
    error = attacker.expect_error("over_capacity")
    assert error["session"] == greedy and error["fatal"] is False
    assert budget.used_bytes == kv_bytes(tiny_llama, len(healthy.prompt))  # nothing taken
    assert healthy.finish() == healthy.want  # undisturbed, and its cache still grows
    used_by_healthy = budget.used_bytes
    assert used_by_healthy == kv_bytes(tiny_llama, len(healthy.prompt) + len(healthy.want) - 1)
    healthy.client.send_json({"type": "close", "session": healthy.session})
    assert healthy.client.recv()[0]["type"] == "closed"
    assert budget.used_bytes == 0  # freed caches return their budget
    fits = Greedy(tiny_llama, attacker, seed=92, prompt_tokens=115, new_tokens=3)
    fits.send_prefill()
    assert fits.finish() == fits.want
    assert budget.used_bytes == kv_bytes(tiny_llama, 117)
    attacker.close()
    healthy.client.close()
    wait_for(lambda: budget.used_bytes == 0)  # a disconnect frees them too


def test_an_api_request_over_the_kv_cap_is_503(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, max_kv_bytes=kv_bytes(tiny_llama, 40))
    healthy = Greedy(tiny_llama, RawClient(server.ws_url), seed=95)
    healthy.send_prefill()
    healthy.decode()
    body = {"model": tiny_llama.model_id, "prompt": "fox " * 60, "max_tokens": 2}
    over = httpx.post(server.http_url + "/v1/completions", json=body, timeout=TIMEOUT_S)
    assert over.status_code == 503, over.text
    assert "KV" in over.json()["error"]["message"]
    assert healthy.finish() == healthy.want
    fits = httpx.post(server.http_url + "/v1/completions", timeout=TIMEOUT_S,
                      json={**body, "prompt": "fox"})
    assert fits.status_code == 200, fits.text
    healthy.client.close()
    wait_for(lambda: server.state.kv_budget.used_bytes == 0)
