"""The server's block-grown KV cache holds what transformers' DynamicCache holds, rollbacks too."""

from __future__ import annotations

import gc
import weakref

import torch
from hypothesis import given
from hypothesis import strategies as st
from runtime_kit import family_config
from transformers import AutoModelForCausalLM

from splitllm.runtime.kvcache import KV_BLOCK_TOKENS, BlockLayer, KvArena, kv_capacity
from splitllm.runtime.units import UnitStack


def test_block_grown_cache_equals_dynamic_through_growth_and_rollbacks() -> None:
    torch.manual_seed(0)
    stack = UnitStack(AutoModelForCausalLM.from_config(family_config("llama")).eval())
    grown, plain = stack.new_cache(2, 5, grown_in_blocks=True), stack.new_cache(2, 5)
    assert grown is not None and plain is not None and grown.first_block == 1
    heads, dim = 2, stack.hidden_size // stack.config.num_attention_heads
    held = longest = 0
    for tokens, keep in [(5, None), (1, None), (13, 12), (1, None), (2 * KV_BLOCK_TOKENS, 3),
                         (1, None)]:
        for layer in range(1, 4):  # absolute layer indices: the cache shifts them to 0..2
            k, v = torch.randn(2, 1, heads, tokens, dim)
            got, want = grown.update(k, v, layer), plain.update(k, v, layer)
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w)
        held += tokens
        longest = max(longest, held)
        if keep is not None:  # a speculative rollback
            grown.roll_back(keep)
            plain.roll_back(keep)
            held = keep
        assert grown.get_seq_length() == plain.get_seq_length() == held
        for g_layer, p_layer in zip(grown.layers, plain.layers, strict=True):
            assert torch.equal(g_layer.keys, p_layer.keys)
            assert torch.equal(g_layer.values, p_layer.values)
    # What it reserves: whole blocks of the longest context it held, in every layer.
    assert grown.nbytes() == 3 * 2 * heads * kv_capacity(longest) * dim * 4 > plain.nbytes()
    assert grown.can_roll_back()


@given(st.integers(0, 50_000))
def test_capacity_is_whole_blocks_grown_by_half(tokens: int) -> None:
    """What a cache reserves holds the tokens in whole blocks, at most half again what they
    need past the first block, and the next capacity up is at least 1.5x this one."""
    capacity = kv_capacity(tokens)
    assert capacity >= tokens and capacity % KV_BLOCK_TOKENS == 0
    half_again = -(-(3 * tokens // 2) // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS  # in whole blocks
    assert capacity <= (max(KV_BLOCK_TOKENS, half_again) if tokens else 0)
    assert kv_capacity(capacity + 1) >= 1.5 * capacity


def test_a_segments_layers_grow_together_in_one_arena_a_few_times() -> None:
    """Decoding one position at a time to 300: every layer's K/V are views of one allocation,
    replaced only where the context reaches a capacity (8 times, not 19 as a block at a time),
    the layers' values as DynamicCache's, and the bytes reserved what the KV budget counts."""
    torch.manual_seed(1)
    stack = UnitStack(AutoModelForCausalLM.from_config(family_config("llama")).eval())
    grown, plain = stack.new_cache(2, 5, grown_in_blocks=True), stack.new_cache(2, 5)
    assert grown is not None and plain is not None and grown.arena is not None
    heads, dim = 2, stack.hidden_size // stack.config.num_attention_heads
    last, growths = None, 0
    for _ in range(300):
        for layer in range(1, 4):
            k, v = torch.randn(2, 1, heads, 1, dim)
            grown.update(k, v, layer)
            plain.update(k, v, layer)
        storage = grown.arena.storage
        assert storage is not None
        growths, last = growths + (storage is not last), storage
        assert {layer.key_buffer.untyped_storage().data_ptr() for layer in grown.layers} == \
            {layer.value_buffer.untyped_storage().data_ptr() for layer in grown.layers} == \
            {storage.untyped_storage().data_ptr()}
    assert growths == len({kv_capacity(t) for t in range(1, 301)}) == 8
    for g_layer, p_layer in zip(grown.layers, plain.layers, strict=True):
        assert torch.equal(g_layer.keys, p_layer.keys)
        assert torch.equal(g_layer.values, p_layer.values)
    budget = sum(stack.kv_bytes(unit, kv_capacity(300)) for unit in range(2, 5))
    assert grown.nbytes() == budget == 3 * 2 * heads * kv_capacity(300) * dim * 4


def test_a_layer_unlike_the_arenas_keeps_buffers_of_its_own() -> None:
    """K/V of another shape than the arena's first member's: that layer grows on its own,
    holds what it was given, and the arena's slot it left is still counted."""
    arena = KvArena(2)
    first, other = BlockLayer(arena), BlockLayer(arena)
    torch.manual_seed(2)
    a, b = torch.randn(1, 2, 20, 4), torch.randn(1, 3, 20, 4)
    first.update(a, a)
    other.update(b, b)
    assert first.arena is arena and other.arena is None
    assert [ref() for ref in arena.members] == [first]
    assert torch.equal(first.keys, a) and torch.equal(other.values, b)
    assert arena.nbytes() == 2 * 2 * 2 * kv_capacity(20) * 4 * 4
    assert other.nbytes() == 2 * 3 * kv_capacity(20) * 4 * 4


def test_a_segments_kv_goes_with_its_cache_without_a_collection() -> None:
    """The arena refers to its layers weakly: a closed session's K/V are freed the moment its
    cache goes, not at the garbage collector's next pass (a pass stalls every thread)."""
    stack = UnitStack(AutoModelForCausalLM.from_config(family_config("llama")).eval())
    cache = stack.new_cache(2, 5, grown_in_blocks=True)
    assert cache is not None and cache.arena is not None
    heads, dim = 2, stack.hidden_size // stack.config.num_attention_heads
    for layer in range(1, 4):
        k, v = torch.randn(2, 1, heads, 40, dim)
        cache.update(k, v, layer)
    storage = weakref.ref(cache.arena.storage)
    assert storage() is not None
    enabled = gc.isenabled()
    gc.disable()
    try:
        del cache
        assert storage() is None
    finally:
        if enabled:
            gc.enable()
