"""Many concurrent split sessions over real sockets share engine steps and keep their tokens.

The first forwards of all sessions are held back until every one is queued, so the first step
is a batch by construction; later steps batch as the sessions' timing allows. Assertions are on
tokens, logits and counts, never on time.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from runtime_kit import TIMEOUT_S, RawClient, metrics, random_prompt, wait_for

from splitllm.runtime.client import Generation, connect
from splitllm.runtime.decoding import LocalPipe, timed_generation
from splitllm.runtime.engine import EngineConfig
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.protocol import Sampling

# Different server segments (shared blocks in the middle), prompt lengths, lengths of output.
PLACEMENTS = ["SSSSSS", "CCSSSS", "SSSCCC", "CSSSSC", "CSCSCS", "SSSSSS", "CCCSSS", "SCSSSS"]


def reference(loaded: LoadedModel, prompt: list[int], new_tokens: int,
              sampling: Sampling) -> tuple[list[int], list[torch.Tensor]]:
    pipe = LocalPipe(loaded.model, sampling)
    logits: list[torch.Tensor] = []
    timed = timed_generation(pipe, prompt, new_tokens,
                             on_token=lambda _: logits.append(pipe.last_logits))
    return list(timed.tokens), logits


def run_concurrently(server: BackgroundServer, loaded: LoadedModel,
                     jobs: list[Callable[[], Any]]) -> list[Any]:
    """Start every job at once; their first forwards form one step."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        with server.state.engine.held_back():
            futures = [pool.submit(job) for job in jobs]
            wait_for(lambda: server.state.engine.queued() == len(jobs)
                     or any(f.done() for f in futures))
            held = server.state.engine.queued()
        assert held == len(jobs), [f.exception() for f in futures if f.done()]
        return [f.result(timeout=TIMEOUT_S * 4) for f in futures]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_concurrent_sessions_match_the_unsplit_model(
        family: str, tiny_models: dict[str, LoadedModel],
        make_server: Callable[..., BackgroundServer]) -> None:
    loaded = tiny_models[family]
    server = make_server(loaded, engine=EngineConfig(max_batch_tokens=24))
    rng = random.Random(20)
    cases = []
    for k, placement in enumerate(PLACEMENTS):
        sampling = Sampling(temperature=0.9, top_p=0.95, seed=k) if k % 3 == 2 else Sampling()
        cases.append((placement, random_prompt(rng, 3 + 4 * k), 3 + k % 4, sampling))

    def job(placement: str, prompt: list[int], new: int, sampling: Sampling) -> Callable[[], Any]:
        def run() -> Generation:
            # The server segment's first unit is after the client's: its input is the client's.
            with connect(server.ws_url, loaded, timeout_s=TIMEOUT_S) as session:
                return session.generate(prompt, new, placement=placement, prefill_chunk=8,
                                        stop_at_eos=False, return_logits=True,
                                        sampling=sampling)
        return run

    results = run_concurrently(server, loaded, [job(*case) for case in cases])
    for (placement, prompt, new, sampling), result in zip(cases, results, strict=True):
        tokens, logits = reference(loaded, prompt, new, sampling)
        assert list(result.tokens) == tokens, placement
        for got, want in zip(result.logits, logits, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    page = metrics(server.http_url)
    steps = page["splitllm_engine_steps_total"]
    assert page['splitllm_engine_step_rows_bucket{le="1"}'] < steps  # some step had > 1 row
    # Each forward is a row of one step, or of several when its prompt chunk was cut to fit.
    assert page["splitllm_engine_step_rows_sum"] >= page["splitllm_forwards_total"] > 0
    assert not any(name.startswith("splitllm_errors_total") for name in page)


def test_a_bad_frame_leaves_the_other_sessions_complete(
        tiny_llama: LoadedModel, make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(tiny_llama)
    rng = random.Random(21)
    prompts = [random_prompt(rng, 6 + k) for k in range(4)]
    bad_error: dict[str, Any] = {}

    def good(prompt: list[int]) -> Callable[[], Any]:
        def run() -> Generation:
            with connect(server.ws_url, tiny_llama, timeout_s=TIMEOUT_S) as session:
                return session.generate(prompt, 5, placement="CSSSSS", stop_at_eos=False)
        return run

    def bad() -> str:
        client = RawClient(server.ws_url)
        try:
            session = client.open("CSSSSS")
            client.forward(session, (1, 6), (0, 2), torch.full((1, 2, 64), float("nan")))
            bad_error.update(client.expect_error("bad_values"))
            client.forward(session, (1, 6), (0, 2), torch.zeros(1, 2, 64))  # still usable
            reply, _ = client.recv()
            return str(reply["type"])
        finally:
            client.close()

    *results, then = run_concurrently(server, tiny_llama, [good(p) for p in prompts] + [bad])
    assert bad_error["code"] == "bad_values" and then == "token"
    page = metrics(server.http_url)
    assert page['splitllm_engine_step_rows_bucket{le="4"}'] >= 1  # the first step: 4 good rows
    for prompt, result in zip(prompts, results, strict=True):
        assert list(result.tokens) == reference(tiny_llama, prompt, 5, Sampling())[0]


@pytest.mark.slow
def test_smollm2_concurrent_sessions_keep_the_unsplit_greedy_tokens(
        smollm2: LoadedModel, smollm2_server: BackgroundServer) -> None:
    from splitllm.runtime.models import encode_prompt

    n = 32
    questions = ["What is the capital of France?", "Name three colours.",
                 "Write a haiku about rain.", "What is 2 + 2?"]
    placements = ["S" * n, "C" * 4 + "S" * (n - 4), "S" * 20 + "C" * 12, "C" + "S" * (n - 1)]
    prompts = [encode_prompt(smollm2, q) for q in questions]

    def job(prompt: list[int], placement: str) -> Callable[[], Any]:
        def run() -> Generation:
            with connect(smollm2_server.ws_url, smollm2, timeout_s=TIMEOUT_S * 6) as session:
                return session.generate(prompt, 8, placement=placement, stop_at_eos=False,
                                        return_logits=True)
        return run

    results = run_concurrently(smollm2_server, smollm2,
                               [job(p, pl) for p, pl in zip(prompts, placements, strict=True)])
    for prompt, result in zip(prompts, results, strict=True):
        tokens, logits = reference(smollm2, prompt, 8, Sampling())
        assert list(result.tokens) == tokens
        for got, want in zip(result.logits, logits, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
