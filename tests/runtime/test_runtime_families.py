"""Every model family splits like Llama: any placement reproduces the unsplit model.

Tiny random models of each family are built offline, with their per-family features on
(sliding windows shorter than the prompts, local/global layers, logit soft-capping).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from runtime_kit import (
    FAMILIES,
    TIMEOUT_S,
    WINDOW,
    family_config,
    llama_config,
    random_prompt,
    save_tiny_model,
)
from transformers import AutoModelForCausalLM, PreTrainedModel

from splitllm.errors import UserError
from splitllm.placement import SERVER, Placement
from splitllm.runtime.client import connect
from splitllm.runtime.decoding import LocalPipe, RemoteResult, SplitPipe, timed_generation
from splitllm.runtime.models import load_model, model_family
from splitllm.runtime.units import UnitStack

PROMPT_TOKENS = 23  # more than three sliding windows
NEW_TOKENS = 6


class InProcessServer:
    """The server's segments of one placement, run here on their own caches (fp32 wire)."""

    def __init__(self, stack: UnitStack, placement: Placement) -> None:
        self.stack = stack
        self.caches = {seg.start: stack.new_cache(seg.start, seg.stop)
                       for seg in placement.segments() if seg.side == SERVER}

    def forward(self, units: tuple[int, int], x: torch.Tensor, positions: tuple[int, int],
                return_logits: bool, return_hidden: bool = True) -> RemoteResult:
        start, stop = units
        out = self.stack.run(start, stop, x, torch.arange(*positions)[None], self.caches[start])
        if stop == self.stack.n_units:
            return RemoteResult(token=int(out.argmax(-1)), logits=out.float())
        return RemoteResult(hidden=out.float())


def placements(n_units: int, rng: random.Random, random_count: int) -> list[str]:
    """All-C, all-S, every single cut in both directions, and random multi-switch placements."""
    out = ["C" * n_units, "S" * n_units]
    for cut in range(1, n_units):
        out += ["C" * cut + "S" * (n_units - cut), "S" * cut + "C" * (n_units - cut)]
    while len(out) < 2 * n_units + random_count:
        sides = "".join(rng.choice("CS") for _ in range(n_units))
        if Placement(sides).switches >= 2 and sides not in out:
            out.append(sides)
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest) -> PreTrainedModel:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(family_config(request.param)).eval()


def greedy(pipe: LocalPipe | SplitPipe, prompt: list[int], chunk_tokens: int = 512
           ) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and per-step logits [1, V] of a pipe."""
    logits: list[torch.Tensor] = []
    timed = timed_generation(pipe, prompt, NEW_TOKENS, chunk_tokens=chunk_tokens,
                             on_token=lambda _: logits.append(pipe.last_logits))
    return list(timed.tokens), logits


def reference(model: PreTrainedModel, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and per-step logits [1, V] of the unsplit model."""
    return greedy(LocalPipe(model), prompt)


def test_the_reference_is_the_models_own_forward_and_generate(family_model: Any) -> None:
    prompt = random_prompt(random.Random(20), PROMPT_TOKENS)
    tokens, logits = reference(family_model, prompt)
    with torch.no_grad():
        full = family_model(torch.tensor([prompt])).logits  # [1, P, V], no cache at all
        out = family_model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.testing.assert_close(logits[0], full[:, -1], atol=1e-4, rtol=0)
    assert out[0, len(prompt):].tolist() == tokens


def test_every_single_cut_and_random_switches_match_the_unsplit_model(
        family_model: Any) -> None:
    stack = UnitStack(family_model)
    prompt = random_prompt(random.Random(21), PROMPT_TOKENS)
    tokens, logits = reference(family_model, prompt)
    chunks = [5, 1, 7, WINDOW, 64]  # chunked prefill, chunks shorter and longer than the window
    for i, sides in enumerate(placements(stack.n_units, random.Random(22), 8)):
        placement = Placement(sides)
        pipe = SplitPipe(stack, placement, InProcessServer(stack, placement), return_logits=True)
        got_tokens, got = greedy(pipe, prompt, chunks[i % len(chunks)])
        assert got_tokens == tokens, sides
        for split, whole in zip(got, logits, strict=True):
            torch.testing.assert_close(split, whole, atol=1e-4, rtol=0, msg=sides)


def test_sliding_window_layers_keep_only_their_window(family_model: Any) -> None:
    stack = UnitStack(family_model)
    cache = stack.new_cache(1, stack.n_units - 1)
    ids = torch.tensor([random_prompt(random.Random(23), PROMPT_TOKENS)])
    positions = torch.arange(PROMPT_TOKENS)[None]
    stack.run(1, stack.n_units - 1, stack.embed(ids, positions), positions, cache)
    assert cache is not None
    for block, (layer, window) in enumerate(zip(cache.layers, stack.layer_windows, strict=True)):
        held = layer.keys.shape[-2]
        assert held == (PROMPT_TOKENS if window is None else window - 1), block
        assert stack.kv_bytes(block + 1, PROMPT_TOKENS) == stack.kv_bytes_per_token(
            block + 1) * min(PROMPT_TOKENS, window or PROMPT_TOKENS)


@pytest.mark.parametrize("family", ["gemma3_text", "qwen2"])
def test_split_over_a_real_server_matches_for_local_and_global_layers(
        family: str, tmp_path: Path, make_server: Any) -> None:
    loaded = load_model(save_tiny_model(tmp_path, family_config(family)))
    prompt = random_prompt(random.Random(24), PROMPT_TOKENS)
    tokens, logits = reference(loaded.model, prompt)
    server = make_server(loaded)
    with connect(server.ws_url, loaded, timeout_s=TIMEOUT_S) as session:
        for placement in ("CSCSCS", "SCSSCC", "CCCSSS"):
            result = session.generate(prompt, NEW_TOKENS, placement=placement, prefill_chunk=5,
                                      stop_at_eos=False, return_logits=True)
            assert list(result.tokens) == tokens, placement
            for split, whole in zip(result.logits, logits, strict=True):
                torch.testing.assert_close(split, whole, atol=1e-4, rtol=0)


def test_what_cannot_be_split_is_refused_by_name() -> None:
    bert = llama_config(layers=2)
    bert.model_type = "bert"
    with pytest.raises(UserError, match="'bert' is not supported: splitllm knows the forward"):
        model_family(bert)
    bidirectional = family_config("gemma3_text")
    bidirectional.use_bidirectional_attention = True
    with pytest.raises(UserError, match="bidirectional attention"):
        model_family(bidirectional)
    chunked = llama_config(layers=2)
    chunked.layer_types = ["chunked_attention", "full_attention"]
    chunked.attention_chunk_size = 8
    with pytest.raises(UserError, match="layer type 'chunked_attention'"):
        model_family(chunked)
    assert [model_family(family_config(f)) for f in FAMILIES] == list(FAMILIES)
