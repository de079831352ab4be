"""Split generation over real sockets reproduces the unsplit model, for every placement."""

from __future__ import annotations

import gc
import itertools
import random

import pytest
import torch
from runtime_kit import TIMEOUT_S, random_prompt, stream_pieces, whole_decode_pieces

from splitllm.runtime.client import Generation, Session, connect
from splitllm.runtime.decoding import LocalPipe, generate_tokens, timed_generation
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.protocol import Sampling


def reference(loaded: LoadedModel, prompt: list[int], new_tokens: int,
              sampling: Sampling = Sampling()) -> tuple[list[int], list[torch.Tensor]]:
    """Tokens and per-step logits [1, V] of the unsplit model."""
    pipe = LocalPipe(loaded.model, sampling)
    logits: list[torch.Tensor] = []
    timed = timed_generation(pipe, prompt, new_tokens,
                             on_token=lambda _: logits.append(pipe.last_logits))
    return list(timed.tokens), logits


def split(session: Session, placement: str, prompt: list[int], new_tokens: int,
          chunk: int = 5, sampling: Sampling | None = None) -> Generation:
    return session.generate(prompt, new_tokens, placement=placement, prefill_chunk=chunk,
                            stop_at_eos=False, return_logits=True, sampling=sampling)


def assert_same(result: Generation, tokens: list[int], logits: list[torch.Tensor]) -> None:
    assert list(result.tokens) == tokens, result.placement
    assert len(result.logits) == len(logits)
    for got, want in zip(result.logits, logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.fixture
def servers(llama_server: BackgroundServer, gpt2_server: BackgroundServer
            ) -> dict[str, BackgroundServer]:
    return {"llama": llama_server, "gpt2": gpt2_server}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_placement_matches_the_unsplit_model(
        family: str, tiny_models: dict[str, LoadedModel],
        servers: dict[str, BackgroundServer]) -> None:
    loaded = tiny_models[family]
    prompt = random_prompt(random.Random(10), 13)
    tokens, logits = reference(loaded, prompt, 6)
    n_units = 6
    placements = ["".join(p) for p in itertools.product("CS", repeat=n_units)]
    assert len(placements) == 64  # all-C, all-S, every cut in both directions, 1-5 switches
    with connect(servers[family].ws_url, loaded, timeout_s=TIMEOUT_S) as session:
        for placement in placements:
            assert_same(split(session, placement, prompt, 6), tokens, logits)


def test_the_reference_is_the_models_own_greedy_generate(tiny_llama: LoadedModel) -> None:
    prompt = random_prompt(random.Random(11), 9)
    tokens, _ = reference(tiny_llama, prompt, 8)
    with torch.no_grad():
        out = tiny_llama.model.generate(torch.tensor([prompt]), max_new_tokens=8,
                                        do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[0, len(prompt):].tolist() == tokens


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_chunked_prefill_agrees(chunk: int, tiny_llama: LoadedModel,
                                llama_server: BackgroundServer) -> None:
    prompt = random_prompt(random.Random(12), 17)
    tokens, logits = reference(tiny_llama, prompt, 4)
    with connect(llama_server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as session:
        for placement in ("CSCSCS", "SCCSSC", "CCCSSS"):
            assert_same(split(session, placement, prompt, 4, chunk=chunk), tokens, logits)


def test_prompt_chunks_do_not_bring_back_unneeded_hidden_states(
        tiny_llama: LoadedModel, llama_server: BackgroundServer) -> None:
    prompt = random_prompt(random.Random(15), 20)
    with connect(llama_server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as session:
        chunked = session.generate(prompt, 1, placement="CCCSSS", prefill_chunk=5)
        whole = session.generate(prompt, 1, placement="CCCSSS", prefill_chunk=20)
    assert chunked.tokens == whole.tokens
    # Three chunks end on the server without sampling: each is answered by a small `done`.
    assert chunked.bytes_received - whole.bytes_received < 3 * 200
    assert chunked.bytes_sent > 20 * 64 * 4


@pytest.mark.parametrize("wire_dtype", ["bf16", "fp16"])
def test_half_precision_wire_halves_the_bytes(wire_dtype: str, tiny_llama: LoadedModel,
                                              llama_server: BackgroundServer) -> None:
    prompt = random_prompt(random.Random(13), 20)
    tokens, logits = reference(tiny_llama, prompt, 5)
    url = llama_server.ws_url
    with connect(url, tiny_llama, timeout_s=TIMEOUT_S) as full, \
            connect(url, tiny_llama, wire_dtype=wire_dtype, timeout_s=TIMEOUT_S) as half:
        exact = split(full, "CCCSSS", prompt, 5, chunk=64)
        rounded = split(half, "CCCSSS", prompt, 5, chunk=64)
    assert_same(exact, tokens, logits)
    hidden_bytes = 20 * 64 * 4 + 4 * 64 * 4  # prompt once, then one token per decode step
    saved = exact.bytes_sent - rounded.bytes_sent
    assert saved == pytest.approx(hidden_bytes / 2, rel=0.05)
    for got, want in zip(rounded.logits, logits, strict=True):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=0)  # rounding, not a bug


def test_seeded_sampling_is_the_same_wherever_the_head_runs(
        tiny_gpt2: LoadedModel, gpt2_server: BackgroundServer) -> None:
    prompt = random_prompt(random.Random(14), 8)
    sampling = Sampling(temperature=1.5, top_p=0.95, seed=1234)
    tokens, _ = reference(tiny_gpt2, prompt, 12, sampling)
    with connect(gpt2_server.ws_url, tiny_gpt2, timeout_s=TIMEOUT_S) as session:
        on_server = split(session, "CCSSSS", prompt, 12, sampling=sampling)
        on_client = split(session, "SSSCCC", prompt, 12, sampling=sampling)
        reseeded = split(session, "CCSSSS", prompt, 12,
                         sampling=Sampling(temperature=1.5, top_p=0.95, seed=99))
    assert list(on_server.tokens) == list(on_client.tokens) == tokens
    assert list(reseeded.tokens) != tokens
    greedy, _ = reference(tiny_gpt2, prompt, 12)
    assert tokens != greedy


def test_python_api_streams_text_and_stops_at_eos(tiny_llama: LoadedModel,
                                                  llama_server: BackgroundServer) -> None:
    pieces: list[str] = []
    with connect(llama_server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as session:
        result = session.generate("the quick fox", 12, placement="CSSSSC", on_text=pieces.append)
    assert result.placement == "CSSSSC"
    assert "".join(pieces) == result.text
    assert result.text == tiny_llama.tokenizer.decode(list(result.tokens),
                                                      skip_special_tokens=True)
    prompt_ids = result.prompt_tokens
    assert prompt_ids > 3 and 1 <= len(result.tokens) <= 12
    eos = set(tiny_llama.eos_token_ids)
    assert not eos & set(result.tokens[:-1])  # generation ends at the first end-of-sequence
    expected = list(generate_tokens(LocalPipe(tiny_llama.model), _prompt_ids(tiny_llama), 12,
                                    eos_token_ids=tiny_llama.eos_token_ids))
    assert list(result.tokens) == expected
    assert result.ttft_s > 0 and result.tpot_s >= 0 and result.server_busy_s > 0
    assert 0 < result.server_cpu_s <= result.server_busy_s * 1.5


MULTIBYTE = "héllo wörld, naïve café — 日本語 🙂 the quick brown fox jumps. "


def test_streamed_text_is_the_whole_decode_with_a_bounded_window(tiny_llama: LoadedModel) -> None:
    tokenizer = tiny_llama.tokenizer
    text_ids = tokenizer.encode(MULTIBYTE * 12, add_special_tokens=False)
    assert len(text_ids) > 400  # byte-level: every multi-byte character spans several tokens
    rng = random.Random(26)
    cases = [text_ids, text_ids[:-1],  # ends inside the emoji's bytes
             [rng.randrange(len(tokenizer)) for _ in range(300)]]  # stray bytes, special tokens
    for ids in cases:
        pieces, text, longest = stream_pieces(tiny_llama, ids)
        assert pieces == whole_decode_pieces(tokenizer, ids)
        assert "".join(pieces) == text == tokenizer.decode(ids, skip_special_tokens=True)
    pieces, _, longest = stream_pieces(tiny_llama, text_ids)
    assert "".join(pieces) == MULTIBYTE * 12
    assert longest <= 8  # each token decodes a few recent tokens, not the whole output


def _prompt_ids(loaded: LoadedModel) -> list[int]:
    from splitllm.runtime.models import encode_prompt

    return encode_prompt(loaded, "the quick fox")


def test_a_finished_generation_leaves_no_reference_cycle(tiny_llama: LoadedModel,
                                                         llama_server: BackgroundServer) -> None:
    """Its pipes and client caches go when `generate` returns: held in a cycle, every request's
    caches stayed until a collection, and a collection stalls every thread of the process."""
    prompt = random_prompt(random.Random(12), 9)
    with connect(llama_server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as session:
        session.generate(prompt, 4, placement="CSSCSC", stop_at_eos=False)  # warm
        gc.collect()
        flags = gc.get_debug()
        gc.set_debug(gc.DEBUG_SAVEALL)  # the collected cycles kept in gc.garbage
        try:
            for speculate in (0, 2):
                session.generate(prompt, 4, placement="CSSCSC", stop_at_eos=False,
                                 speculate=speculate)
            gc.collect()
            # Only what a generation makes: the server's thread may meanwhile release a closed
            # connection of an earlier test (its protocol object and asyncio's are in a cycle).
            cyclic = sorted({f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
                             if type(o).__module__.startswith(("splitllm", "torch"))
                             and type(o).__qualname__ != "GuardedWebSocket"})
        finally:
            gc.set_debug(flags)
            gc.garbage.clear()
    assert cyclic == []
