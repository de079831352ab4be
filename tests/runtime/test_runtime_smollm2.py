"""The real SmolLM2-135M-Instruct: split generation equals the unsplit model (slow: ~20 s)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from runtime_kit import TIMEOUT_S, stream_pieces, whole_decode_pieces

from splitllm.runtime import models
from splitllm.runtime.client import connect
from splitllm.runtime.decoding import LocalPipe, generate_tokens, timed_generation
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel, encode_prompt
from splitllm.runtime.protocol import Sampling

pytestmark = pytest.mark.slow

N_UNITS = 32  # embed, 30 blocks, head
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def prompt_ids(smollm2: LoadedModel) -> list[int]:
    return encode_prompt(smollm2, "What is the capital of France?")


@pytest.fixture(scope="module")
def reference(smollm2: LoadedModel, prompt_ids: list[int]
              ) -> tuple[list[int], list[torch.Tensor]]:
    pipe = LocalPipe(smollm2.model)
    logits: list[torch.Tensor] = []
    timed = timed_generation(pipe, prompt_ids, NEW_TOKENS,
                             on_token=lambda _: logits.append(pipe.last_logits))
    return list(timed.tokens), logits


def placements() -> list[str]:
    rng = random.Random(30)
    chosen = ["C" * N_UNITS, "S" * N_UNITS, "C" * 16 + "S" * 16, "C" + "S" * 31, "S" * 31 + "C",
              "S" * 10 + "C" * 22]
    for _ in range(3):  # several switches each
        sides = [rng.choice("CS") for _ in range(N_UNITS)]
        chosen.append("".join(sides))
    return chosen


def test_the_model_comes_with_its_tokenizer_and_chat_template(
        smollm2: LoadedModel, prompt_ids: list[int],
        reference: tuple[list[int], list[torch.Tensor]]) -> None:
    assert smollm2.family == "llama" and len(smollm2.model.model.layers) == 30
    assert smollm2.tokenizer is not None
    text = smollm2.tokenizer.decode(prompt_ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = smollm2.model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS,
                                     do_sample=False)
    tokens, _ = reference  # generated past the end-of-sequence token, which generate() stops at
    hf_tokens = out[0, len(prompt_ids):].tolist()
    assert hf_tokens == tokens[:len(hf_tokens)] and hf_tokens[-1] in smollm2.eos_token_ids
    assert "Paris" in smollm2.tokenizer.decode(tokens)


def test_later_loads_use_the_converted_cache(smollm2: LoadedModel,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(gguf: Path, target: Path) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", refuse)
    path = models.smollm2_dir()
    assert path == smollm2.path and (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file() and (path / "chat_template.jinja").is_file()


@pytest.mark.parametrize("placement", placements())
def test_split_smollm2_matches_the_unsplit_model(
        placement: str, smollm2: LoadedModel, smollm2_server: BackgroundServer,
        prompt_ids: list[int], reference: tuple[list[int], list[torch.Tensor]]) -> None:
    tokens, logits = reference
    with connect(smollm2_server.ws_url, smollm2, timeout_s=TIMEOUT_S * 3) as session:
        result = session.generate(prompt_ids, NEW_TOKENS, placement=placement, prefill_chunk=16,
                                  return_logits=True, stop_at_eos=False)
    assert list(result.tokens) == tokens
    for got, want in zip(result.logits, logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_every_single_cut_of_smollm2_matches(
        smollm2: LoadedModel, smollm2_server: BackgroundServer, prompt_ids: list[int],
        reference: tuple[list[int], list[torch.Tensor]]) -> None:
    tokens, logits = reference
    steps = 2  # the prefill and a decode step, for all 62 single cuts
    cuts = [side * k + other * (N_UNITS - k) for k in range(1, N_UNITS)
            for side, other in (("C", "S"), ("S", "C"))]
    with connect(smollm2_server.ws_url, smollm2, timeout_s=TIMEOUT_S * 3) as session:
        for placement in cuts:
            result = session.generate(prompt_ids, steps, placement=placement, prefill_chunk=24,
                                      return_logits=True, stop_at_eos=False)
            assert list(result.tokens) == tokens[:steps], placement
            for got, want in zip(result.logits, logits[:steps], strict=True):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_smollm2_text_streams_as_its_whole_decode(smollm2: LoadedModel) -> None:
    tokenizer = smollm2.tokenizer
    ids = tokenizer.encode("héllo wörld — 日本語 🙂 Ça va? " * 8, add_special_tokens=False)
    for case in (ids, ids[:-1], [*ids[:5], *smollm2.eos_token_ids, *ids[5:]]):
        pieces, text, longest = stream_pieces(smollm2, case)
        assert pieces == whole_decode_pieces(tokenizer, case)
        assert "".join(pieces) == text == tokenizer.decode(case, skip_special_tokens=True)
        assert longest <= 8


def test_speculative_decoding_gives_the_unsplit_greedy_tokens(
        smollm2: LoadedModel, smollm2_server: BackgroundServer) -> None:
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    ids = encode_prompt(smollm2, f"Repeat this sentence exactly: {text}")
    want = list(timed_generation(LocalPipe(smollm2.model), ids, 16).tokens)
    with connect(smollm2_server.ws_url, smollm2, timeout_s=TIMEOUT_S) as session:
        for placement, k in (("S" * N_UNITS, 4), ("C" + "S" * 30 + "C", "auto"),
                             ("C" * 8 + "S" * 16 + "C" * 8, 8)):
            result = session.generate(ids, 16, placement=placement, stop_at_eos=False,
                                      speculate=k)
            assert list(result.tokens) == want, (placement, k)
            assert result.accepted > 0, (placement, k)  # the copy task: drafts do hit


def test_sampled_speculative_decoding_gives_the_unsplit_seeded_tokens(
        smollm2: LoadedModel, smollm2_server: BackgroundServer) -> None:
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    ids = encode_prompt(smollm2, f"Repeat this sentence exactly: {text}")
    with connect(smollm2_server.ws_url, smollm2, timeout_s=TIMEOUT_S) as session:
        for placement, k, seed in (("S" * N_UNITS, 4, 1), ("C" + "S" * 30 + "C", "auto", 2),
                                   ("C" * 8 + "S" * 16 + "C" * 8, 8, 3)):
            sampling = Sampling(temperature=0.8, top_p=0.95, seed=seed)
            pipe = LocalPipe(smollm2.model, sampling)
            want = list(generate_tokens(pipe, ids, 16, speculate=k))
            result = session.generate(ids, 16, placement=placement, stop_at_eos=False,
                                      speculate=k, sampling=sampling)
            assert list(result.tokens) == want, (placement, k)
            assert result.accepted > 0, (placement, k)
