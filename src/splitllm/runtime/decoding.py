"""The decoding loop: prefill, decode_one_token, generate_tokens over a pipe of units.

A pipe runs one forward pass over all units for some tokens at absolute positions and, when
asked, returns the next token. `LocalPipe` is the unsplit Hugging Face model (the reference);
`SplitPipe` follows a Placement, running client segments here and server segments remotely.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Protocol

import torch
from transformers import PreTrainedModel

from splitllm.errors import UserError
from splitllm.placement import CLIENT, Placement
from splitllm.runtime.protocol import Sampling
from splitllm.runtime.sampling import Sampler
from splitllm.runtime.speculative import Drafter
from splitllm.runtime.units import SegmentCache, UnitStack, cache_kwarg

DEFAULT_PREFILL_CHUNK = 512

# Seconds an EMULATED client device takes to run units [a, b) over positions [start, start + T),
# called as (a, b, start, T): a device model the client's real compute is stretched to.
ClientClock = Callable[[int, int, int, int], float]


@dataclass(frozen=True)
class RemoteResult:
    """What a server segment returned: hidden states [1, T, D], or a token (+ logits [1, V])."""

    hidden: torch.Tensor | None = None
    token: int | None = None
    logits: torch.Tensor | None = None
    tokens: tuple[int, ...] | None = None  # verify: the token after every position


class Remote(Protocol):
    """The server's side of a session: runs its segments."""

    def forward(self, units: tuple[int, int], x: torch.Tensor, positions: tuple[int, int],
                return_logits: bool, return_hidden: bool = True, *, rollback: bool = False,
                verify: bool = False) -> RemoteResult: ...


class Pipe(Protocol):
    """One forward pass over all units; returns the next token when `sample` is set."""

    last_logits: torch.Tensor | None

    def forward(self, ids: torch.Tensor, start: int, sample: bool) -> int | None: ...


class Verifier(Pipe, Protocol):
    """A pipe that verifies draft tokens (speculative decoding) and counts them."""

    drafted: int  # draft tokens sent for verification
    accepted: int  # ... and those the model's tokens agreed with

    def verify(self, ids: torch.Tensor, start: int) -> tuple[int, ...]: ...


class LocalPipe:
    """The unsplit model in-process: the reference every split must reproduce."""

    def __init__(self, model: PreTrainedModel, sampling: Sampling = Sampling()) -> None:
        self.model = model
        self.sampler = Sampler(sampling)
        self.cache = SegmentCache(0, config=model.config)
        self.cache_kw = cache_kwarg(model)
        self.last_logits: torch.Tensor | None = None
        self.drafted = 0
        self.accepted = 0

    def forward(self, ids: torch.Tensor, start: int, sample: bool) -> int | None:
        """ids [1, T] at positions [start, start + T)."""
        logits = self._run(ids, start, 1)
        if not sample:
            return None
        self.last_logits = logits[:, -1, :].float()  # [1, V]
        return self.sampler(self.last_logits, start + ids.shape[1])

    def verify(self, ids: torch.Tensor, start: int) -> tuple[int, ...]:
        """The model's token after each of ids [1, T], the cache first cropped to `start`."""
        if start < self.cache.get_seq_length() and not self.cache.can_roll_back():
            raise UserError("this model's sliding-window cache cannot roll back")
        self.cache.roll_back(start)
        self.last_logits = self._run(ids, start, ids.shape[1])[0].float()  # [T, V]
        return self.sampler.each(self.last_logits, start + 1)

    @torch.inference_mode()
    def _run(self, ids: torch.Tensor, start: int, keep: int) -> torch.Tensor:
        positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)  # [1, T]
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True,
                         logits_to_keep=keep, **{self.cache_kw: self.cache})
        return out.logits  # [1, keep, V]


@dataclass
class SplitPipe:
    """Runs a Placement: client segments on `stack`, server segments through `remote`."""

    stack: UnitStack
    placement: Placement
    remote: Remote | None
    _: KW_ONLY
    sampling: Sampling = field(default_factory=Sampling)
    slowdown: float = 1.0  # emulation: client units take this many times longer
    client_clock: ClientClock | None = None  # emulation: client units take what this says
    compute_units: bool = True  # False: client units only take client_clock's time, their
    # outputs stand-ins of the right shape (a fleet's load on a server; not the model's tokens)
    return_logits: bool = False  # ask the server for logits too (tests)
    last_logits: torch.Tensor | None = None
    client_busy_s: float = 0.0
    held_positions: int = 0  # what the caches hold: a pass that starts below it rolls back
    round_trips: int = 0  # server segment calls (each one message out, one back)
    drafted: int = 0  # speculative decoding: draft tokens sent for verification
    accepted: int = 0  # ... and those the model's greedy choice agreed with

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.sampling)
        self.segments = self.placement.segments()
        self.caches: dict[int, SegmentCache | None] = {
            seg.start: self.stack.new_cache(seg.start, seg.stop)
            for seg in self.segments if seg.side == CLIENT
        }
        if self.remote is None and len(self.caches) != len(self.segments):
            raise ValueError(f"placement {self.placement} has server units but no server")
        if not self.compute_units and self.client_clock is None:
            raise ValueError("client units that are not computed need a client_clock")

    def forward(self, ids: torch.Tensor, start: int, sample: bool) -> int | None:
        """ids [1, T] at positions [start, start + T)."""
        tokens = self._pass(ids, start, sample, verify=False)
        return None if tokens is None else tokens[-1]

    def verify(self, ids: torch.Tensor, start: int) -> tuple[int, ...]:
        """The model's next token after each of ids [1, T] at [start, start + T): the caches
        first forget what they hold from `start` on (speculative decoding's rollback)."""
        tokens = self._pass(ids, start, True, verify=True)
        assert tokens is not None
        return tokens

    def _pass(self, ids: torch.Tensor, start: int, sample: bool, verify: bool
              ) -> tuple[int, ...] | None:
        n = self.stack.n_units
        rollback = start < self.held_positions
        stop_unit = n if sample else n - 1  # a pass that does not sample skips the head
        span = (start, start + ids.shape[1])
        positions = torch.arange(*span).unsqueeze(0)  # [1, T]
        x: torch.Tensor = ids
        tokens: tuple[int, ...] | None = None
        for seg in self.segments:
            a, b = seg.start, min(seg.stop, stop_unit)
            if a >= b:
                continue
            if seg.side == CLIENT:
                x = self._run_local(a, b, x, positions, start if rollback else None, verify)
                if b == n:
                    tokens = self._pick(x, span, verify)
                continue
            assert self.remote is not None
            # A pass that does not sample needs nothing back from its last segment.
            want_hidden = b != n - 1 or sample
            self.round_trips += 1
            flags = {"rollback": rollback, "verify": verify and b == n}
            result = self.remote.forward((a, b), x, span, self.return_logits, want_hidden,
                                         **{k: on for k, on in flags.items() if on})
            if b == n:
                self.last_logits = result.logits
                if not verify:
                    assert result.token is not None
                    tokens = (result.token,)
                elif result.tokens is None:
                    raise UserError("the server did not verify the draft tokens")
                else:
                    tokens = result.tokens
            elif want_hidden:
                assert result.hidden is not None
                x = result.hidden.to(self.stack.dtype)  # [1, T, D]
        self.held_positions = span[1]
        return tokens

    def _pick(self, logits: torch.Tensor, span: tuple[int, int], verify: bool
              ) -> tuple[int, ...]:
        """Tokens from the client's head: logits [1, V], or [1, T, V] when verifying."""
        if verify:
            self.last_logits = logits[0].float()  # [T, V]
            return self.sampler.each(self.last_logits, span[0] + 1)
        self.last_logits = logits.float()  # [1, V]
        return (self.sampler(self.last_logits, span[1]),)

    def _run_local(self, a: int, b: int, x: torch.Tensor, positions: torch.Tensor,
                   rollback_to: int | None, all_logits: bool) -> torch.Tensor:
        cache = self.caches[a]
        if not self.compute_units:
            return self._stand_in(a, b, x, positions, all_logits)
        if rollback_to is not None and cache is not None:
            if not cache.can_roll_back():
                raise UserError(f"units [{a}, {b}) hold sliding-window layers, whose cache "
                                "cannot roll back: speculative decoding is not available here")
            cache.roll_back(rollback_to)
        clock, cpu_clock = time.perf_counter(), time.thread_time()
        out = self.stack.run(a, b, x, positions, cache, all_logits=all_logits)
        elapsed_s = time.perf_counter() - clock
        emulated_s = 0.0
        if self.client_clock is not None:  # an emulated device model: its time, not ours
            emulated_s = self.client_clock(a, b, int(positions[0, 0]), positions.shape[1])
        elif self.slowdown > 1.0:  # emulation of a slower client device: slowdown x the CPU
            # time of this thread, so other threads on the core (many emulated clients in one
            # process, other load) do not stretch the emulated device's time as well
            emulated_s = (time.thread_time() - cpu_clock) * self.slowdown
        if emulated_s > elapsed_s:
            time.sleep(emulated_s - elapsed_s)
            elapsed_s = emulated_s
        self.client_busy_s += elapsed_s
        return out

    @torch.inference_mode()
    def _stand_in(self, a: int, b: int, x: torch.Tensor, positions: torch.Tensor,
                  all_logits: bool) -> torch.Tensor:
        """Units [a, b) not computed (`compute_units` off): they take their emulated time, and
        return what they would in shape: zero logits where the head is among them (token 0
        greedy), else the tokens' embedding where unit 0 is (hidden states of a real scale)
        or the hidden states as they came."""
        assert self.client_clock is not None
        emulated_s = self.client_clock(a, b, int(positions[0, 0]), positions.shape[1])
        time.sleep(emulated_s)
        self.client_busy_s += emulated_s
        if b == self.stack.n_units:
            rows = (positions.shape[1],) if all_logits else ()
            return torch.zeros((1, *rows, self.stack.vocab_size), dtype=self.stack.dtype)
        return self.stack.embed(x, positions) if a == 0 else x


def prefill(pipe: Pipe, prompt_ids: Sequence[int], chunk_tokens: int = DEFAULT_PREFILL_CHUNK
            ) -> int:
    """Run the prompt (in chunks of at most chunk_tokens) and return the first new token."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)  # [1, P]
    total = ids.shape[1]
    token: int | None = None
    for begin in range(0, total, chunk_tokens):
        end = min(begin + chunk_tokens, total)
        token = pipe.forward(ids[:, begin:end], begin, sample=end == total)
    assert token is not None
    return token


def decode_one_token(pipe: Pipe, token: int, position: int) -> int:
    """Feed one token at `position`; return the next."""
    next_token = pipe.forward(torch.tensor([[token]], dtype=torch.long), position, sample=True)
    assert next_token is not None
    return next_token


def generate_tokens(pipe: Pipe, prompt_ids: Sequence[int], max_new_tokens: int, *,
                    eos_token_ids: Sequence[int] = (), chunk_tokens: int = DEFAULT_PREFILL_CHUNK,
                    speculate: int | str = 0) -> Iterator[int]:
    """Yield up to max_new_tokens new tokens; stops after an end-of-sequence token.

    speculate (a Verifier): drafts per pass of speculative decoding, or 'auto'.
    """
    if max_new_tokens < 1:
        return
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    if speculate != 0:
        assert isinstance(pipe, LocalPipe | SplitPipe)
        yield from _speculate(pipe, prompt_ids, max_new_tokens, eos_token_ids=eos_token_ids,
                              chunk_tokens=chunk_tokens, drafter=Drafter(speculate))
        return
    token = prefill(pipe, prompt_ids, chunk_tokens)
    position = len(prompt_ids)
    for produced in range(1, max_new_tokens + 1):
        yield token
        if token in eos_token_ids or produced == max_new_tokens:
            return
        token = decode_one_token(pipe, token, position)
        position += 1


def _speculate(pipe: Verifier, prompt_ids: Sequence[int], max_new_tokens: int, *,
               eos_token_ids: Sequence[int], chunk_tokens: int, drafter: Drafter
               ) -> Iterator[int]:
    """Decoding that verifies prompt-lookup drafts: the same tokens, fewer passes.

    Each pass sends the last token and the drafter's drafts; the model's token after every
    position (greedy, or sampled with the seed of its position) accepts the longest agreeing
    prefix of the drafts plus one token of its own. With sampling this is the speculative-
    sampling rule for a draft that is certain (a point mass at draft x): x is accepted with
    probability p(x), and a rejection's token is drawn from p without x, renormalised, so the
    tokens are distributed as the model's (transformers' assisted generation does the same for
    drafts without logits). The positions of rejected drafts are rolled back by the next pass.
    A pass with no drafts and nothing to roll back is a plain decode step (the same token: its
    position's seed), so 'auto' with speculation off costs what decoding without it costs.
    """
    history = [*prompt_ids, prefill(pipe, prompt_ids, chunk_tokens)]
    produced = 1
    yield history[-1]
    clean = True  # the caches hold exactly the history but its last token
    while history[-1] not in eos_token_ids and produced < max_new_tokens:
        drafts = drafter.draft(history, max_new_tokens - produced - 1)
        if drafts or not clean:
            ids = torch.tensor([[history[-1], *drafts]], dtype=torch.long)  # [1, 1 + k]
            picked = pipe.verify(ids, len(history) - 1)
        else:
            picked = (decode_one_token(pipe, history[-1], len(history) - 1),)
        accepted = drafter.observe(drafts, picked)
        clean = accepted == len(drafts)
        pipe.drafted += len(drafts)
        pipe.accepted += accepted
        for token in (*drafts[:accepted], picked[accepted]):
            history.append(token)
            produced += 1
            yield token
            if token in eos_token_ids or produced == max_new_tokens:
                return


@dataclass(frozen=True)
class Timed:
    """Tokens of one generation with its timings."""

    tokens: tuple[int, ...]
    ttft_s: float  # prompt in -> first new token out
    tpot_s: float  # mean time per output token after the first
    wall_s: float


def timed_generation(pipe: Pipe, prompt_ids: Sequence[int], max_new_tokens: int, *,
                     eos_token_ids: Sequence[int] = (), chunk_tokens: int = DEFAULT_PREFILL_CHUNK,
                     on_token: Callable[[int], None] | None = None, speculate: int | str = 0
                     ) -> Timed:
    """Run `generate_tokens`, calling on_token as tokens arrive, and time it."""
    tokens: list[int] = []
    clock = time.perf_counter()
    first_s = 0.0
    for token in generate_tokens(pipe, prompt_ids, max_new_tokens, eos_token_ids=eos_token_ids,
                                 chunk_tokens=chunk_tokens, speculate=speculate):
        if not tokens:
            first_s = time.perf_counter() - clock
        tokens.append(token)
        if on_token is not None:
            on_token(token)
    wall_s = time.perf_counter() - clock
    tpot_s = (wall_s - first_s) / (len(tokens) - 1) if len(tokens) > 1 else 0.0
    return Timed(tuple(tokens), first_s, tpot_s, wall_s)
