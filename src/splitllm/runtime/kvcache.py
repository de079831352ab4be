"""KV cache layers for the server's sessions: preallocated buffers grown a block at a time.

transformers' `DynamicLayer` concatenates every new token onto the whole past (a copy of the
context per token and layer); its `StaticLayer` preallocates the maximum context up front (a
session of SmolLM2 at 8192 tokens: 377 MB, before it has said a word). `BlockLayer` sits between
them, as vLLM's blocks do: buffers grow `KV_BLOCK_TOKENS` at a time, a step writes its new
positions in place, a rollback (speculative decoding) only moves the length back, and what the
server accounts against its KV budget is what the buffers reserve (`kv_capacity`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

KV_BLOCK_TOKENS = 16  # positions reserved at a time: what the KV budget counts per segment


def kv_capacity(tokens: int) -> int:
    """Positions a block-grown cache reserves to hold `tokens` positions."""
    return -(-tokens // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS


def _held_positions(buffer: str) -> Any:
    """A property: the buffer's held positions [1, H, length, d] (None before the first
    update); only transformers' None may be assigned to it."""

    def get(layer: BlockLayer) -> torch.Tensor | None:
        return getattr(layer, buffer)[:, :, :layer.length] if layer.is_initialized else None

    def set_(layer: BlockLayer, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError(f"BlockLayer's {buffer} views are its held positions")

    return property(get, set_)


class BlockLayer(DynamicLayer):
    """One full-attention layer's K/V [1, H, capacity, d], written in place; keys/values are the
    held positions' views, so everything that reads a DynamicLayer reads this one alike."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.length = 0
        self.key_buffer = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[3])
        self.value_buffer = value_states.new_empty(*value_states.shape[:2], 0,
                                                   value_states.shape[3])
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
        """Bytes the buffers reserve (held positions and room to grow)."""
        if not self.is_initialized:
            return 0
        return sum(b.numel() * b.element_size() for b in (self.key_buffer, self.value_buffer))

    def _grow(self, capacity: int) -> None:
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
