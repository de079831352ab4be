"""Packed steps: the rows of many sessions in one sequence, attention per session.

An engine step packs every row into ONE sequence (batch 1, T = all rows' tokens, per-row
absolute `position_ids`), so each linear layer, norm, rotary table and MLP runs once over all
rows. Only attention is per session: the layers hand their new keys/values to `cache.update`,
where a `StepCache` splits them by row group and appends each group to its session segment's own
cache; the attention function registered here then runs, per group, the model's own attention
(SDPA or the family's eager code) of the group's queries against that session's whole K/V with
the causal offset (and sliding window) of its positions. A call without a step (the client side
or a reference run on the same model object) goes straight to the model's own attention, with
the model's own masks: installing is invisible to everything but the engine.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from splitllm.runtime.units import SegmentCache

STEP_KWARG = "splitllm_step"  # how a step reaches the attention function through the layers
PACKED_PREFIX = "splitllm_packed_"


@dataclass
class RowGroup:
    """The rows [begin, end) of the packed sequence that belong to one session segment."""

    begin: int
    end: int
    cache: SegmentCache
    error: BaseException | None = None  # set when this group's attention failed


KeyValues = tuple[torch.Tensor, torch.Tensor]  # one session's whole K and V [1, Hkv, L, d]


class StepCache:
    """The layers' cache during a packed step: appends each group's K/V to its own cache."""

    def __init__(self, groups: list[RowGroup]) -> None:
        self.groups = groups
        self.kv: list[KeyValues | None] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each group's new K/V [1, H, t, d]; keep each session's whole K/V for attention."""
        self.kv = []
        for group in self.groups:
            if group.error is not None:
                self.kv.append(None)
                continue
            try:
                self.kv.append(group.cache.update(key_states[:, :, group.begin:group.end],
                                                  value_states[:, :, group.begin:group.end],
                                                  layer_idx))
            except Exception as exc:  # this session only: the other rows go on
                group.error = exc
                self.kv.append(None)
        return key_states, value_states


def group_mask(q_len: int, kv_len: int, window: int | None, device: torch.device,
               ) -> torch.Tensor | None:
    """Which keys each of a group's last q_len positions sees: [1, 1, q, kv] bool, or None = all."""
    if q_len == 1 and (window is None or kv_len <= window):
        return None
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # [q, 1]
    key_pos = torch.arange(kv_len, device=device)[None, :]  # [1, kv]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return allowed[None, None]


def _base_attention(base: str, module: nn.Module) -> Callable[..., Any]:
    if base == "eager":  # each family's eager code lives in its modeling module
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _packed_attention(base: str) -> Callable[..., tuple[torch.Tensor, None]]:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: torch.Tensor | None,
                  **kwargs: Any) -> tuple[torch.Tensor, Any]:
        step: StepCache | None = kwargs.pop(STEP_KWARG, None)
        inner = _base_attention(base, module)
        if step is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        alone: list[tuple[RowGroup, KeyValues]] = []
        # One position against a whole cache: one attention call for all of them.
        decoding: list[tuple[RowGroup, KeyValues]] = []
        for group, kv in zip(step.groups, step.kv, strict=True):
            if kv is not None:
                one = group.end - group.begin == 1 and (window is None or kv[0].shape[2] <= window)
                (decoding if one else alone).append((group, kv))
        batched = None
        if len(decoding) > 1:
            try:
                batched = _attend_decoding(inner, base, module, query, decoding, kwargs)
            except Exception:  # find whose: each on its own, as the others are
                alone.extend(decoding)
        else:
            alone.extend(decoding)
        if batched is not None and not alone and len(decoding) == query.shape[2]:
            return batched[1][None], None  # a step of decoding rows only: [1, T, H, d]
        if batched is None and len(alone) == 1 and alone[0][0].end - alone[0][0].begin == \
                query.shape[2]:  # one session holds every row: its attention is the output
            part = _attend_group(inner, base, module, query, *alone[0], window, kwargs)
            if part is not None:
                return part, None
        out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
        if batched is not None:
            out[0, batched[0]] = batched[1].to(out.dtype)
        for group, kv in alone:
            if group.error is None and (part := _attend_group(inner, base, module, query, group,
                                                              kv, window, kwargs)) is not None:
                out[:, group.begin:group.end] = part  # [1, t, H, d]
        return out, None

    return attention


def _attend_group(inner: Callable[..., Any], base: str, module: nn.Module, query: torch.Tensor,
                  group: RowGroup, kv: KeyValues, window: int | None, kwargs: dict[str, Any],
                  ) -> torch.Tensor | None:
    """One group's queries against its session's whole K/V: [1, t, H, d], or None with the
    group's error set (this session only: the other rows go on)."""
    keys, values = kv
    try:
        mask = _as_mask(base, group_mask(group.end - group.begin, keys.shape[2], window,
                                         query.device), query.dtype)
        part, _ = inner(module, query[:, :, group.begin:group.end], keys, values, mask, **kwargs)
    except Exception as exc:
        group.error = exc
        return None
    return part


def _attend_decoding(inner: Callable[..., Any], base: str, module: nn.Module,
                     query: torch.Tensor, decoding: list[tuple[RowGroup, KeyValues]],
                     kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Many sessions' single positions in one attention call: the sessions are the batch, each
    one's K/V padded to the longest (padding masked out). Their rows, and outputs [G, H, d]."""
    rows = torch.tensor([group.begin for group, _ in decoding], device=query.device)
    lengths = [keys.shape[2] for _, (keys, _) in decoding]
    keys, values = (pad_sequence([kv[i][0].transpose(0, 1) for _, kv in decoding],
                                 batch_first=True).transpose(1, 2)
                    for i in (0, 1))  # [G, Hkv, L, d]
    mask = None
    if min(lengths) < max(lengths):
        held = torch.tensor(lengths, device=query.device)[:, None]  # [G, 1]
        mask = (torch.arange(max(lengths), device=query.device)[None] < held)[:, None, None]
    queries = query[0, :, rows].transpose(0, 1)[:, :, None]  # [G, H, 1, d]
    part, _ = inner(module, queries, keys, values, _as_mask(base, mask, query.dtype), **kwargs)
    return rows, part[:, 0]  # [G, H, d]


def _as_mask(base: str, allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as the base attention takes it: eager adds its mask to the scores."""
    if allowed is None or base != "eager":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def install_packed_attention(model: nn.Module) -> None:
    """Route the model's attention through the packed dispatcher (a no-op step-less)."""
    config: Any = model.config
    base = str(config._attn_implementation)
    if base.startswith(PACKED_PREFIX):
        return
    name = PACKED_PREFIX + base
    AttentionInterface.register(name, _packed_attention(base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    for sub in [config, *(getattr(config, k) for k in ("text_config",) if hasattr(config, k))]:
        sub._attn_implementation = name
