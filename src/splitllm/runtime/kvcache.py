"""KV cache layers for the server's sessions: preallocated buffers grown a few times.

transformers' `DynamicLayer` concatenates every new token onto the whole past (a copy of the
context per token and layer); its `StaticLayer` preallocates the maximum context up front (a
session of SmolLM2 at 8192 tokens: 377 MB, before it has said a word). `BlockLayer` sits between
them: a step writes its new positions in place, a rollback (speculative decoding) only moves the
length back, and what the server accounts against its KV budget is what the buffers reserve
(`kv_capacity`: whole blocks of `KV_BLOCK_TOKENS`, grown by half each time, so a long context
grows its buffers a few times rather than once per block). A segment's layers keep their K/V in
one `KvArena` and grow together, one allocation and one copy: every growth replaces the buffers
the compiled decode holds views of (runtime/lane.py takes the new ones; it once built all its
arguments again, which grown a block at a time cost ~0.14 ms per token on SmolLM2).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

KV_BLOCK_TOKENS = 16  # the unit of what a cache reserves: the smallest capacity and each step
KV_GROWTH = 1.5  # each capacity past the first is at least this times the one before


def kv_capacity(tokens: int) -> int:
    """Positions a block-grown cache reserves to hold `tokens` positions: the first of 16, 32,
    48, 80, 128, 192, 288, ... (whole blocks, each at least 1.5x the one before) that holds them
    (one function of the tokens: the KV budget counts exactly what the buffers reserve)."""
    capacity = KV_BLOCK_TOKENS if tokens > 0 else 0
    while capacity < tokens:
        capacity = -(-int(capacity * KV_GROWTH) // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
    return capacity


def _held_positions(buffer: str) -> Any:
    """A property: the buffer's held positions [1, H, length, d] (None before the first
    update); only transformers' None may be assigned to it."""

    def get(layer: BlockLayer) -> torch.Tensor | None:
        return getattr(layer, buffer)[:, :, :layer.length] if layer.is_initialized else None

    def set_(layer: BlockLayer, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError(f"BlockLayer's {buffer} views are its held positions")

    return property(get, set_)


class KvArena:
    """The K/V of a segment's block-grown layers in one tensor [slots, 2, Hkv, capacity, d]: the
    layers join as they first see their K/V (the first sets the slots' shape), hold views of
    their slot, and grow together (one allocation, one copy of the held positions). It refers
    to its members weakly, as they refer to it: a cycle held a closed session's K/V until a
    collection of the garbage."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.members: list[weakref.ref[BlockLayer]] = []
        self.storage: torch.Tensor | None = None  # [slots, 2, Hkv, capacity, d]

    def join(self, layer: BlockLayer, keys: torch.Tensor) -> bool:
        """Whether the layer, whose K/V are shaped as `keys` [1, Hkv, t, d], keeps them here
        (False: another shape, dtype or device than the members', or no slot left)."""
        if len(self.members) == self.slots or keys.shape[0] != 1:
            return False
        if self.storage is None:
            self.storage = keys.new_empty(self.slots, 2, keys.shape[1], 0, keys.shape[3])
        _, _, heads, _, dim = self.storage.shape
        if keys.shape[1] != heads or keys.shape[3] != dim or keys.dtype != self.storage.dtype \
                or keys.device != self.storage.device:
            return False
        self.members.append(weakref.ref(layer))
        self._point(len(self.members) - 1)
        return True

    def grow(self, capacity: int) -> None:
        """Room for `capacity` positions in every slot, each member's held positions kept."""
        assert self.storage is not None  # a member joined
        old, top = self.storage, max((member.length for member in self._living()), default=0)
        self.storage = old.new_empty(*old.shape[:3], capacity, old.shape[4])
        self.storage[:, :, :, :top] = old[:, :, :, :top]  # [slots, 2, Hkv, top, d]
        for slot in range(len(self.members)):
            self._point(slot)

    def nbytes(self) -> int:
        """Bytes the arena reserves (every slot, held positions and room to grow)."""
        return 0 if self.storage is None else self.storage.numel() * self.storage.element_size()

    def _living(self) -> list[BlockLayer]:
        return [member for ref in self.members if (member := ref()) is not None]

    def _point(self, slot: int) -> None:
        assert self.storage is not None
        member = self.members[slot]()
        if member is None:
            return
        member.key_buffer = self.storage[slot, 0][None]  # [1, Hkv, capacity, d]
        member.value_buffer = self.storage[slot, 1][None]


class BlockLayer(DynamicLayer):
    """One full-attention layer's K/V [1, H, capacity, d], written in place; keys/values are the
    held positions' views, so everything that reads a DynamicLayer reads this one alike. With
    an arena (a segment's layers), the buffers are views of its storage."""

    def __init__(self, arena: KvArena | None = None) -> None:
        super().__init__()
        self.arena = arena

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.length = 0
        self.key_buffer = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[3])
        self.value_buffer = value_states.new_empty(*value_states.shape[:2], 0,
                                                   value_states.shape[3])
        if self.arena is not None and (value_states.shape != key_states.shape
                                       or not self.arena.join(self, key_states)):
            self.arena = None  # K/V unlike the other layers': buffers of its own
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions [1, H, t, d] after the held ones; all held K/V back."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.reserve(key_states.shape[-2])
        end = self.length + key_states.shape[-2]
        keys[:, :, self.length:end] = key_states
        values[:, :, self.length:end] = value_states
        self.advance(key_states.shape[-2])
        return keys[:, :, :end], values[:, :, :end]

    def reserve(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Room for `tokens` more positions after the held ones (once initialized): the whole
        buffers [1, H, capacity, d], to write the new positions in place."""
        end = self.length + tokens
        if end > self.key_buffer.shape[-2]:
            self._grow(kv_capacity(end))
        return self.key_buffer, self.value_buffer

    def advance(self, tokens: int) -> None:
        """Hold `tokens` more positions, written in place after `reserve`."""
        self.length += tokens

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the latest |tokens_to_remove| positions (negative, as DynamicLayer.crop)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of positions to remove")
        if self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)

    def nbytes(self) -> int:
        """Bytes the buffers reserve (held positions and room to grow; in an arena: its slot)."""
        if not self.is_initialized:
            return 0
        return sum(b.numel() * b.element_size() for b in (self.key_buffer, self.value_buffer))

    def _grow(self, capacity: int) -> None:
        if self.arena is not None:
            self.arena.grow(capacity)
            return
        shape = (*self.key_buffer.shape[:2], capacity)
        keys = self.key_buffer.new_empty(*shape, self.key_buffer.shape[3])
        values = self.value_buffer.new_empty(*shape, self.value_buffer.shape[3])
        keys[:, :, :self.length] = self.key_buffer[:, :, :self.length]
        values[:, :, :self.length] = self.value_buffer[:, :, :self.length]
        self.key_buffer, self.value_buffer = keys, values

    # The held positions' views, made when read: a fused decode step advances every layer
    # and reads none of them (transformers' own code assigns None once, at construction).
    keys = _held_positions("key_buffer")
    values = _held_positions("value_buffer")
