"""Surviving the server: reconnect with bounded backoff, fail over, replay the kept tokens.

The client knows every token of its generation. When the connection is lost (closed, reset,
or no reply within the timeout) it connects again (the servers in the order given), opens a
new session with the same placement and sampling, and repeats the generation's passes with
the tokens it already has: the prompt in the same chunks, then one pass per kept token, each
fed the kept token whatever the pass samples. Every segment's cache (the client's are rebuilt
the same way) then holds what the lost run computed, and every sampler (the server's when it
holds the head, the client's otherwise) draws the token at each position with that position's
own seed, so the tokens that follow are those of an uninterrupted run. The replay costs one
pass per kept token.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from splitllm.errors import UserError
from splitllm.runtime.decoding import DEFAULT_PREFILL_CHUNK, Pipe, generate_tokens
from splitllm.runtime.transport import ServerError

DEFAULT_RETRY_S = 30.0
LOST = frozenset({"closed", "timeout"})  # ServerError codes of a lost connection

T = TypeVar("T")


def is_lost(exc: BaseException) -> bool:
    """Whether an error means the connection is gone (rather than a rejected message)."""
    return isinstance(exc, ServerError) and exc.code in LOST


class Replaying:
    """A pipe whose first samples are the kept tokens (a replay); it samples as usual after."""

    def __init__(self, pipe: Pipe, kept: Sequence[int]) -> None:
        self.pipe = pipe
        self.kept = tuple(kept)
        self.samples = 0
        self.mismatches = 0  # kept tokens that this replay sampled differently
        self.last_logits: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor, start: int, sample: bool) -> int | None:
        token = self.pipe.forward(ids, start, sample)
        self.last_logits = self.pipe.last_logits
        if not sample or self.samples >= len(self.kept):
            return token
        kept = self.kept[self.samples]
        self.samples += 1
        self.mismatches += token != kept
        return kept  # what the user already has: the continuation must follow it


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """How to retry after a lost connection: waits double from first_delay_s up to max_delay_s."""

    retry_s: float = DEFAULT_RETRY_S  # no new attempt starts later than this after the loss
    first_delay_s: float = 0.25
    max_delay_s: float = 4.0


def redial(dial: Callable[[], T], backoff: Backoff, deadline: float, *,
           sleep: Callable[[float], None] = time.sleep,
           clock: Callable[[], float] = time.monotonic) -> T:
    """dial() until it succeeds; its last error once `deadline` (on `clock`) has passed."""
    delay_s = backoff.first_delay_s
    while True:
        try:
            return dial()
        except (UserError, ServerError):
            left_s = deadline - clock()
            if left_s <= 0:
                raise
            sleep(min(delay_s, left_s))
            delay_s = min(2 * delay_s, backoff.max_delay_s)


class Resumable:
    """The new tokens of one generation, carried across lost connections by replay."""

    def __init__(self, start: Callable[[], Pipe],
                 recover: Callable[[ServerError, int], None]) -> None:
        self.start = start  # a new pipe (and server session) on the current connection
        self.recover = recover  # reconnects after a loss, given the kept tokens; raises if not
        self.kept: list[int] = []
        self.replays: list[Replaying] = []
        self.reconnects = 0

    @property
    def mismatches(self) -> int:
        """Kept tokens that a replay sampled differently (0: the rebuilt state was exact)."""
        return sum(replay.mismatches for replay in self.replays)

    def tokens(self, prompt_ids: Sequence[int], max_new_tokens: int, *,
               eos_token_ids: Sequence[int] = (),
               chunk_tokens: int = DEFAULT_PREFILL_CHUNK,
               speculate: int | str = 0) -> Iterator[int]:
        """Yield each new token once; after a lost connection, recover and replay the kept.

        Speculation (the same tokens either way: greedy, or per-position seeds) runs until the
        first loss; a replay feeds the kept tokens one per pass, and the generation then goes
        on without drafts.
        """
        while True:
            try:
                pipe = self.start()
                drafts = speculate if not self.kept else 0
                replay = Replaying(pipe, self.kept)
                self.replays.append(replay)
                passes = generate_tokens(pipe if drafts else replay, prompt_ids, max_new_tokens,
                                         eos_token_ids=eos_token_ids, chunk_tokens=chunk_tokens,
                                         speculate=drafts)
                for token in itertools.islice(passes, len(replay.kept), None):
                    self.kept.append(token)
                    yield token
                return
            except ServerError as exc:
                if not is_lost(exc):
                    raise
                self.recover(exc, len(self.kept))
            self.reconnects += 1
