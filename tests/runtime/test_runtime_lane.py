"""The decode lane equals the model's path, reuses its arguments while the rows hold still, and
leaves every other step to the general path."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_kit import llama_config, random_prompt
from test_runtime_engine import Driver, reference_logits
from test_runtime_fused import CONFIGS, assert_same_caches, forward, grown, stack_of

from splitllm.runtime import fused_kernel, lane
from splitllm.runtime.gemv import FAST_ROWS, FastPaths, fast_paths
from splitllm.runtime.hugepages import move_to_huge_pages
from splitllm.runtime.kvcache import KV_BLOCK_TOKENS, KvArena, kv_capacity
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.protocol import Sampling
from splitllm.runtime.sampling import Sampler
from splitllm.runtime.session import Limits, ServerSession
from splitllm.runtime.step import StepRow, run_step
from splitllm.runtime.units import SegmentCache, UnitStack

ATOL = 1e-4


@dataclass
class Lanes:
    """The steps the lane ran, the lanes built for them, and the full rows whose caches grew
    in a lane that was kept."""

    steps: int = 0
    builds: int = 0
    grown: int = 0


@contextmanager
def lanes() -> Iterator[Lanes]:
    counted = Lanes()
    real_run, real_build, real_room = lane.DecodeLane.run, lane._build, lane.DecodeLane.make_room

    def run(self: lane.DecodeLane, *args: Any) -> Any:
        counted.steps += 1
        return real_run(self, *args)

    def build(*args: Any) -> lane.DecodeLane | None:
        made = real_build(*args)
        counted.builds += made is not None
        return made

    def make_room(self: lane.DecodeLane) -> bool:
        full = sum(held >= room for held, room in zip(self.held, self.capacity, strict=True))
        made = real_room(self)
        counted.grown += full if made else 0
        return made

    with mock.patch.object(lane.DecodeLane, "run", run), \
            mock.patch.object(lane, "_build", build), \
            mock.patch.object(lane.DecodeLane, "make_room", make_room):
        yield counted


def step(stack: UnitStack, rows: list[StepRow], on: bool) -> list[torch.Tensor]:
    """The rows' outputs with the lane (on) or by the model's own modules."""
    with fast_paths(FastPaths() if on else FastPaths(fused=False)):
        outputs, _ = run_step(stack, rows)
    assert all(out.error is None and out.out is not None for out in outputs)
    return [out.out for out in outputs if out.out is not None]


@pytest.mark.parametrize("name", CONFIGS)
def test_the_lane_equals_the_model_path_and_holds_still_between_steps(name: str) -> None:
    """Decode past two KV block growths, a prefill chunk and a rollback in between: the lane's
    logits and caches are the model path's; a lane is built only where the rows did not hold
    still (the first decode, after the chunk or the rollback), every other decode step reuses
    it, a full buffer grown in the lane."""
    make, _ = CONFIGS[name]
    stack = stack_of(make())
    fast, slow = grown(stack), grown(stack)
    rng = random.Random(1)
    script = [(5, None)] + [(1, None)] * 14 + [(3, None)] + [(1, None)] * 5 + [(1, 20)] + \
        [(1, None)] * (2 * KV_BLOCK_TOKENS - 20)
    decodes, expected_builds, expected_grown, still = 0, 0, 0, False
    with lanes() as counted:
        for tokens, back_to in script:
            if back_to is not None:
                fast.roll_back(back_to)
                slow.roll_back(back_to)
                still = False
            ids, position = random_prompt(rng, tokens), fast.get_seq_length()
            torch.testing.assert_close(forward(stack, fast, ids, position, True),
                                       forward(stack, slow, ids, position, False),
                                       atol=ATOL, rtol=0)
            if tokens == 1:
                decodes += 1
                expected_builds += not still
                expected_grown += still and kv_capacity(position) == position  # full
            still = tokens == 1
    assert counted.steps == decodes and counted.builds == expected_builds
    assert counted.grown == expected_grown >= 1
    assert decodes - expected_builds >= decodes // 2  # most steps reused the lane
    assert fast.get_seq_length() > 2 * KV_BLOCK_TOKENS
    assert_same_caches(fast, slow)


def test_a_long_decode_grows_its_cache_in_the_lane_without_building_it_again() -> None:
    """130 positions decoded one at a time: the segment's K/V grow together at 16, 32, 48, 80
    and 128 positions (runtime/kvcache.py), each time in place by the lane built at the first
    decode step, not built again; the logits and caches stay the model path's."""
    stack = stack_of(llama_config())
    fast, slow = grown(stack), grown(stack)
    for cache, on in ((fast, True), (slow, False)):
        forward(stack, cache, [3, 4, 5], 0, on)
    rng = random.Random(3)
    with lanes() as counted:
        for position in range(3, 130):
            ids = random_prompt(rng, 1)
            got = forward(stack, fast, ids, position, True)
            want = forward(stack, slow, ids, position, False)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert counted.steps == 127 and counted.builds == 1
    assert counted.grown == len([16, 32, 48, 80, 128])
    assert [kv_capacity(p) for p in (16, 17, 33, 49, 81, 129)] == [16, 32, 48, 80, 128, 192]
    assert_same_caches(fast, slow)


def test_several_sessions_share_a_lane_and_rebuild_it_when_one_changes() -> None:
    """FAST_ROWS sessions of different lengths decode together; one rolls back, one sends a
    prompt chunk (that step takes the general path), the order of the rows changes: logits
    and caches as the model path's, the lane rebuilt only after each of those."""
    stack = stack_of(llama_config())
    n = stack.n_units
    rng = random.Random(5)
    sides = [[grown(stack) for _ in range(FAST_ROWS)] for _ in range(2)]  # lane, model path
    for k in range(FAST_ROWS):
        prompt = random_prompt(rng, 1 + k)  # none fills its first KV block in these steps
        for caches, on in zip(sides, (True, False), strict=True):
            step(stack, [StepRow(0, n, torch.tensor([prompt]), 0, caches[k])], on)
    with lanes() as counted:
        for t in range(10):
            if t == 3:
                for caches in sides:
                    caches[1].roll_back(2)
            if t == 7:
                for caches in sides:
                    caches.reverse()
            chunk = [3 if t == 5 and k == 0 else 1 for k in range(FAST_ROWS)]
            ids = [random_prompt(rng, c) for c in chunk]
            outs = [step(stack, [StepRow(0, n, torch.tensor([ids[k]]), cache.get_seq_length(),
                                         cache) for k, cache in enumerate(caches)], on)
                for caches, on in zip(sides, (True, False), strict=True)]
            for got, want in zip(*outs, strict=True):
                torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # built at 0, after the rollback (3), after the chunk (6), after the new order (7)
    assert counted.steps == 9 and counted.builds == 4
    for fast, slow in zip(*sides, strict=True):
        assert_same_caches(fast, slow)


@pytest.mark.parametrize("stop", ["head", "before the head"])
def test_a_split_segment_runs_in_the_lane(stop: str) -> None:
    """Hidden states from a client (units from 2), to the head or back to the client before
    it: the model path's logits or hidden states, the input untouched."""
    stack = stack_of(llama_config())
    n = stack.n_units
    end = n if stop == "head" else n - 1
    fast, slow = (stack.new_cache(2, end, grown_in_blocks=True) for _ in range(2))
    assert fast is not None and slow is not None
    torch.manual_seed(2)
    with lanes() as counted:
        for position in range(KV_BLOCK_TOKENS + 3):
            x = torch.randn(1, 1, stack.hidden_size)
            sent = x.clone()
            got, want = (step(stack, [StepRow(2, end, x, position, cache)], on)
                         for cache, on in ((fast, True), (slow, False)))
            assert torch.equal(x, sent)
            assert got[0].shape == want[0].shape == ((1, stack.vocab_size) if stop == "head"
                                                     else (1, 1, stack.hidden_size))
            torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=0)
    assert counted.steps == KV_BLOCK_TOKENS + 3 and counted.builds == 1  # at 0
    assert counted.grown == 1  # at 16
    assert_same_caches(fast, slow)


SEGMENTS = ((0, 2), (3, 4), (5, 8))  # a placement's server segments, SSCSCSSS of 6 blocks


def test_a_multi_switch_sessions_segments_keep_their_lanes() -> None:
    """A session's three server segments, one after the other at every position: each its own
    lane, built once and found again at every later visit, with the model path's outputs."""
    stack = stack_of(llama_config(layers=6))
    sides = [[stack.new_cache(a, b, grown_in_blocks=True) for a, b in SEGMENTS] for _ in "fs"]
    torch.manual_seed(3)
    with lanes() as counted:
        for position in range(6):
            for k, (a, b) in enumerate(SEGMENTS):
                x = torch.tensor([[5 + position]]) if a == 0 else torch.randn(
                    1, 1, stack.hidden_size)
                got, want = (step(stack, [StepRow(a, b, x, position, caches[k])], on)
                             for caches, on in zip(sides, (True, False), strict=True))
                torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=0)
    assert counted.steps == 18 and counted.builds == 3
    assert {id(c) for held in lane.kept_lanes(stack) for c in held.caches} == {
        id(c) for c in sides[0]}
    for fast, slow in zip(*sides, strict=True):
        assert fast is not None and slow is not None
        assert_same_caches(fast, slow)


def test_the_model_keeps_its_last_lanes_and_a_closed_sessions_go() -> None:
    """More single-row sessions than lanes kept, each decoded once: the newest `LANES_KEPT`
    lanes kept; a multi-switch session's lanes go when it closes, the others' stay."""
    stack = stack_of(llama_config(layers=6))
    caches = [grown(stack) for _ in range(lane.LANES_KEPT + 2)]
    for cache in caches:
        step(stack, [StepRow(0, stack.n_units, torch.tensor([[5]]), 0, cache)], True)
    assert [held.caches for held in lane.kept_lanes(stack)] == [
        (cache,) for cache in reversed(caches[2:])]
    session = ServerSession.open("s", stack, "SSCSCSSS", torch.float32, Sampling(), Limits())
    for seg in session.segments.values():
        x = torch.tensor([[5]]) if seg.start == 0 else torch.randn(1, 1, stack.hidden_size)
        step(stack, [StepRow(seg.start, seg.stop, x, 0, seg.cache)], True)
    mine = [seg.cache for seg in session.segments.values()]
    assert [held.caches for held in lane.kept_lanes(stack)][:3] == [(c,) for c in reversed(mine)]
    assert len(lane.kept_lanes(stack)) == lane.LANES_KEPT
    session.close()
    assert [held.caches for held in lane.kept_lanes(stack)] == [
        (cache,) for cache in reversed(caches[5:])]


def rows_of(stack: UnitStack, caches: list[SegmentCache], tokens: int = 1) -> list[StepRow]:
    return [StepRow(0, stack.n_units, torch.tensor([[5] * tokens]), c.get_seq_length(), c)
            for c in caches]


@pytest.mark.parametrize("case", ["a prompt chunk", "rows at other units", "too many rows",
                                  "lane off", "a client's cache", "two threads"])
def test_other_steps_take_the_general_path(case: str) -> None:
    stack = stack_of(llama_config())
    n = stack.n_units
    caches = [grown(stack) for _ in range(FAST_ROWS + 1)]
    for cache in caches:
        forward(stack, cache, [3, 4, 5], 0, True)
    rows = rows_of(stack, caches[:2], tokens=3 if case == "a prompt chunk" else 1)
    if case == "rows at other units":
        split = stack.new_cache(2, n, grown_in_blocks=True)
        rows[1] = StepRow(2, n, torch.randn(1, 1, stack.hidden_size), 0, split)
    elif case == "too many rows":
        rows = rows_of(stack, caches)
    elif case == "a client's cache":  # transformers' own layers: the model path writes them
        client = stack.new_cache(0, n)
        assert client is not None
        forward(stack, client, [3, 4, 5], 0, True)
        rows = rows_of(stack, [client])
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if case == "two threads" else 1)
    try:
        with lanes() as counted, fast_paths(FastPaths(lane=case != "lane off")):
            outputs, _ = run_step(stack, rows)
    finally:
        torch.set_num_threads(threads)
    assert counted.steps == 0 and counted.builds == 0
    assert all(out.error is None and out.out is not None for out in outputs)


def test_a_failed_kernel_call_leaves_the_caches_as_they_were() -> None:
    """The blocks' call raises in a lane step: the step fails, every layer still holds what it
    held, and the next step reuses the lane with the model path's logits."""
    stack = stack_of(llama_config())
    fast, slow = grown(stack), grown(stack)
    for cache, on in ((fast, True), (slow, False)):
        forward(stack, cache, [3, 4, 5], 0, on)
        forward(stack, cache, [6], 3, on)  # the lane is built here
    real, calls = lane.kernel.run_blocks, []

    def failing(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        raise MemoryError("the kernel's scratch")

    with lanes() as counted:
        with mock.patch.object(lane.kernel, "run_blocks", failing), pytest.raises(MemoryError):
            forward(stack, fast, [7], 4, True)
        assert calls == [1] and {layer.get_seq_length() for layer in fast.layers} == {4}
        assert lane.kernel.run_blocks is real
        torch.testing.assert_close(forward(stack, fast, [7], 4, True),
                                   forward(stack, slow, [7], 4, False), atol=ATOL, rtol=0)
    assert counted.steps == 2 and counted.builds == 0
    assert_same_caches(fast, slow)


def test_a_growth_that_fails_in_the_lane_fails_that_row_alone() -> None:
    """Two sessions decode in a lane; the one whose buffers are full cannot grow them (out of
    memory): the lane is not kept, that row fails alone on the general path holding what it
    held, and the other gets the model path's logits."""
    stack = stack_of(llama_config())
    full, other, twin = grown(stack), grown(stack), grown(stack)
    step(stack, rows_of(stack, [full], KV_BLOCK_TOKENS - 1), True)
    for cache, on in ((other, True), (twin, False)):
        step(stack, rows_of(stack, [cache], 3), on)
    step(stack, rows_of(stack, [full, other]), True)  # the lane is built: full holds 16 of 16
    step(stack, rows_of(stack, [twin]), False)
    real, arena = KvArena.grow, full.layers[0].arena

    def grow(self: KvArena, capacity: int) -> None:
        if self is arena:
            raise MemoryError("no room for the K/V")
        real(self, capacity)

    with lanes() as counted, mock.patch.object(KvArena, "grow", grow), \
            fast_paths(FastPaths()):
        outputs, _ = run_step(stack, rows_of(stack, [full, other]))
    assert isinstance(outputs[0].error, MemoryError) and outputs[1].error is None
    assert counted.steps == counted.builds == counted.grown == 0
    assert full.get_seq_length() == KV_BLOCK_TOKENS and other.get_seq_length() == 5
    torch.testing.assert_close(outputs[1].out, step(stack, rows_of(stack, [twin]), False)[0],
                               atol=ATOL, rtol=0)


def test_a_moved_weight_rebuilds_the_lane() -> None:
    """The weights moved into huge pages after the lane took its views: the next step builds
    a new lane on the moved weights, with the same logits."""
    config = llama_config()
    config.tie_word_embeddings = True
    stack = stack_of(config)
    fast, slow = grown(stack), grown(stack)
    for cache, on in ((fast, True), (slow, False)):
        forward(stack, cache, [3, 4, 5], 0, on)
    with lanes() as counted:
        for position, token in enumerate([6, 7, 8], start=3):
            if position == 5:
                assert move_to_huge_pages(stack.model) > 0
            torch.testing.assert_close(forward(stack, fast, [token], position, True),
                                       forward(stack, slow, [token], position, False),
                                       atol=ATOL, rtol=0)
    assert counted.steps == 3 and counted.builds == 2
    held = lane.kept_lanes(stack)[0]
    assert held.head is not None and held.head.weight.data_ptr() == held.head.data_ptr


def test_the_engine_decodes_concurrent_sessions_in_the_lane(tiny_llama: LoadedModel) -> None:
    """Two sessions through the engine, 20 decode steps: every step after the prompts runs in
    the lane (built again only when a session fills a KV block), every forward's logits are the
    unsplit model's, and none is overwritten by a later step."""
    drv = Driver(tiny_llama)
    n = drv.stack.n_units
    rng = random.Random(8)
    sessions = [drv.open(name, "S" * n) for name in ("a", "b")]
    texts = [random_prompt(rng, 3), random_prompt(rng, 5)]
    seqs = [drv.submit(s, (0, n), (0, len(t)), torch.tensor([t]))
            for s, t in zip(sessions, texts, strict=True)]
    drv.step()
    done: list[tuple[ServerSession, int, list[int]]] = []
    with lanes() as counted:
        for _ in range(20):
            for k, session in enumerate(sessions):
                token = drv.result(session, seqs[k]).token
                assert token is not None
                texts[k] = [*texts[k], token]
                seqs[k] = drv.submit(session, (0, n), (len(texts[k]) - 1, len(texts[k])),
                                     torch.tensor([[token]]))
                done.append((session, seqs[k], list(texts[k])))
            drv.step()
    assert counted.steps == 20 and counted.builds == 1
    assert counted.grown == 2  # b fills its block at step 11, a at 13
    for session, seq, text in done:
        torch.testing.assert_close(drv.result(session, seq).logits,
                                   reference_logits(tiny_llama, text), atol=ATOL, rtol=0)


@given(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, float("nan"), float("inf")]),
                min_size=1, max_size=12), st.integers(1, 3))
def test_greedy_sampling_picks_torchs_argmax(values: list[float], rows: int) -> None:
    """The greedy sampler's numpy argmax (fp32 on the CPU) is torch's: the first of tied
    maxima, the first NaN where there is one."""
    logits = torch.tensor([values] * rows, dtype=torch.float32)  # [T, V]
    want = tuple(int(t) for t in logits.argmax(dim=-1).tolist())
    assert Sampler(Sampling()).each(logits, 0) == want
    assert Sampler(Sampling()).each(logits.double(), 0) == want  # torch's own path


@settings(deadline=None)  # the first example loads the compiled kernel
@given(st.lists(st.sampled_from([-1.0, -0.0, 0.0, 0.5, 2.0, float("nan"), float("inf"),
                                 float("-inf")]), min_size=1, max_size=40), st.integers(1, 3))
def test_the_compiled_heads_greedy_token_is_torchs_argmax(values: list[float], rows: int) -> None:
    """The head kernel's argmax of the logits it wrote (the lane's greedy token) is torch's:
    the first of tied maxima, the first NaN where there is one (up to 40 logits: the
    vectorised pass's tails). The LM head is a column of these values and every row's hidden
    state a 1, so the logits are the values."""
    weight = np.array(values, dtype=np.float32)[:, None]  # [V, 1]
    logits = np.empty((rows, len(values)), dtype=np.float32)  # [R, V]
    greedy = np.full(rows, -1, dtype=np.int64)
    fused_kernel.head_rows(np.ones((rows, 1), dtype=np.float32), np.ones(1, dtype=np.float32),
                           0.0, weight, logits, greedy)
    torch.testing.assert_close(torch.from_numpy(logits), torch.tensor([values] * rows),
                               equal_nan=True)
    assert greedy.tolist() == torch.from_numpy(logits).argmax(dim=-1).tolist()
