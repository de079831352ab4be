"""Reconnection's pieces without a network: the backoff schedule and the replaying pipe."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from runtime_kit import random_prompt

from splitllm.errors import UserError
from splitllm.runtime.decoding import LocalPipe, generate_tokens
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.resume import Backoff, Replaying, Resumable, redial
from splitllm.runtime.transport import ServerError


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(times: int) -> tuple[list[int], Callable[[], str]]:
    calls: list[int] = []

    def dial() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise UserError(f"refused {len(calls)}")
        return "connected"

    return calls, dial


def test_redial_backs_off_doubling_up_to_the_cap() -> None:
    clock = VirtualClock()
    calls, dial = failing(5)
    got = redial(dial, Backoff(first_delay_s=0.25, max_delay_s=1.0), 100.0,
                 sleep=clock.sleep, clock=lambda: clock.now)
    assert got == "connected" and len(calls) == 6
    assert clock.sleeps == [0.25, 0.5, 1.0, 1.0, 1.0]


def test_redial_gives_up_at_the_deadline_with_the_last_error() -> None:
    clock = VirtualClock()
    calls, dial = failing(1000)
    with pytest.raises(UserError, match="refused"):
        redial(dial, Backoff(first_delay_s=1.0, max_delay_s=4.0), 10.0,
               sleep=clock.sleep, clock=lambda: clock.now)
    assert clock.sleeps == [1.0, 2.0, 4.0, 3.0]  # the last wait ends at the deadline
    assert len(calls) == 5


def test_a_zero_retry_budget_dials_once() -> None:
    clock = VirtualClock()
    calls, dial = failing(1000)
    with pytest.raises(UserError):
        redial(dial, Backoff(retry_s=0.0), 0.0,
               sleep=clock.sleep, clock=lambda: clock.now)
    assert len(calls) == 1 and clock.sleeps == []


def test_replaying_feeds_the_kept_tokens_and_counts_differences(tiny_llama: LoadedModel) -> None:
    prompt = random_prompt(random.Random(3), 7)
    want = list(generate_tokens(LocalPipe(tiny_llama.model), prompt, 10))
    exact = Replaying(LocalPipe(tiny_llama.model), want[:6])
    assert list(generate_tokens(exact, prompt, 10)) == want
    assert exact.mismatches == 0
    forced = [(token + 1) % 320 for token in want[:3]]  # tokens this model would not choose
    replay = Replaying(LocalPipe(tiny_llama.model), forced)
    assert list(generate_tokens(replay, prompt, 10))[:3] == forced
    assert replay.mismatches == 3


def test_resumable_replays_after_a_loss_and_yields_each_token_once(
        tiny_llama: LoadedModel) -> None:
    prompt = random_prompt(random.Random(4), 9)
    want = list(generate_tokens(LocalPipe(tiny_llama.model), prompt, 12, chunk_tokens=4))
    losses: list[int] = []

    class Dropping(LocalPipe):
        """Loses the connection on its 7th pass, the first time only."""

        passes = 0

        def forward(self, ids, start, sample):  # type: ignore[no-untyped-def]
            Dropping.passes += 1
            if Dropping.passes == 7:
                raise ServerError("closed", "the server closed the connection")
            return super().forward(ids, start, sample)

    resumable = Resumable(lambda: Dropping(tiny_llama.model),
                          lambda lost, kept: losses.append(kept))
    assert list(resumable.tokens(prompt, 12, chunk_tokens=4)) == want
    assert losses == [4] and resumable.reconnects == 1 and resumable.mismatches == 0


def test_resumable_lets_other_server_errors_through(tiny_llama: LoadedModel) -> None:
    class Rejecting(LocalPipe):
        def forward(self, ids, start, sample):  # type: ignore[no-untyped-def]
            raise ServerError("busy", "too many sessions")

    resumable = Resumable(lambda: Rejecting(tiny_llama.model),
                          lambda lost, kept: pytest.fail("not a lost connection"))
    with pytest.raises(ServerError, match="busy"):
        list(resumable.tokens([5, 6, 7], 4))
