"""One server-side session: the server segments of a placement, their KV caches, the sampler.

Network-free and synchronous: the engine checks and prepares forwards here, then runs them
batched with other sessions' (runtime/engine.py). Every check happens before any state changes:
a rejected message leaves the session usable.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from splitllm.errors import UserError
from splitllm.placement import SERVER, Placement
from splitllm.runtime.kvcache import kv_capacity
from splitllm.runtime.lane import drop_lanes
from splitllm.runtime.protocol import (
    DTYPE_NAMES,
    ID_DTYPES,
    ForwardHeader,
    ProtocolError,
    Sampling,
    decode_tensor,
)
from splitllm.runtime.sampling import Sampler
from splitllm.runtime.units import SegmentCache, UnitStack

_ID_NUMPY = {name: np.dtype(name) for name in ID_DTYPES}  # token ids, decoded by numpy


@dataclass(frozen=True)
class Limits:
    """What one session may ask of the server."""

    max_tokens_per_message: int = 1024
    max_context: int = 8192


def default_max_kv_bytes(device: torch.device) -> int:
    """Half the memory of the compute device: the rest holds weights, activations, the OS."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


class KvBudget:
    """The server's KV memory cap, shared by all sessions: bytes reserved as caches grow."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        # The engine thread reserves, the event loop releases; sessions hold it to do either
        # atomically with their own state.
        self.lock = threading.RLock()

    def reserve(self, nbytes: int) -> None:
        """Take `nbytes` of the budget, or ProtocolError `over_capacity` (nothing taken)."""
        with self.lock:
            if self.used_bytes + nbytes > self.limit_bytes:
                free = self.limit_bytes - self.used_bytes
                raise ProtocolError("over_capacity", f"this forward needs {nbytes / 2**20:.2f} "
                                    f"MiB more KV cache but the server's KV memory has "
                                    f"{free / 2**20:.2f} MiB of {self.limit_bytes / 2**20:.0f} "
                                    "MiB free; retry later or with a shorter context")
            self.used_bytes += nbytes

    def release(self, nbytes: int) -> None:
        with self.lock:
            self.used_bytes -= nbytes


@dataclass
class SegmentState:
    """One server segment [start, stop) of the placement and what it has seen."""

    start: int
    stop: int
    cache: SegmentCache | None
    next_position: int = 0
    reserved_tokens: int = 0  # context the KV budget holds for this segment


@dataclass(frozen=True)
class Prepared:
    """A checked forward: its segment and cache, its input on the compute device."""

    segment: SegmentState
    cache: SegmentCache | None
    x: torch.Tensor  # token ids [1, T] (units from embed) or hidden states [1, T, D]
    positions: tuple[int, int]
    units: tuple[int, int]
    rolled_back: int = 0  # positions the head's segment forgot (rejected drafts)


@dataclass(frozen=True)
class ForwardResult:
    """What a forward produced: hidden states [1, T, D] to send back, or a sampled token."""

    hidden: torch.Tensor | None
    token: int | None
    logits: torch.Tensor | None  # [1, V] float32 ([T, V] when verifying), only when asked for
    unit_seconds: tuple[float, ...]
    units: tuple[int, int]
    cpu_s: float = 0.0
    tokens: tuple[int, ...] | None = None  # verify: the token after every position
    rolled_back: int = 0  # positions the head's segment forgot before this forward


@dataclass
class ServerSession:
    """The server's part of one generation."""

    session_id: str
    stack: UnitStack
    placement: Placement
    wire_dtype: torch.dtype
    sampling: Sampling
    limits: Limits
    kv_budget: KvBudget | None = None
    owner: str = ""  # whose session (a connection): the engine shares prefill between owners
    segments: dict[int, SegmentState] = field(default_factory=dict)
    busy_s: float = 0.0  # wall seconds of compute
    cpu_s: float = 0.0  # CPU seconds of the compute thread (all of it with one torch thread)
    tokens_processed: int = 0
    tokens_sampled: int = 0
    last_active: float = field(default_factory=time.monotonic)
    closed: bool = False
    in_flight: int = 0  # forwards running now (the server's idle sweeper skips busy sessions)
    kv_reserved_bytes: int = 0

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.sampling)
        for seg in self.placement.segments():
            if seg.side == SERVER:
                cache = self.stack.new_cache(seg.start, seg.stop, grown_in_blocks=True)
                self.segments[seg.start] = SegmentState(seg.start, seg.stop, cache)

    @classmethod
    def open(cls, session_id: str, stack: UnitStack, placement: str, wire_dtype: torch.dtype,
             sampling: Sampling, limits: Limits, *, kv_budget: KvBudget | None = None,
             owner: str = "") -> ServerSession:
        """A new session, or ProtocolError if the placement does not fit the model."""
        try:
            parsed = Placement.parse(placement, stack.n_units)
        except UserError as exc:
            raise ProtocolError("bad_placement", str(exc)) from None
        return cls(session_id, stack, parsed, wire_dtype, sampling, limits, kv_budget, owner)

    @property
    def server_segments(self) -> list[tuple[int, int]]:
        return [(s.start, s.stop) for s in self.segments.values()]

    def cache_bytes(self) -> int:
        """Bytes of KV cache this session holds."""
        return sum(s.cache.nbytes() for s in self.segments.values() if s.cache is not None)

    def close(self) -> None:
        """Drop the caches (the memory is freed once no forward still runs on them)."""
        with self.kv_budget.lock if self.kv_budget else contextlib.nullcontext():
            self.closed = True
            if self.kv_budget is not None:
                self.kv_budget.release(self.kv_reserved_bytes)
            self.kv_reserved_bytes = 0
        drop_lanes(self.stack, [seg.cache for seg in self.segments.values()
                                 if seg.cache is not None])
        for seg in self.segments.values():
            seg.cache = None

    # -- checks ------------------------------------------------------------------------------

    def check(self, header: ForwardHeader) -> SegmentState:
        """The segment a forward addresses, after checking units, positions, dtype and shape."""
        if self.closed:
            raise ProtocolError("unknown_session", f"session {self.session_id} is closed")
        seg = self._segment(*header.units)
        p0, p1 = header.positions
        tokens = p1 - p0
        if p0 < 0 or tokens < 1:
            raise ProtocolError("bad_positions", f"positions [{p0}, {p1}) must be a non-empty "
                                "range of non-negative positions")
        if tokens > self.limits.max_tokens_per_message:
            raise ProtocolError("too_large", f"{tokens} tokens in one message; the limit is "
                                f"{self.limits.max_tokens_per_message} (send the prompt in chunks)")
        if p1 > self.limits.max_context:
            raise ProtocolError("bad_positions", f"position {p1 - 1} is past the context limit "
                                f"{self.limits.max_context}")
        expected = seg.cache.get_seq_length() if seg.cache is not None else seg.next_position
        if seg.cache is None:  # nothing to keep in step: only forwards never go back unasked
            follows = header.rollback or p0 >= expected
        else:
            follows = p0 <= expected if header.rollback else p0 == expected
        if not follows:
            raise ProtocolError("bad_positions", f"positions [{p0}, {p1}) do not follow units "
                                f"[{seg.start}, {seg.stop}): they hold positions [0, {expected})")
        self._check_speculation(header, seg)
        self._check_input(header, tokens)
        return seg

    def _check_speculation(self, header: ForwardHeader, seg: SegmentState) -> None:
        """A rollback needs a cache that can crop; verification needs the head."""
        if header.rollback and seg.cache is not None and not seg.cache.can_roll_back():
            raise ProtocolError("no_rollback", f"units [{seg.start}, {seg.stop}) hold sliding-"
                                "window layers, whose cache cannot roll back: speculative "
                                "decoding is not available for this model")
        if header.verify and header.units[1] != self.stack.n_units:
            raise ProtocolError("bad_units", "verify needs a forward that runs the head")

    def _segment(self, start: int, stop: int) -> SegmentState:
        n = self.stack.n_units
        if not 0 <= start < stop <= n:
            raise ProtocolError("bad_units", f"units [{start}, {stop}) out of bounds: the model "
                                f"has units 0..{n - 1}")
        seg = self.segments.get(start)
        # A pass that does not sample may stop before the head: [start, n - 1) of [start, n).
        head_skipped = seg is not None and seg.stop == n and stop == n - 1 and start < n - 1
        if seg is None or not (stop == seg.stop or head_skipped):
            raise ProtocolError("bad_units", f"units [{start}, {stop}) are not a server segment "
                                f"of placement {self.placement}: {self.server_segments}")
        return seg

    def _check_input(self, header: ForwardHeader, tokens: int) -> None:
        if header.units[0] == 0:
            if header.dtype not in ID_DTYPES or header.shape != [1, tokens]:
                raise ProtocolError("bad_shape", f"units starting at embed take token ids: dtype "
                                    f"int64 or int32, shape [1, {tokens}]; got {header.dtype} "
                                    f"{header.shape}")
            return
        wire = DTYPE_NAMES[self.wire_dtype]
        if header.dtype != wire:
            raise ProtocolError("bad_dtype", f"hidden states must be {wire} (the session's wire "
                                f"dtype); got {header.dtype}")
        want = [1, tokens, self.stack.hidden_size]
        if header.shape != want:
            raise ProtocolError("bad_shape", f"hidden states must have shape {want}; got "
                                f"{header.shape}")

    # -- input -------------------------------------------------------------------------------

    def prepare(self, header: ForwardHeader, payload: bytes | memoryview,
                device: torch.device) -> Prepared:
        """Check a forward and decode its input onto `device`: ProtocolError if it is bad."""
        seg = self.check(header)
        if header.units[0] == 0:  # in numpy (its calls cost less than torch's), then one tensor
            ids = np.frombuffer(payload, dtype=_ID_NUMPY[header.dtype]).astype(
                np.int64).reshape(header.shape)  # [1, T], T >= 1 (checked): a copy
            if ids.min() < 0 or ids.max() >= self.stack.vocab_size:
                raise ProtocolError("bad_values", f"token ids must lie in [0, "
                                    f"{self.stack.vocab_size})")
            x = torch.from_numpy(ids)
        else:
            x = decode_tensor(header, payload)
            if not bool(torch.isfinite(x).all()):
                raise ProtocolError("bad_values", "hidden states contain NaN or infinity")
            x = x.to(self.stack.dtype)
        self._reserve_kv(seg, header.positions[1])  # the last check: it may refuse
        p0 = header.positions[0]
        held = seg.cache.get_seq_length() if seg.cache is not None else seg.next_position
        rolled_back = held - p0 if header.rollback and seg.stop == self.stack.n_units else 0
        if header.rollback and seg.cache is not None:  # every check passed: now forget
            seg.cache.roll_back(p0)
        # The cache is held here: a concurrent close() may drop the segment's reference.
        return Prepared(seg, seg.cache, x if device.type == "cpu" else x.to(device),
                        header.positions, header.units, max(rolled_back, 0))

    def _reserve_kv(self, seg: SegmentState, context_tokens: int) -> None:
        """Grow the segment's share of the KV budget to what its cache reserves to hold
        `context_tokens` (whole blocks, runtime/kvcache.py): the last check."""
        reserved = kv_capacity(context_tokens)
        if self.kv_budget is None or seg.cache is None or reserved <= seg.reserved_tokens:
            return
        units = range(seg.start, seg.stop)
        grow = sum(self.stack.kv_bytes(u, reserved) - self.stack.kv_bytes(
            u, seg.reserved_tokens) for u in units)
        with self.kv_budget.lock:  # not after a concurrent close() released this session
            if self.closed:
                raise ProtocolError("unknown_session", f"session {self.session_id} is closed")
            self.kv_budget.reserve(grow)
            seg.reserved_tokens = reserved
            self.kv_reserved_bytes += grow

    def record(self, prepared: Prepared, busy_s: float, cpu_s: float, sampled: bool) -> None:
        """Account a finished forward of this session."""
        p0, p1 = prepared.positions
        prepared.segment.next_position = p1
        self.tokens_processed += p1 - p0
        self.tokens_sampled += int(sampled)
        self.busy_s += busy_s
        self.cpu_s += cpu_s
        self.last_active = time.monotonic()
