"""Per-token quotas (issue 10, item 3, "with tokens, per-token"), over real sockets.

A server with several tokens counts the sessions and in-flight forwards of all connections of
one token together, and its OpenAI API requests (the official `openai` client) with them:
opening more connections, or calling the HTTP API, does not buy a token more than its share,
and another token's clients are unaffected. Asserted on replies, the server's counters and the
engine's queue, never on time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hostile_kit import ALL_SERVER, Greedy
from runtime_kit import RawClient, wait_for
from typer.testing import CliRunner

from splitllm.cli import app
from splitllm.errors import UserError
from splitllm.runtime.commands import server_tokens
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel

TOKENS = ("alpha-token", "beta-token")


def open_until_busy(client: RawClient, **fields: Any) -> tuple[list[str], dict[str, Any]]:
    """Open sessions until the server refuses: the sessions opened and the refusal."""
    opened = []
    while True:
        client.send_json({"type": "open", "placement": ALL_SERVER, **fields})
        reply = client.recv()[0]
        if reply["type"] != "opened":
            return opened, reply
        opened.append(reply["session"])


def test_connections_of_one_token_share_its_sessions(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    # 8 sessions shared equally between two tokens: 4 each, at most 3 per connection.
    server = make_server(tiny_llama, tokens=TOKENS, max_sessions=8,
                         max_sessions_per_connection=3)
    alpha = [RawClient(server.ws_url, token=TOKENS[0]) for _ in range(3)]
    opened, refusals = [], []
    for client in alpha:
        sessions, refusal = open_until_busy(client)
        opened.append(len(sessions))
        refusals.append(refusal)
    assert opened == [3, 1, 0]
    assert refusals[0]["code"] == "busy" and "connection" in refusals[0]["message"]
    assert all(r["code"] == "busy" and "token" in r["message"] for r in refusals[1:])
    in_open = RawClient(server.ws_url)  # the token in the first `open` counts the same
    in_open.send_json({"type": "open", "placement": ALL_SERVER, "token": TOKENS[0]})
    assert "token" in in_open.expect_error("busy")["message"]
    healthy = Greedy(tiny_llama, RawClient(server.ws_url, token=TOKENS[1]), seed=120)
    more, _ = open_until_busy(RawClient(server.ws_url, token=TOKENS[1]))
    assert len(more) == 3  # the other token still has all 4 of its own
    healthy.send_prefill()
    assert healthy.finish() == healthy.want
    alpha[1].close()  # its one session ends: one alpha session may open again, anywhere
    wait_for(lambda: len(server.state.quotas[0].sessions) == 3)
    assert len(open_until_busy(in_open, token=TOKENS[0])[0]) == 1
    assert server.state.info()["limits"]["max_sessions_per_token"] == 4


def test_forwards_of_one_token_in_flight_are_bounded_over_its_connections(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama, tokens=TOKENS, max_in_flight_per_token=2)
    engine, metrics = server.state.engine, server.state.metrics
    alpha = [Greedy(tiny_llama, RawClient(server.ws_url, token=TOKENS[0]), seed=130 + k,
                    new_tokens=1) for k in range(3)]
    beta = Greedy(tiny_llama, RawClient(server.ws_url, token=TOKENS[1]), seed=140)
    with engine.held_back():
        received = metrics.bytes_received
        frames = [run.prefill_frame() for run in [*alpha, beta]]
        for run, frame in zip([*alpha, beta], frames, strict=True):
            run.client.send(frame)  # three connections of alpha, one of beta
        # Every frame has reached the server: each forward is queued or waits for a slot.
        wait_for(lambda: metrics.bytes_received == received + sum(map(len, frames)))
        wait_for(lambda: engine.queued() == 3)
        assert {job.session.session_id for job in engine.queue} == {
            alpha[0].session, alpha[1].session, beta.session}  # alpha's third waits
        first_step = len(engine.history)
    for run in [*alpha, beta]:
        assert run.finish() == run.want
    steps = list(engine.history)[first_step:]
    assert {row.session for row in steps[0]} == {alpha[0].session, alpha[1].session,
                                                 beta.session}
    assert alpha[2].session in {row.session for row in steps[1]}
    for run in [*alpha, beta]:
        run.client.close()


def test_tokens_come_from_repeated_flags_and_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens.txt"
    token_file.write_text("# one per line\n\n  beta-token \ngamma-token\nalpha-token\n")
    assert server_tokens(["alpha-token"], token_file) == ("alpha-token", "beta-token",
                                                          "gamma-token")
    assert server_tokens([], None) == ()
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    runner = CliRunner()
    for args, message in [
        (["--token-file", str(tmp_path / "missing.txt")], "cannot read it"),
        (["--token-file", str(empty)], "no tokens in it"),
        (["--token", " padded"], "must not be empty"),
        (["--token", "x", "--max-sessions-per-token", "0"], "must be positive"),
        (["--message-timeout-s", "0"], "must be positive"),
    ]:
        result = runner.invoke(app, ["serve", "--model", "no-such-model", *args])
        assert isinstance(result.exception, UserError), (args, result.output)
        assert message in str(result.exception)
