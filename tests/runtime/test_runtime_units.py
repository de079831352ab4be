"""Unit slicing without the network: any segmentation of the units equals the full model."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
from runtime_kit import llama_config, random_prompt, save_tiny_model

from splitllm.errors import UserError
from splitllm.runtime.models import LoadedModel, load_model, resolve_model_dir, weights_fingerprint
from splitllm.runtime.units import UnitStack, unit_names


def segmentations(n_units: int, rng: random.Random, count: int) -> list[list[tuple[int, int]]]:
    """Random ways to cut units 0..n-1 into consecutive segments, plus the two extremes."""
    out = [[(0, n_units)], [(i, i + 1) for i in range(n_units)]]
    for _ in range(count):
        cuts = sorted(rng.sample(range(1, n_units), rng.randint(1, n_units - 1)))
        bounds = [0, *cuts, n_units]
        out.append(list(itertools.pairwise(bounds)))
    return out


def run_segments(stack: UnitStack, segments: list[tuple[int, int]], ids: torch.Tensor,
                 chunks: list[int]) -> list[torch.Tensor]:
    """Logits [1, V] at the end of each prefill chunk, running segment by segment."""
    caches = [stack.new_cache(a, b) for a, b in segments]
    logits = []
    for begin, end in itertools.pairwise(chunks):
        x = ids[:, begin:end]
        positions = torch.arange(begin, end)[None]  # [1, T]
        for (a, b), cache in zip(segments, caches, strict=True):
            x = stack.run(a, b, x, positions, cache)
        logits.append(x)
    return logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_any_segmentation_with_chunked_prefill_matches_the_full_model(
        family: str, tiny_models: dict[str, LoadedModel]) -> None:
    model = tiny_models[family].model
    stack = UnitStack(model)
    ids = torch.tensor([random_prompt(random.Random(1), 23)])  # [1, 23]
    with torch.no_grad():
        full = model(ids).logits  # [1, 23, V]
    chunks = [0, 5, 6, 14, 23]  # uneven chunks, one of a single token
    for segments in segmentations(stack.n_units, random.Random(2), 12):
        got = run_segments(stack, segments, ids, chunks)
        for logits, end in zip(got, chunks[1:], strict=True):
            torch.testing.assert_close(logits, full[:, end - 1], atol=1e-4, rtol=0)


def test_shared_layers_keep_their_index_and_segment_caches_start_at_zero(
        tiny_llama: LoadedModel) -> None:
    stack = UnitStack(tiny_llama.model)
    before = [layer.self_attn.layer_idx for layer in stack.layers]
    cache = stack.new_cache(3, 5)  # blocks 2 and 3
    assert cache is not None and cache.first_block == 2
    stack.run(0, 3, torch.tensor([[5, 6, 7]]), torch.arange(3)[None],
              stack.new_cache(0, 3))
    hidden = torch.randn(1, 3, stack.hidden_size)
    stack.run(3, 5, hidden, torch.arange(3)[None], cache)
    assert len(cache.layers) == 2 and cache.get_seq_length() == 3
    assert [layer.self_attn.layer_idx for layer in stack.layers] == before
    assert cache.nbytes() > 0


def test_unit_names_follow_the_planner_convention(tiny_llama: LoadedModel) -> None:
    stack = UnitStack(tiny_llama.model)
    assert stack.names == unit_names(4) == ("embed", "block0", "block1", "block2", "block3", "head")
    assert stack.blocks_in(0, 6) == range(0, 4)
    assert stack.blocks_in(5, 6) == range(3, 3)
    assert stack.new_cache(0, 1) is None and stack.new_cache(5, 6) is None
    with pytest.raises(ValueError):
        stack.run(2, 2, torch.zeros(1, 1, 64), torch.zeros(1, 1, dtype=torch.long), None)
    assert sum(stack.parameter_bytes(u) for u in range(stack.n_units)) >= sum(
        p.numel() * 4 for p in tiny_llama.model.parameters())


def test_loading_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a local Hugging Face directory"):
        resolve_model_dir(tmp_path / "missing")
    bad = save_tiny_model(tmp_path / "sliding", llama_config(layers=2))
    config = (bad / "config.json").read_text().replace('"model_type": "llama"',
                                                          '"model_type": "bert"')
    (bad / "config.json").write_text(config)
    with pytest.raises(UserError, match="not supported"):
        load_model(bad)


def test_fingerprint_tells_models_apart(tiny_llama: LoadedModel, tiny_llama_dir: Path,
                                        tmp_path: Path) -> None:
    again = load_model(tiny_llama_dir, dtype="bf16")
    assert weights_fingerprint(again.model) == weights_fingerprint(tiny_llama.model)
    other = load_model(save_tiny_model(tmp_path, llama_config(), seed=1))
    assert weights_fingerprint(other.model) != weights_fingerprint(tiny_llama.model)
