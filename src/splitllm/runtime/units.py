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
from transformers.masking_utils import create_causal_mask

from splitllm.runtime.models import model_family


def unit_names(n_blocks: int) -> tuple[str, ...]:
    """Unit names in the planner's convention: embed, block0..block{n-1}, head."""
    return ("embed", *(f"block{i}" for i in range(n_blocks)), "head")


class SegmentCache(DynamicCache):
    """KV cache of one segment: blocks first_block.. are stored at cache indices 0.. .

    The attention layers call `update(..., self.layer_idx)` with their absolute index; shifting
    here (instead of re-numbering shared layers) keeps every session and side independent, and
    makes `get_seq_length()` (index 0) the length of this segment's own first block, which is
    what the causal mask of a chunked prefill must be sized against.
    """

    def __init__(self, first_block: int) -> None:
        super().__init__()
        self.first_block = first_block

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
        *args: Any, **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().update(key_states, value_states, layer_idx - self.first_block,
                              *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        total = 0
        for layer in self.layers:
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
        self.family = model_family(model.config)
        if self.family == "llama":
            body: Any = model.model
            self.layers: Sequence[nn.Module] = body.layers
            self.final_norm: nn.Module = body.norm
            self.rotary_emb: nn.Module | None = body.rotary_emb
        else:
            body = model.transformer
            self.layers = body.h
            self.final_norm = body.ln_f
            self.rotary_emb = None
        self.body = body
        self.lm_head: nn.Module = model.lm_head
        self.n_blocks = len(self.layers)
        self.names = unit_names(self.n_blocks)
        self.n_units = len(self.names)
        self.hidden_size = int(model.config.hidden_size)
        self.vocab_size = int(model.config.vocab_size)
        self.dtype = next(model.parameters()).dtype
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0)
                                 or getattr(model.config, "n_positions", 0) or 2**31 - 1)
        self._cache_kw = cache_kwarg(self.layers[0])

    def blocks_in(self, start: int, stop: int) -> range:
        """Block indices of units [start, stop) (unit i + 1 is block i)."""
        return range(max(start, 1) - 1, min(stop, self.n_units - 1) - 1)

    def new_cache(self, start: int, stop: int) -> SegmentCache | None:
        """A fresh KV cache for the blocks of units [start, stop), or None if there are none."""
        blocks = self.blocks_in(start, stop)
        return SegmentCache(blocks.start) if len(blocks) else None

    # -- the units ---------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> hidden states [B, T, D]."""
        if self.family == "llama":
            return self.body.embed_tokens(ids)
        # GPT-2 adds learned absolute position embeddings at the input (dropout: eval no-op).
        return self.body.wte(ids) + self.body.wpe(positions)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, D] -> next-token logits of the last position [B, V]."""
        return self.lm_head(self.final_norm(hidden[:, -1:, :]))[:, -1, :]

    def _block_kwargs(
        self, hidden: torch.Tensor, positions: torch.Tensor, cache: SegmentCache | None
    ) -> dict[str, Any]:
        # Built per segment call, exactly as the model's own forward does it: the mask is sized
        # against this segment's cache, rotary tables come from the absolute positions.
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=None, cache=cache,
            position_ids=positions,
        )
        kwargs: dict[str, Any] = {
            "attention_mask": mask, "position_ids": positions, "use_cache": cache is not None,
            self._cache_kw: cache,
        }
        if self.rotary_emb is not None:
            kwargs["position_embeddings"] = self.rotary_emb(hidden, position_ids=positions)
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
    ) -> torch.Tensor:
        """Run units [start, stop) on token ids [B, T] (if start == 0) or hidden [B, T, D].

        Returns hidden states [B, T, D], or the last position's logits [B, V] if the head ran.
        positions: absolute positions [B, T]. unit_seconds, if given, receives one wall time
        per unit run (the mask and rotary set-up counts toward the first block).
        """
        if not 0 <= start < stop <= self.n_units:
            raise ValueError(f"unit range [{start}, {stop}) outside 0..{self.n_units}")
        clock = time.perf_counter()

        def lap() -> None:
            nonlocal clock
            if unit_seconds is not None:
                now = time.perf_counter()
                unit_seconds.append(now - clock)
                clock = now

        hidden = x
        if start == 0:
            hidden = self.embed(x, positions)  # [B, T, D]
            lap()
        blocks = self.blocks_in(start, stop)
        if len(blocks):
            kwargs = self._block_kwargs(hidden, positions, cache)
            for index in blocks:
                hidden = self.layers[index](hidden, **kwargs)  # [B, T, D]
                if isinstance(hidden, tuple):  # some releases still return (hidden, ...)
                    hidden = hidden[0]
                lap()
        if stop == self.n_units:
            hidden = self.head(hidden)  # [B, V]
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

    def parameter_bytes(self, unit: int) -> int:
        """Bytes of the weights unit `unit` needs (tied embeddings count on both ends)."""
        if unit == 0:
            modules: list[nn.Module] = [self.body.embed_tokens if self.family == "llama"
                                        else self.body.wte]
            if self.family == "gpt2":
                modules.append(self.body.wpe)
        elif unit == self.n_units - 1:
            modules = [self.final_norm, self.lm_head]
        else:
            modules = [self.layers[unit - 1]]
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
