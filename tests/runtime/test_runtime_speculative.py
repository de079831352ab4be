"""Speculative decoding across the split: the unsplit model's greedy tokens, in fewer passes."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from runtime_kit import (
    TIMEOUT_S,
    RawClient,
    family_config,
    metrics,
    random_prompt,
    save_tiny_model,
)

from splitllm.errors import UserError
from splitllm.runtime import speculative
from splitllm.runtime.client import Generation, Session, connect
from splitllm.runtime.decoding import LocalPipe, timed_generation
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel, load_model
from splitllm.runtime.protocol import Sampling, encode_tensor
from splitllm.runtime.speculative import MAX_AUTO_K, Drafter, prompt_lookup
from splitllm.runtime.transport import ServerError

NEW_TOKENS = 24
# All-server, all-client, every single cut in both directions, multi-switch placements.
PLACEMENTS = ("SSSSSS", "CCCCCC", "CSSSSS", "CCSSSS", "CCCSSS", "CCCCSS", "CCCCCS",
              "SCCCCC", "SSCCCC", "SSSCCC", "SSSSCC", "SSSSSC", "CSCSCS", "SCSCSC", "CSSCCS")


def looping_prompt(seed: int) -> list[int]:
    """A random prompt that repeats itself: prompt lookup finds drafts, some right, some not."""
    rng = random.Random(seed)
    part = random_prompt(rng, 7)
    return [*part, *random_prompt(rng, 3), *part, *random_prompt(rng, 2), *part[:4]]


def reference(loaded: LoadedModel, prompt: list[int]) -> list[int]:
    """The unsplit model's greedy tokens, one pass per token."""
    return list(timed_generation(LocalPipe(loaded.model), prompt, NEW_TOKENS).tokens)


def ask(raw: RawClient, session: str, ids: list[int], positions: tuple[int, int],
        **flags: bool) -> dict[str, Any]:
    """Send one all-server forward of token ids; the reply's header (token or error)."""
    raw.send(encode_tensor({"type": "forward", "session": session, "seq": 1, "units": [0, 6],
                            "positions": list(positions), **flags}, torch.tensor([ids])))
    reply, _ = raw.recv()
    return reply


def speculate(session: Session, placement: str, prompt: list[int], k: int | str,
              chunk: int = 512) -> Generation:
    return session.generate(prompt, NEW_TOKENS, placement=placement, prefill_chunk=chunk,
                            stop_at_eos=False, speculate=k)


def test_prompt_lookup_continues_the_latest_match_of_the_longest_suffix() -> None:
    assert prompt_lookup([5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7], 3) == [9, 2, 6]  # latest "6 7"
    assert prompt_lookup([1, 2, 3, 9, 2, 3, 4, 2, 3], 2) == [4, 2]  # "2 3" latest over oldest
    assert prompt_lookup([4, 1, 2, 3, 8, 2, 3], 5) == [8, 2, 3]  # ... cut at the history's end
    assert prompt_lookup([1, 2, 3, 4], 4) == []  # the suffix never occurred before
    assert prompt_lookup([1, 2, 1], 0) == []
    assert prompt_lookup([7], 3) == []


def test_auto_drafts_follow_the_hit_rate_and_probe_while_sending_none() -> None:
    auto = Drafter("auto")
    history = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]
    assert auto.k() == 2  # the prior: half of the drafts hit
    for _ in range(30):  # every draft right: longer drafts pay
        drafts = auto.draft(history, 100)
        auto.observe(drafts, [*drafts, 1])
    assert auto.k() == MAX_AUTO_K
    for _ in range(30):  # every draft wrong: none are sent...
        drafts = auto.draft(history, 100)
        auto.observe(drafts, [d + 1 for d in drafts] + [1])
    assert auto.k() == 0 and auto.draft(history, 100) == []
    for _ in range(30):  # ... but the would-be draft is checked, and speculation resumes
        drafts = auto.draft(history, 100)
        assert drafts == [] or auto.k() > 0
        auto.observe(drafts, [*drafts, 8] if drafts else [8])
    assert auto.k() > 0
    assert Drafter(3).draft(history, 2) == [8, 9] and Drafter(0).draft(history, 9) == []
    with pytest.raises(ValueError, match="'auto'"):
        Drafter(-1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_placement_and_draft_length_gives_the_unsplit_greedy_tokens(
        family: str, tiny_models: dict[str, LoadedModel], llama_server: BackgroundServer,
        gpt2_server: BackgroundServer) -> None:
    loaded = tiny_models[family]
    server = {"llama": llama_server, "gpt2": gpt2_server}[family]
    drafted = accepted = 0
    with connect(server.ws_url, loaded, timeout_s=TIMEOUT_S) as session:
        for i, placement in enumerate(PLACEMENTS):
            prompt = looping_prompt(i)
            want = reference(loaded, prompt)
            k: int | str = 1 + i % 8 if i % 5 else "auto"
            plain = speculate(session, placement, prompt, 0)
            result = speculate(session, placement, prompt, k)
            assert list(plain.tokens) == want, placement
            assert list(result.tokens) == want, (placement, k)
            assert result.accepted <= result.drafted
            if result.accepted > 0 and "S" in placement:  # accepted drafts save round trips
                assert result.round_trips < plain.round_trips, placement
            drafted += result.drafted
            accepted += result.accepted
    assert 0 < accepted < drafted  # drafts were both accepted and rejected


def test_rejections_at_every_offset_roll_back_every_segment(
        tiny_llama: LoadedModel, llama_server: BackgroundServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An oracle drafter that is wrong at a moving offset: every pass rejects, every segment
    of every placement rolls back, and the tokens stay the unsplit model's."""
    prompt = looping_prompt(50)
    want = reference(tiny_llama, prompt)

    def wrong_at_moving_offset(history: list[int], k: int) -> list[int]:
        done = len(history) - len(prompt)
        drafts = want[done:done + k]
        if drafts:
            wrong = done % len(drafts)
            drafts[wrong] = (drafts[wrong] + 1) % tiny_llama.model.config.vocab_size
        return drafts

    monkeypatch.setattr(speculative, "prompt_lookup", wrong_at_moving_offset)
    with connect(llama_server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as session:
        for placement in PLACEMENTS:
            result = speculate(session, placement, prompt, 5, chunk=3)
            assert list(result.tokens) == want, placement
            assert 0 < result.accepted < result.drafted, placement


def test_metrics_count_verified_and_accepted_positions(
        tiny_llama: LoadedModel, make_server: Any) -> None:
    server = make_server(tiny_llama)
    prompt = looping_prompt(60)
    with connect(server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as session:
        result = speculate(session, "SSSSSS", prompt, 6)
    values = metrics(server.http_url)
    passes = result.round_trips - 1  # all-server: one prefill message, then one per pass
    verified = values["splitllm_speculative_verified_positions_total"]
    accepted = values["splitllm_speculative_accepted_positions_total"]
    assert verified == passes + result.drafted  # each pass: the last token and its drafts
    # Rejected drafts are rolled back by the next pass (the last pass's never are).
    assert passes + result.accepted <= accepted < verified


@pytest.mark.parametrize("chunk", [1, 4])
def test_every_draft_length_from_one_to_eight_with_chunked_prefill(
        chunk: int, tiny_llama: LoadedModel, llama_server: BackgroundServer) -> None:
    prompt = looping_prompt(40 + chunk)
    want = reference(tiny_llama, prompt)
    with connect(llama_server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as session:
        for k in range(1, 9):
            for placement in ("CSCSCS", "SCCSSC"):
                result = speculate(session, placement, prompt, k, chunk=chunk)
                assert list(result.tokens) == want, (placement, k)


def test_sampled_speculation_is_refused_in_one_line(tiny_llama: LoadedModel,
                                                     llama_server: BackgroundServer) -> None:
    with connect(llama_server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as session:
        with pytest.raises(UserError, match="needs greedy decoding"):
            session.generate(looping_prompt(1), 8, placement="CCCCCC", stop_at_eos=False,
                             speculate=4, sampling=Sampling(temperature=0.7, seed=1))
        raw = RawClient(llama_server.ws_url)
        sampled = raw.open("SSSSSS", sampling={"temperature": 0.7, "seed": 1})
        reply = ask(raw, sampled, [3, 4, 5], (0, 3), verify=True)
        raw.close()
        assert reply["type"] == "error" and reply["code"] == "bad_sampling"


def test_a_cache_that_cannot_roll_back_is_refused_by_both_sides(
        tmp_path: Path, make_server: Any) -> None:
    loaded = load_model(save_tiny_model(tmp_path, family_config("mistral")))  # sliding window
    server = make_server(loaded)
    prompt = looping_prompt(3)
    with connect(server.ws_url, loaded, timeout_s=TIMEOUT_S) as session:
        for placement, error in (("CCCCCC", UserError), ("SSSSSS", ServerError)):
            with pytest.raises(error, match="cannot roll back"):
                session.generate(prompt, NEW_TOKENS, placement=placement, stop_at_eos=False,
                                 speculate=4)
        # The server keeps serving: the same session kind without speculation works.
        assert len(session.generate(prompt, 4, placement="SSSSSS", stop_at_eos=False).tokens) == 4


def test_the_server_rolls_back_only_when_asked_and_only_backwards(
        llama_server: BackgroundServer) -> None:
    raw = RawClient(llama_server.ws_url)
    session = raw.open("SSSSSS")
    assert ask(raw, session, [3, 4, 5], (0, 3))["type"] == "token"
    again = ask(raw, session, [6, 7], (1, 3))
    assert again["type"] == "error" and again["code"] == "bad_positions"  # no silent rewrite
    ahead = ask(raw, session, [6, 7], (4, 6), rollback=True)
    assert ahead["type"] == "error" and ahead["code"] == "bad_positions"  # a gap stays a gap
    verified = ask(raw, session, [6, 7], (1, 3), rollback=True, verify=True)
    raw.close()
    assert verified["type"] == "token" and len(verified["tokens"]) == 2
    assert verified["token"] == verified["tokens"][-1]
