"""Speculative decoding across the split: the unsplit model's tokens, in fewer passes."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any
from unittest import mock

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
from scipy import stats

from splitllm.errors import UserError
from splitllm.placement import Placement
from splitllm.planner.hardware import link_preset
from splitllm.planner.instance import Instance, Request, evaluate
from splitllm.planner.speculation import Speculation
from splitllm.runtime import fused_kernel, speculative
from splitllm.runtime.autoplace import (
    measured_instance,
    plan_placement,
    profile_server_times,
    with_sla,
)
from splitllm.runtime.client import Generation, Session, connect
from splitllm.runtime.decoding import LocalPipe, generate_tokens
from splitllm.runtime.gemv import FAST_ROWS
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel, load_model
from splitllm.runtime.profile import UnitProfile
from splitllm.runtime.protocol import Sampling, encode_tensor
from splitllm.runtime.speculative import MAX_AUTO_K, Drafter, prompt_lookup
from splitllm.runtime.transport import ServerError
from splitllm.runtime.wire_bytes import WireFormat, request_bytes

NEW_TOKENS = 24
# All-server, all-client, every single cut in both directions, multi-switch placements.
PLACEMENTS = ("SSSSSS", "CCCCCC", "CSSSSS", "CCSSSS", "CCCSSS", "CCCCSS", "CCCCCS",
              "SCCCCC", "SSCCCC", "SSSCCC", "SSSSCC", "SSSSSC", "CSCSCS", "SCSCSC", "CSSCCS")


def looping_prompt(seed: int) -> list[int]:
    """A random prompt that repeats itself: prompt lookup finds drafts, some right, some not."""
    rng = random.Random(seed)
    part = random_prompt(rng, 7)
    return [*part, *random_prompt(rng, 3), *part, *random_prompt(rng, 2), *part[:4]]


def reference(loaded: LoadedModel, prompt: list[int], sampling: Sampling = Sampling(),
              k: int | str = 0) -> list[int]:
    """The unsplit model's tokens (greedy, or seeded sampling), with k drafts per pass."""
    pipe = LocalPipe(loaded.model, sampling)
    return list(generate_tokens(pipe, prompt, NEW_TOKENS, speculate=k))


def sampled(seed: int) -> Sampling:
    """Sampling peaked enough that the tiny random models' drafts are sometimes accepted."""
    return Sampling(temperature=0.05, top_p=0.95, seed=seed)


def ask(raw: RawClient, session: str, ids: list[int], positions: tuple[int, int],
        **flags: bool) -> dict[str, Any]:
    """Send one all-server forward of token ids; the reply's header (token or error)."""
    raw.send(encode_tensor({"type": "forward", "session": session, "seq": 1, "units": [0, 6],
                            "positions": list(positions), **flags}, torch.tensor([ids])))
    reply, _ = raw.recv()
    return reply


def speculate(session: Session, placement: str, prompt: list[int], k: int | str,
              chunk: int = 512, sampling: Sampling | None = None) -> Generation:
    return session.generate(prompt, NEW_TOKENS, placement=placement, prefill_chunk=chunk,
                            stop_at_eos=False, speculate=k, sampling=sampling)


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


def test_auto_backs_off_after_two_missed_passes_and_resumes_only_on_repeated_hits() -> None:
    auto, history = Drafter("auto"), [5, 6, 7, 8, 9, 5, 6, 7]
    for _ in range(2):  # open chat: the first draft misses
        drafts = auto.draft(history, 100)
        assert drafts
        auto.observe(drafts, [0] * (len(drafts) + 1))
    assert auto.draft(history, 100) == [] and auto.shadow == 8  # the free probe
    for picked in [0] * 10 + [8, 0, 8, 0]:  # a word repeats now and then...
        assert auto.draft(history, 100) == []  # ... and speculation stays off
        auto.observe([], [picked])
    for _ in range(2):  # text starts repeating: two probes hit in a row
        auto.draft(history, 100)
        auto.observe([], [8])
    assert auto.k() > 0
    with pytest.raises(ValueError, match="'auto'"):
        Drafter(-1)


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_placement_and_draft_length_gives_the_unsplit_models_tokens(
        family: str, seeded: bool, tiny_models: dict[str, LoadedModel],
        llama_server: BackgroundServer, gpt2_server: BackgroundServer) -> None:
    """The reference: the unsplit model running the same speculative decoding (same seed);
    each position drawing with its own seed, the same tokens as without speculation too."""
    loaded = tiny_models[family]
    server = {"llama": llama_server, "gpt2": gpt2_server}[family]
    drafted = accepted = 0
    with connect(server.ws_url, loaded, timeout_s=TIMEOUT_S) as session:
        for i, placement in enumerate(PLACEMENTS):
            prompt, sampling = looping_prompt(i), sampled(100 + i) if seeded else Sampling()
            k: int | str = 1 + i % 8 if i % 5 else "auto"
            want = reference(loaded, prompt, sampling, k)
            plain = speculate(session, placement, prompt, 0, sampling=sampling)
            result = speculate(session, placement, prompt, k, sampling=sampling)
            assert list(result.tokens) == want, (placement, k)
            assert list(plain.tokens) == reference(loaded, prompt, sampling) == want, placement
            assert result.accepted <= result.drafted
            if result.accepted > 0 and "S" in placement:  # accepted drafts save round trips
                assert result.round_trips < plain.round_trips, placement
            drafted += result.drafted
            accepted += result.accepted
        if seeded:  # another seed, other tokens
            other = speculate(session, "CSCSCS", looping_prompt(0), 4, sampling=sampled(99))
            assert list(other.tokens) != reference(loaded, looping_prompt(0), sampled(100), 4)
    assert 0 < accepted < drafted  # drafts were both accepted and rejected


def test_sampled_speculation_draws_from_the_models_distribution(
        tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chi-square over 2,000 fixed seeds: the second token, verified as a draft of the most
    likely one, follows the model's distribution (exact, over every first token)."""
    prompt, sampling = looping_prompt(5), Sampling(temperature=0.02)  # peaked: drafts hit
    model = tiny_llama.model
    with torch.inference_mode():
        first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / 0.02, -1)  # [V]
        every = torch.tensor([[*prompt, t] for t in range(first.shape[0])])  # [V, P + 1]
        second = torch.softmax(model(every).logits[:, -1] / 0.02, -1)  # [V, V]
    expected = (first @ second).double()  # [V]: P(second token)
    expected /= expected.sum()  # float32 softmaxes: chi-square needs the sums to agree
    draft = int(expected.argmax())
    monkeypatch.setattr(speculative, "prompt_lookup", lambda history, k: [draft][:k])
    runs = 2000
    seen = torch.zeros_like(expected)
    accepted = 0
    for seed in range(runs):
        pipe = LocalPipe(model, sampling.model_copy(update={"seed": seed}))
        tokens = list(generate_tokens(pipe, prompt, 3, speculate=1))  # one pass, one draft
        seen[tokens[1]] += 1
        accepted += pipe.accepted
    assert 0.2 * runs < accepted < 0.8 * runs  # the draft is often, not always, accepted
    assert seen[draft] == accepted
    common = expected * runs >= 5  # chi-square bins: the rare tokens pooled into one
    observed = [*seen[common].tolist(), float(seen[~common].sum())]
    predicted = [*(expected[common] * runs).tolist(), float(expected[~common].sum() * runs)]
    assert stats.chisquare(observed, predicted).pvalue > 1e-3


@pytest.mark.parametrize("sampling", [None, sampled(7)], ids=["greedy", "sampled"])
def test_rejections_at_every_offset_roll_back_every_segment(
        sampling: Sampling | None, tiny_llama: LoadedModel, llama_server: BackgroundServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An oracle drafter that is wrong at a moving offset: every pass rejects, every segment
    of every placement rolls back, and the tokens stay the unsplit model's (seeded sampling:
    the token at each position is drawn with its own seed, so drafts never change them)."""
    prompt = looping_prompt(50)
    want = reference(tiny_llama, prompt, sampling or Sampling())

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
            result = speculate(session, placement, prompt, 5, chunk=3, sampling=sampling)
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
    # A pass with drafts verifies the last token and its drafts; a pass without drafts and
    # with nothing to roll back is a plain decode step (nothing verified).
    verify_passes = verified - result.drafted
    assert 1 <= verify_passes <= passes
    # Rejected drafts are rolled back by the next pass (the last pass's never are).
    assert verify_passes + result.accepted <= accepted < verified


@pytest.mark.parametrize("placement", ["SSSSSS", "CSSSSC"])
def test_the_servers_verification_passes_run_through_the_fused_blocks(
        placement: str, tiny_llama: LoadedModel, llama_server: BackgroundServer) -> None:
    """Over sockets, each pass with d drafts is one call of the fused kernel over its d + 1
    positions on the server (the prompt, longer than a call takes, by the fused blocks'
    many-row path), and the tokens stay the unsplit model's."""
    prompt = looping_prompt(70)
    assert len(prompt) > FAST_ROWS
    want = reference(tiny_llama, prompt, k=4)
    with connect(llama_server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as session, \
            mock.patch.object(fused_kernel, "run_blocks", wraps=fused_kernel.run_blocks) as kernel:
        result = speculate(session, placement, prompt, 4)
    assert list(result.tokens) == want
    verifying = [call.args[0].shape[0] for call in kernel.call_args_list
                 if call.args[0].shape[0] > 1]
    assert result.drafted > 0 and sum(rows - 1 for rows in verifying) == result.drafted


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


def test_the_measured_instance_knows_speculation() -> None:
    """Measured unit times: fewer, wider passes; the exact plan moves units to the client."""
    lengths, names = (1, 10, 40), ("embed", "block0", "block1", "block2", "head")
    def profile(scale: float) -> UnitProfile:  # prefill linear in the tokens, decode flat
        return UnitProfile(names=names, prompt_tokens=lengths,
                           prefill_s=tuple((scale * 0.002 * p,) * 5 for p in lengths),
                           contexts=(10, 300), decode_s=((scale * 0.01,) * 5,) * 2, threads=1)

    link = link_preset("4g")
    fmt = WireFormat(n_units=5, hidden_size=576, wire_dtype="float32", vocab_size=320)
    spec = Speculation(draft_tokens=4, hit_rate=0.8)

    def instance(speculation: Speculation | None) -> Instance:
        request = Request(prompt_tokens=40, output_tokens=64, speculation=speculation)
        sizes = request_bytes(fmt, 40, 64, speculation=speculation)
        return measured_instance(profile(3.0), profile_server_times(profile(1.0), request), link,
                                 request, sizes)

    plain, fast = instance(None), instance(spec)
    assert plain.passes == 64 and fast.passes == 1 + math.ceil(63 / spec.tokens_per_pass)
    block = fast.units[1]  # per pass: a decode step and four drafts' compute (prefill fit)
    assert block.server_s == pytest.approx(0.002 * 40 + (fast.passes - 1) * (0.01 + 4 * 0.002))
    assert block.out_bytes > plain.units[1].out_bytes  # five positions a pass cross the cut
    sla_s = 1.1 * evaluate(plain, Placement("SSSSS")).latency_s
    before = plan_placement(with_sla(plain, sla_s)).placement.sides.count("C")
    after = plan_placement(with_sla(fast, sla_s)).placement.sides.count("C")
    assert after > before
