"""A causal LM cut into placement units: embed, block0..block{n-1}, head (final norm + LM head).

Any run of consecutive units can execute on its own, given absolute token positions and the
KV cache of that run's blocks. Decoder layers are shared between sessions and sides, so their
`layer_idx` is never touched: each segment's cache maps its first block to index 0 instead.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from splitllm.runtime.families import (
    FULL,
    SLIDING,
    attention_layout,
    config_scale,
    module,
    splittable_family,
)
from splitllm.runtime.kvcache import BlockLayer, KvArena
from splitllm.runtime.models import context_tokens

# The mask each attention type's layers get in the models' own forwards.
MASKS = {FULL: create_causal_mask, SLIDING: create_sliding_window_causal_mask}


def unit_names(n_blocks: int) -> tuple[str, ...]:
    """Unit names in the planner's convention: embed, block0..block{n-1}, head."""
    return ("embed", *(f"block{i}" for i in range(n_blocks)), "head")


class SegmentCache(DynamicCache):
    """KV cache of one segment: blocks first_block.. are stored at cache indices 0.. .

    The attention layers call `update(..., self.layer_idx)` with their absolute index; shifting
    here (instead of re-numbering shared layers) keeps every session and side independent, and
    makes `get_seq_length()` (index 0) the length of this segment's own first block, which is
    what the causal mask of a chunked prefill must be sized against. Given the model config,
    each block gets the cache layer transformers gives it (a sliding-window layer keeps only
    its window), so masks built against this cache match the unsplit model's. With
    `grown_in_blocks` (the server's sessions), full-attention layers keep their K/V in
    block-grown buffers (runtime/kvcache.py) instead of concatenating the past per token.
    """

    def __init__(self, first_block: int, config: Any = None, n_blocks: int | None = None,
                 grown_in_blocks: bool = False) -> None:
        super().__init__(config=config)
        self.first_block = first_block
        self.arena: KvArena | None = None  # the block-grown layers' K/V, in one allocation
        if config is not None:
            stop = None if n_blocks is None else first_block + n_blocks
            layers = self.layers[first_block:stop]
            full = sum(type(layer) is DynamicLayer for layer in layers)
            self.arena = KvArena(full) if grown_in_blocks and full else None
            self.layers = [BlockLayer(self.arena) if self.arena is not None
                           and type(layer) is DynamicLayer
                           else layer for layer in layers]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
        *args: Any, **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().update(key_states, value_states, layer_idx - self.first_block,
                              *args, **kwargs)

    def can_roll_back(self) -> bool:
        """Whether crop() restores earlier lengths: not with a sliding window (it forgets)."""
        return not any(isinstance(layer, DynamicSlidingWindowLayer) for layer in self.layers)

    def roll_back(self, length: int) -> None:
        """Keep the first `length` positions (transformers 5.24 crops by a NEGATIVE count)."""
        extra = self.get_seq_length() - length
        if extra > 0:
            self.crop(-extra)

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values (block-grown layers: what they reserve)."""
        total = 0 if self.arena is None else self.arena.nbytes()  # its slots, taken or not
        for layer in self.layers:
            if isinstance(layer, BlockLayer):
                total += 0 if layer.arena is not None else layer.nbytes()
                continue
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total


def cache_kwarg(layer: nn.Module) -> str:
    """transformers 5.x decoder layers take `cache=`; older 5.x releases `past_key_values=`."""
    params = inspect.signature(layer.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class UnitStack:
    """The units of one causal LM, runnable in any consecutive range [start, stop)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.config = model.config
        self.family = str(model.config.model_type)
        spec = splittable_family(model.config)
        body: Any = module(model, spec.body, self.family)
        self.body = body
        self.embed_tokens: nn.Module = module(body, spec.embed, self.family)
        self.position_table: nn.Module | None = (
            module(body, spec.position_table, self.family) if spec.position_table else None)
        self.layers: Sequence[nn.Module] = module(body, spec.layers, self.family)
        self.final_norm: nn.Module = module(body, spec.norm, self.family)
        self.rotary_emb: nn.Module | None = (
            module(body, spec.rotary, self.family) if spec.rotary else None)
        self.rotary_per_layer_type = spec.rotary_per_layer_type
        self.embed_multiplier = config_scale(model.config, spec.embed_multiplier)
        self.logit_multiplier = config_scale(model.config, spec.logit_multiplier)
        self.logit_divisor = config_scale(model.config, spec.logit_divisor)
        self.logit_softcap = config_scale(model.config, spec.logit_softcap)
        self.lm_head: nn.Module = module(model, "lm_head", self.family)
        self.n_blocks = len(self.layers)
        layout = attention_layout(model.config)[:self.n_blocks]
        self.layer_types: tuple[str, ...] = tuple(kind for kind, _ in layout)
        self.layer_windows: tuple[int | None, ...] = tuple(window for _, window in layout)
        self.names = unit_names(self.n_blocks)
        self.n_units = len(self.names)
        self.hidden_size = int(model.config.hidden_size)
        self.vocab_size = int(model.config.vocab_size)
        self.dtype = next(model.parameters()).dtype
        self.max_positions = context_tokens(model.config)
        self._cache_kw = cache_kwarg(self.layers[0])

    def blocks_in(self, start: int, stop: int) -> range:
        """Block indices of units [start, stop) (unit i + 1 is block i)."""
        return range(max(start, 1) - 1, min(stop, self.n_units - 1) - 1)

    def new_cache(self, start: int, stop: int, grown_in_blocks: bool = False,
                  ) -> SegmentCache | None:
        """A fresh KV cache for the blocks of units [start, stop), or None if there are none."""
        blocks = self.blocks_in(start, stop)
        if not len(blocks):
            return None
        return SegmentCache(blocks.start, self.config, len(blocks), grown_in_blocks=grown_in_blocks)

    # -- the units ---------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> hidden states [B, T, D]."""
        hidden = self.embed_tokens(ids)  # [B, T, D] (Gemma's module scales by sqrt(D) itself)
        if self.embed_multiplier is not None:  # Granite
            hidden = hidden * self.embed_multiplier
        if self.position_table is not None:  # GPT-2: learned absolute positions
            hidden = hidden + self.position_table(positions)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, D] -> next-token logits of the last position [B, V]."""
        return self.logits_of(hidden[:, -1:, :])[:, -1, :]

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., D] -> next-token logits of every position [..., V]."""
        logits = self.lm_head(self.final_norm(hidden))
        if self.logit_multiplier is not None:  # Cohere
            logits = logits * self.logit_multiplier
        if self.logit_divisor is not None:  # Granite
            logits = logits / self.logit_divisor
        if self.logit_softcap is not None:  # Gemma 2/3, in the order their forward does it
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def _block_kwargs(
        self, hidden: torch.Tensor, positions: torch.Tensor, cache: SegmentCache | None,
        layer_type: str | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments of the blocks of one attention type (default: the model's only one).

        Built per segment call, exactly as the model's own forward does it: the mask is sized
        against this segment's cache, rotary tables come from the absolute positions.
        """
        if layer_type is None:
            if len(set(self.layer_types)) != 1:
                raise ValueError(f"{self.family} mixes attention types: pass layer_type")
            layer_type = self.layer_types[0]
        mask = MASKS[layer_type](
            config=self.config, inputs_embeds=hidden, attention_mask=None, cache=cache,
            position_ids=positions,
        )
        kwargs: dict[str, Any] = {
            "attention_mask": mask, "position_ids": positions, "use_cache": cache is not None,
            self._cache_kw: cache,
        }
        if self.rotary_emb is not None:
            extra = (layer_type,) if self.rotary_per_layer_type else ()
            kwargs["position_embeddings"] = self.rotary_emb(hidden, positions, *extra)
        return kwargs

    @torch.inference_mode()
    def run(
        self,
        start: int,
        stop: int,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: SegmentCache | None,
        unit_seconds: list[float] | None = None,
        all_logits: bool = False,
        unit_cpu_seconds: list[float] | None = None,
    ) -> torch.Tensor:
        """Run units [start, stop) on token ids [B, T] (if start == 0) or hidden [B, T, D].

        Returns hidden states [B, T, D], or the last position's logits [B, V] if the head ran
        (every position's [B, T, V] with all_logits: speculative verification).
        positions: absolute positions [B, T]. unit_seconds, if given, receives one wall time
        per unit run (the mask and rotary set-up counts toward the first block);
        unit_cpu_seconds, if given, this thread's CPU seconds per unit likewise.
        """
        if not 0 <= start < stop <= self.n_units:
            raise ValueError(f"unit range [{start}, {stop}) outside 0..{self.n_units}")
        clock, cpu_clock = time.perf_counter(), time.thread_time()

        def lap() -> None:
            nonlocal clock, cpu_clock
            if unit_seconds is not None:
                now = time.perf_counter()
                unit_seconds.append(now - clock)
                clock = now
            if unit_cpu_seconds is not None:
                cpu_now = time.thread_time()
                unit_cpu_seconds.append(cpu_now - cpu_clock)
                cpu_clock = cpu_now

        hidden = x
        if start == 0:
            hidden = self.embed(x, positions)  # [B, T, D]
            lap()
        blocks = self.blocks_in(start, stop)
        # One mask and rotary table per attention type present (local/global layers differ).
        kwargs_of = {kind: self._block_kwargs(hidden, positions, cache, kind)
                     for kind in dict.fromkeys(self.layer_types[i] for i in blocks)}
        for index in blocks:
            hidden = self.layers[index](hidden, **kwargs_of[self.layer_types[index]])  # [B, T, D]
            if isinstance(hidden, tuple):  # some releases still return (hidden, ...)
                hidden = hidden[0]
            lap()
        if stop == self.n_units:
            hidden = self.logits_of(hidden) if all_logits else self.head(hidden)  # [B, (T,) V]
            lap()
        return hidden

    def kv_bytes_per_token(self, unit: int) -> int:
        """Bytes of KV cache a unit holds per token of context (0 for embed and head)."""
        if unit == 0 or unit == self.n_units - 1:
            return 0
        cfg = self.config
        heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        return 2 * heads * head_dim * self.dtype.itemsize

    def kv_bytes(self, unit: int, context_tokens: int) -> int:
        """Bytes of KV cache a unit holds at a context length (a sliding window: its window)."""
        window = self.layer_windows[unit - 1] if 0 < unit < self.n_units - 1 else None
        kept = context_tokens if window is None else min(context_tokens, window)
        return self.kv_bytes_per_token(unit) * kept

    def parameter_bytes(self, unit: int) -> int:
        """Bytes of the weights unit `unit` needs (tied embeddings count on both ends)."""
        if unit == 0:
            modules = [self.embed_tokens, *filter(None, [self.position_table])]
        elif unit == self.n_units - 1:
            modules = [self.final_norm, self.lm_head]
        else:
            modules = [self.layers[unit - 1]]
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
