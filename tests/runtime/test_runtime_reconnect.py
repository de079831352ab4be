"""The client survives the server (issue 10, item 6): real server processes, killed and frozen.

Servers are `splitllm serve` processes; the client runs here, and `on_token` kills or freezes a
server after a given number of tokens, so every test is driven by tokens, never by time.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from process_kit import SERVER_START_S, ServerProcess
from runtime_kit import TIMEOUT_S, random_prompt
from typer.testing import CliRunner

from splitllm.cli import app
from splitllm.runtime.client import Session, connect
from splitllm.runtime.commands import EXIT_INTERRUPTED
from splitllm.runtime.decoding import LocalPipe, generate_tokens
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.protocol import Sampling

NEW_TOKENS = 24
CUT_AT = 8  # tokens the client has when the server goes away
SAMPLED = Sampling(temperature=1.2, top_p=0.9, seed=4321)


@pytest.fixture
def start_server(tiny_llama_dir: Path, tmp_path: Path
                 ) -> Iterator[Callable[[], ServerProcess]]:
    """Start server processes (each serving before it is returned); all stopped afterwards."""
    started: list[ServerProcess] = []

    def start() -> ServerProcess:
        started.append(ServerProcess(tiny_llama_dir, tmp_path).start())
        return started[-1].wait_serving()

    yield start
    for server in started:
        server.stop()


def prompt_ids() -> list[int]:
    return random_prompt(random.Random(61), 11)


def unsplit(loaded: LoadedModel, sampling: Sampling) -> list[int]:
    return list(generate_tokens(LocalPipe(loaded.model, sampling), prompt_ids(), NEW_TOKENS,
                                chunk_tokens=4))


def after(count: int, action: Callable[[], None]) -> Callable[[int], None]:
    """An on_token callback that runs `action` once, when the count-th token arrives."""
    seen: list[int] = []

    def on_token(token: int) -> None:
        seen.append(token)
        if len(seen) == count:
            action()

    return on_token


@pytest.mark.parametrize(("placement", "sampling"), [
    ("CSSCSC", Sampling()),  # two server segments, greedy, the head on the client
    ("CCSSSS", SAMPLED),  # the server samples: its seeded generator is rebuilt by the replay
    ("SSSCCC", SAMPLED),  # the client samples
])
def test_a_killed_server_started_again_on_its_port_gives_the_unsplit_tokens(
        placement: str, sampling: Sampling, tiny_llama: LoadedModel,
        start_server: Callable[[], ServerProcess]) -> None:
    server = start_server()
    notices: list[str] = []

    def kill_and_restart() -> None:
        server.kill()
        server.start()  # the same port; the client retries until it serves

    with connect(server.ws_url, tiny_llama, timeout_s=TIMEOUT_S,
                 retry_s=SERVER_START_S) as session:
        result = session.generate(prompt_ids(), NEW_TOKENS, placement=placement,
                                  sampling=sampling, stop_at_eos=False, prefill_chunk=4,
                                  on_token=after(CUT_AT, kill_and_restart),
                                  on_notice=notices.append)
    assert list(result.tokens) == unsplit(tiny_llama, sampling)
    assert result.complete and result.reconnects == 1 and result.replay_mismatches == 0
    assert [line.split()[0] for line in notices] == ["lost", "reconnected"]
    assert f"after {CUT_AT} tokens" in notices[0] and f"replaying {CUT_AT} tokens" in notices[1]


def test_killing_the_first_server_fails_over_to_the_second(
        tiny_llama: LoadedModel, start_server: Callable[[], ServerProcess]) -> None:
    first, second = start_server(), start_server()
    with connect([first.ws_url, second.ws_url], tiny_llama, timeout_s=TIMEOUT_S,
                 retry_s=TIMEOUT_S) as session:
        assert session.server == first.ws_url
        result = session.generate(prompt_ids(), NEW_TOKENS, placement="CCSSSS",
                                  sampling=SAMPLED, stop_at_eos=False, prefill_chunk=4,
                                  on_token=after(CUT_AT, first.kill))
        assert session.server == second.ws_url
    assert list(result.tokens) == unsplit(tiny_llama, SAMPLED)
    assert result.complete and result.reconnects == 1 and result.replay_mismatches == 0


@pytest.mark.parametrize("loss", ["freeze", "kill"])
def test_a_lost_server_is_reported_with_the_partial_json_result(
        loss: str, tiny_llama: LoadedModel, tiny_llama_dir: Path,
        start_server: Callable[[], ServerProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    server = start_server()
    generate = Session.generate
    lose = server.freeze if loss == "freeze" else server.kill  # SIGSTOP or SIGKILL

    def generate_then_lose(self: Session, *args: object, **options: object) -> object:
        return generate(self, *args, on_token=after(CUT_AT, lose), **options)

    monkeypatch.setattr(Session, "generate", generate_then_lose)
    result = CliRunner().invoke(app, [
        "generate", "--model", str(tiny_llama_dir), "--server", server.ws_url, "--raw",
        "--prompt", "the quick brown fox", "--placement", "CCSSSS", "--max-new-tokens",
        str(NEW_TOKENS), "--threads", "1", "--json", "--timeout-s", "4", "--retry-s", "0"])
    assert result.exit_code == EXIT_INTERRUPTED, result.output
    partial = json.loads(result.stdout.strip().splitlines()[-1])
    ids = tiny_llama.tokenizer.encode("the quick brown fox")
    want = list(generate_tokens(LocalPipe(tiny_llama.model), ids, NEW_TOKENS,
                                eos_token_ids=tiny_llama.eos_token_ids))
    assert partial["complete"] is False
    assert CUT_AT <= len(partial["tokens"]) < len(want)  # a lost server sends nothing more
    assert partial["tokens"] == want[:len(partial["tokens"])]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    said = {"freeze": "no reply from the server within 4", "kill": "the server closed"}[loss]
    assert said in partial["error"] and said in errors[0]
    assert f"interrupted after {len(partial['tokens'])} tokens" in errors[0]
    assert "no server came back within 0 s" in errors[0]
