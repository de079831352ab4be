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
from transformers import DynamicCache, PreTrainedModel

from splitllm.placement import CLIENT, Placement
from splitllm.runtime.protocol import Sampling
from splitllm.runtime.sampling import Sampler
from splitllm.runtime.units import SegmentCache, UnitStack, cache_kwarg

DEFAULT_PREFILL_CHUNK = 512


@dataclass(frozen=True)
class RemoteResult:
    """What a server segment returned: hidden states [1, T, D], or a token (+ logits [1, V])."""

    hidden: torch.Tensor | None = None
    token: int | None = None
    logits: torch.Tensor | None = None


class Remote(Protocol):
    """The server's side of a session: runs its segments."""

    def forward(self, units: tuple[int, int], x: torch.Tensor, positions: tuple[int, int],
                return_logits: bool, return_hidden: bool = True) -> RemoteResult: ...


class Pipe(Protocol):
    """One forward pass over all units; returns the next token when `sample` is set."""

    last_logits: torch.Tensor | None

    def forward(self, ids: torch.Tensor, start: int, sample: bool) -> int | None: ...


class LocalPipe:
    """The unsplit model in-process: the reference every split must reproduce."""

    def __init__(self, model: PreTrainedModel, sampling: Sampling = Sampling()) -> None:
        self.model = model
        self.sampler = Sampler(sampling)
        self.cache = DynamicCache(config=model.config)
        self.cache_kw = cache_kwarg(model)
        self.last_logits: torch.Tensor | None = None

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start: int, sample: bool) -> int | None:
        positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)  # [1, T]
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_kw: self.cache})
        if not sample:
            return None
        self.last_logits = out.logits[:, -1, :].float()  # [1, V]
        return self.sampler(self.last_logits)


@dataclass
class SplitPipe:
    """Runs a Placement: client segments on `stack`, server segments through `remote`."""

    stack: UnitStack
    placement: Placement
    remote: Remote | None
    _: KW_ONLY
    sampling: Sampling = field(default_factory=Sampling)
    slowdown: float = 1.0  # emulation: client units take this many times longer
    return_logits: bool = False  # ask the server for logits too (tests)
    last_logits: torch.Tensor | None = None
    client_busy_s: float = 0.0

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.sampling)
        self.segments = self.placement.segments()
        self.caches: dict[int, SegmentCache | None] = {
            seg.start: self.stack.new_cache(seg.start, seg.stop)
            for seg in self.segments if seg.side == CLIENT
        }
        if self.remote is None and len(self.caches) != len(self.segments):
            raise ValueError(f"placement {self.placement} has server units but no server")

    def forward(self, ids: torch.Tensor, start: int, sample: bool) -> int | None:
        """ids [1, T] at positions [start, start + T)."""
        n = self.stack.n_units
        stop_unit = n if sample else n - 1  # a pass that does not sample skips the head
        span = (start, start + ids.shape[1])
        positions = torch.arange(*span).unsqueeze(0)  # [1, T]
        x: torch.Tensor = ids
        token: int | None = None
        for seg in self.segments:
            a, b = seg.start, min(seg.stop, stop_unit)
            if a >= b:
                continue
            if seg.side == CLIENT:
                x = self._run_local(a, b, x, positions)
                if b == n:
                    self.last_logits = x.float()  # [1, V]
                    token = self.sampler(x)
                continue
            assert self.remote is not None
            # A pass that does not sample needs nothing back from its last segment.
            want_hidden = b != n - 1 or sample
            result = self.remote.forward((a, b), x, span, self.return_logits, want_hidden)
            if b == n:
                token, self.last_logits = result.token, result.logits
            elif want_hidden:
                assert result.hidden is not None
                x = result.hidden.to(self.stack.dtype)  # [1, T, D]
        return token

    def _run_local(self, a: int, b: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        clock = time.perf_counter()
        out = self.stack.run(a, b, x, positions, self.caches[a])
        elapsed_s = time.perf_counter() - clock
        if self.slowdown > 1.0:  # emulation of a slower client device
            time.sleep(elapsed_s * (self.slowdown - 1.0))
        self.client_busy_s += elapsed_s * max(self.slowdown, 1.0)
        return out


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
                    eos_token_ids: Sequence[int] = (), chunk_tokens: int = DEFAULT_PREFILL_CHUNK
                    ) -> Iterator[int]:
    """Yield up to max_new_tokens new tokens; stops after an end-of-sequence token."""
    if max_new_tokens < 1:
        return
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    token = prefill(pipe, prompt_ids, chunk_tokens)
    position = len(prompt_ids)
    for produced in range(1, max_new_tokens + 1):
        yield token
        if token in eos_token_ids or produced == max_new_tokens:
            return
        token = decode_one_token(pipe, token, position)
        position += 1


@dataclass(frozen=True)
class Timed:
    """Tokens of one generation with its timings."""

    tokens: tuple[int, ...]
    ttft_s: float  # prompt in -> first new token out
    tpot_s: float  # mean time per output token after the first
    wall_s: float


def timed_generation(pipe: Pipe, prompt_ids: Sequence[int], max_new_tokens: int, *,
                     eos_token_ids: Sequence[int] = (), chunk_tokens: int = DEFAULT_PREFILL_CHUNK,
                     on_token: Callable[[int], None] | None = None) -> Timed:
    """Run `generate_tokens`, calling on_token as tokens arrive, and time it."""
    tokens: list[int] = []
    clock = time.perf_counter()
    first_s = 0.0
    for token in generate_tokens(pipe, prompt_ids, max_new_tokens, eos_token_ids=eos_token_ids,
                                 chunk_tokens=chunk_tokens):
        if not tokens:
            first_s = time.perf_counter() - clock
        tokens.append(token)
        if on_token is not None:
            on_token(token)
    wall_s = time.perf_counter() - clock
    tpot_s = (wall_s - first_s) / (len(tokens) - 1) if len(tokens) > 1 else 0.0
    return Timed(tuple(tokens), first_s, tpot_s, wall_s)
