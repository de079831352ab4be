"""The server's block-grown KV cache holds what transformers' DynamicCache holds, rollbacks too."""

from __future__ import annotations

import torch
from runtime_kit import family_config
from transformers import AutoModelForCausalLM

from splitllm.runtime.kvcache import KV_BLOCK_TOKENS, kv_capacity
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
