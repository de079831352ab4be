"""The fused decode block equals the model's own path, covers what it claims, and keeps errors."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
import torch
from runtime_kit import family_config, llama_config, random_prompt
from transformers import AutoModelForCausalLM, PretrainedConfig

from splitllm.runtime import fused, fused_kernel, gemv
from splitllm.runtime.decoding import LocalPipe, generate_tokens
from splitllm.runtime.engine import Engine, EngineConfig
from splitllm.runtime.gemv import FAST_ROWS, FastPaths, fast_paths
from splitllm.runtime.hugepages import move_to_huge_pages
from splitllm.runtime.kvcache import KV_BLOCK_TOKENS
from splitllm.runtime.metrics import ServerMetrics
from splitllm.runtime.models import LoadedModel, encode_prompt
from splitllm.runtime.profile import STEP_ROUNDS
from splitllm.runtime.server_state import ServerConfig, ServerState
from splitllm.runtime.step import StepRow, run_step
from splitllm.runtime.units import SegmentCache, UnitStack

ATOL = 1e-4


def mistral_full() -> PretrainedConfig:
    config = family_config("mistral")
    config.sliding_window = None  # full attention: the fused path's; with a window it is not
    return config


def qwen2_full() -> PretrainedConfig:
    config = family_config("qwen2")
    config.use_sliding_window, config.sliding_window = False, None
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    return config


CONFIGS = {  # config, blocks of the 4 the fused path runs
    "llama": (lambda: llama_config(), 4),
    "llama with biases": (lambda: llama_config(attention_bias=True, mlp_bias=True), 4),
    "mistral": (mistral_full, 4),
    "qwen2 (q/k/v biases)": (qwen2_full, 4),
}


def stack_of(config: PretrainedConfig) -> UnitStack:
    torch.manual_seed(0)
    return UnitStack(AutoModelForCausalLM.from_config(config).eval())


class Counted:
    """The fused kernel's calls, and the blocks they ran (one call per run of blocks)."""

    def __init__(self, kernel: mock.MagicMock) -> None:
        self.kernel = kernel

    @property
    def calls(self) -> int:
        return self.kernel.call_count

    @property
    def blocks(self) -> int:
        return sum(call.args[2] - call.args[1] for call in self.kernel.call_args_list)

    @property
    def rows(self) -> list[int]:
        """Each call's kernel rows (a position each)."""
        return [call.args[0].shape[0] for call in self.kernel.call_args_list]


@contextmanager
def counted() -> Iterator[Counted]:
    with mock.patch.object(fused_kernel, "run_blocks", wraps=fused_kernel.run_blocks) as kernel:
        yield Counted(kernel)


def forward(stack: UnitStack, cache: SegmentCache, ids: list[int], position: int,
            fast: bool, verify: bool = False) -> torch.Tensor:
    """One row through every unit: next-token logits [1, V] (verify: of every position,
    [t, V], as a speculative verification pass)."""
    row = StepRow(0, stack.n_units, torch.tensor([ids]), position, cache,
                  head_positions=len(ids) if verify else 1)
    with fast_paths(FastPaths(fused=fast)):
        (out,), _ = run_step(stack, [row])
    assert out.error is None and out.out is not None, out.error
    return out.out


def assert_same_caches(got: SegmentCache, want: SegmentCache) -> None:
    assert got.get_seq_length() == want.get_seq_length()
    for g, w in zip(got.layers, want.layers, strict=True):  # rotated keys: every block's input
        torch.testing.assert_close(g.keys, w.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(g.values, w.values, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_decode_equals_the_model_path(name: str) -> None:
    """Decode past two KV block growths, prefill chunks in between, a rollback: same logits
    and caches as the model's own path, step after step."""
    make, fused_blocks = CONFIGS[name]
    stack = stack_of(make())
    n = stack.n_units
    fast, slow = (stack.new_cache(0, n, grown_in_blocks=True) for _ in range(2))
    assert fast is not None and slow is not None
    rng = random.Random(1)
    # (tokens fed, roll back to this length first): decode rows are one token
    script = [(FAST_ROWS + 2, None)] + [(1, None)] * 14 + [(3, None)] + [(1, None)] * 5 + \
        [(1, 20)] + [(1, None)] * (2 * KV_BLOCK_TOKENS - 20)
    fused_steps = 0
    with counted() as kernel:
        for tokens, back_to in script:
            if back_to is not None:  # a speculative rollback: both caches keep `back_to`
                fast.roll_back(back_to)
                slow.roll_back(back_to)
            ids, position = random_prompt(rng, tokens), fast.get_seq_length()
            torch.testing.assert_close(forward(stack, fast, ids, position, True),
                                       forward(stack, slow, ids, position, False),
                                       atol=ATOL, rtol=0)
            fused_steps += tokens <= FAST_ROWS
    assert kernel.calls == fused_steps and kernel.blocks == fused_steps * fused_blocks  # one
    # call per step of up to FAST_ROWS positions; the longer prompt took the model's path
    assert fast.get_seq_length() > 2 * KV_BLOCK_TOKENS
    assert_same_caches(fast, slow)


def test_a_split_segment_decodes_fused_and_leaves_its_input_alone() -> None:
    stack = stack_of(llama_config())
    n = stack.n_units
    fast, slow = (stack.new_cache(2, n, grown_in_blocks=True) for _ in range(2))
    assert fast is not None and slow is not None
    torch.manual_seed(2)
    for position in range(KV_BLOCK_TOKENS + 3):
        x = torch.randn(1, 1, stack.hidden_size)  # the client's hidden state
        sent = x.clone()
        outs = []
        for cache, on in ((fast, True), (slow, False)):
            with fast_paths(FastPaths(fused=on)):
                (out,), _ = run_step(stack, [StepRow(2, n, x, position, cache)])
            outs.append(out.out)
        assert torch.equal(x, sent)  # written in place: the step's own copy, not the input
        torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)
    assert_same_caches(fast, slow)


def test_a_fused_run_ends_where_another_row_joins() -> None:
    """A decode row alone through blocks 0-1 runs them in one call; at block 2 a second row (a
    split session's hidden state) joins and both run blocks 2-3 in a second call, the model's
    path's results either way. Every unit is timed."""
    stack = stack_of(llama_config())
    n = stack.n_units
    torch.manual_seed(3)
    results = []
    for on in (True, False):
        alone = stack.new_cache(0, n, grown_in_blocks=True)
        joining = stack.new_cache(3, n, grown_in_blocks=True)
        assert alone is not None and joining is not None
        forward(stack, alone, [3, 4, 5], 0, on)
        with fast_paths(FastPaths(fused=on)):
            run_step(stack, [StepRow(3, n, torch.ones(1, 3, stack.hidden_size), 0, joining)])
        torch.manual_seed(4)
        rows = [StepRow(0, n, torch.tensor([[6]]), 3, alone),
                StepRow(3, n, torch.randn(1, 1, stack.hidden_size), 3, joining)]
        with counted() as kernel, fast_paths(FastPaths(fused=on)):
            outputs, times = run_step(stack, rows)
        assert (kernel.calls, kernel.blocks) == ((2, 4) if on else (0, 0))
        assert set(times.unit_s) == set(range(n))
        results.append([out.out for out in outputs])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def grown(stack: UnitStack) -> SegmentCache:
    """A server session's cache of every block."""
    cache = stack.new_cache(0, stack.n_units, grown_in_blocks=True)
    assert cache is not None
    return cache


def packed(stack: UnitStack) -> UnitStack:
    """The stack with its linear layers' packed weights, as the engine sets them up."""
    gemv.install_fast_linear(stack.model)
    assert gemv.pack_weights(stack.model) > 0
    return stack


@pytest.mark.parametrize("sessions", [FAST_ROWS, 2 * FAST_ROWS + 1])
def test_fused_decode_of_several_sessions_equals_the_model_path(sessions: int) -> None:
    """Sessions of different lengths decode together (FAST_ROWS: one call per step; more: the
    products by the packed weights and one call of the kernel's attention per block; each
    session its own K/V), past a block growth, one of them rolled back and one sending a prompt
    chunk of 3 positions (3 kernel rows: that step has more than FAST_ROWS rows, the many-row
    path): logits and caches as the model's path."""
    stack = packed(stack_of(llama_config()))
    n = stack.n_units
    rng = random.Random(5)
    sides = [[grown(stack) for _ in range(sessions)] for _ in range(2)]  # fused, model's path
    for k in range(sessions):
        prompt = random_prompt(rng, 3 + 2 * k)
        for caches, on in zip(sides, (True, False), strict=True):
            forward(stack, caches[k], prompt, 0, on)
    few = many = 0  # steps of up to FAST_ROWS positions, and of more
    attend = mock.patch.object(fused_kernel, "attend_rows", wraps=fused_kernel.attend_rows)
    with counted() as kernel, attend as attended:
        for step in range(KV_BLOCK_TOKENS + 2):
            if step == 5:
                for caches in sides:
                    caches[1].roll_back(2)
            chunk = 3 if step == 9 else 1  # session 0 sends three tokens: a mixed step
            ids = [random_prompt(rng, chunk if k == 0 else 1) for k in range(sessions)]
            outs = []
            for caches, on in zip(sides, (True, False), strict=True):
                rows = [StepRow(0, n, torch.tensor([ids[k]]), cache.get_seq_length(), cache)
                        for k, cache in enumerate(caches)]
                with fast_paths(FastPaths(fused=on)):
                    outputs, _ = run_step(stack, rows)
                assert all(out.error is None and out.out is not None for out in outputs)
                outs.append(torch.cat([out.out for out in outputs if out.out is not None]))
            torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)
            positions = sessions - 1 + chunk
            few, many = few + (positions <= FAST_ROWS), many + (positions > FAST_ROWS)
    assert many >= 1
    assert kernel.calls == few and kernel.blocks == few * stack.n_blocks
    assert attended.call_count == many * stack.n_blocks
    for fast, slow in zip(*sides, strict=True):
        assert_same_caches(fast, slow)


@pytest.mark.parametrize("case", ["many rows, unpacked", "gpt2", "two threads", "windowed",
                                  "client cache", "qwen3"])
def test_the_model_path_runs_where_the_fused_path_does_not_apply(case: str) -> None:
    config = {"gpt2": family_config("gpt2"), "windowed": family_config("mistral"),
              "qwen3": family_config("qwen3")}.get(case, llama_config())
    stack = stack_of(config)
    n = stack.n_units
    caches = [stack.new_cache(0, n, grown_in_blocks=case != "client cache") for _ in range(2)]
    rows = [StepRow(0, n, torch.tensor([[5]]), 0, cache) for cache in caches]
    if case == "many rows, unpacked":
        rows = [StepRow(0, n, torch.tensor([[5]]), 0, grown(stack)) for _ in range(FAST_ROWS + 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if case == "two threads" else 1)
    try:
        with counted() as kernel:
            outputs, _ = run_step(stack, rows if case == "many rows, unpacked" else rows[:1])
    finally:
        torch.set_num_threads(threads)
    assert kernel.calls == 0
    assert all(out.error is None and out.out is not None for out in outputs)


def misfit() -> SegmentCache:
    """A session cache of 3 positions that does not fit llama_config's blocks: another model's
    (one K/V head)."""
    narrow = llama_config()
    narrow.num_key_value_heads = 1
    other = stack_of(narrow)
    cache = other.new_cache(0, other.n_units, grown_in_blocks=True)
    assert cache is not None
    forward(other, cache, [3, 4, 5], 0, False)
    return cache


@pytest.mark.parametrize("others", [0, 1, FAST_ROWS])
def test_an_error_in_the_fused_path_is_the_rows_own(others: int) -> None:
    """A session's cache that does not fit the blocks (here: another model's) fails that row,
    before any change to its cache; the other rows of the step (a few, or enough for the
    many-row path) decode as the model's path does, and later steps go on."""
    stack = packed(stack_of(llama_config()))
    n = stack.n_units
    wrong = misfit()
    goods, twins = [grown(stack) for _ in range(max(others, 1))], \
        [grown(stack) for _ in range(others)]
    for cache in goods:
        forward(stack, cache, [3, 4, 5], 0, True)
    for cache in twins:
        forward(stack, cache, [3, 4, 5], 0, False)
    rows = [StepRow(0, n, torch.tensor([[6]]), 3, cache) for cache in [wrong, *goods[:others]]]
    attend = mock.patch.object(fused_kernel, "attend_rows", wraps=fused_kernel.attend_rows)
    with counted() as kernel, attend as attended:
        outputs, _ = run_step(stack, rows)
    assert isinstance(outputs[0].error, ValueError) and "do not fit" in str(outputs[0].error)
    assert wrong.get_seq_length() == 3
    if others:
        ran = kernel.blocks if len(rows) <= FAST_ROWS else attended.call_count
        assert ran == stack.n_blocks
        for out, twin in zip(outputs[1:], twins, strict=True):
            assert out.out is not None
            torch.testing.assert_close(out.out, forward(stack, twin, [6], 3, False),
                                       atol=ATOL, rtol=0)
    else:
        assert kernel.calls == 0
        forward(stack, goods[0], [6], 3, True)
    assert all(cache.get_seq_length() == 4 for cache in goods)


def both(caches: tuple[SegmentCache, SegmentCache], stack: UnitStack, ids: list[int],
         ) -> torch.Tensor:
    """A verification row of len(ids) positions on the fused path's cache and on the model
    path's, at their (equal) length: the logits [t, V] of both, equal within ATOL."""
    held = caches[0].get_seq_length()
    assert caches[1].get_seq_length() == held
    got, want = (forward(stack, cache, ids, held, on, verify=True)
                 for cache, on in zip(caches, (True, False), strict=True))
    assert got.shape == (len(ids), stack.model.config.vocab_size)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    return got


@pytest.mark.parametrize("name", CONFIGS)
def test_verification_rows_equal_the_model_path(name: str) -> None:
    """Speculative passes of k = 2..5 positions (the last token and its drafts), each rolled
    back to its accepted length and now and then followed by a decode step, past two KV block
    growths (some passes straddling one): every position's logits and the caches as the
    model's path, one kernel call of k rows a pass."""
    make, fused_blocks = CONFIGS[name]
    stack = stack_of(make())
    caches = grown(stack), grown(stack)
    rng = random.Random(6)
    prompt = random_prompt(rng, FAST_ROWS + 3)  # longer than a kernel call: the model's path
    for cache in caches:
        forward(stack, cache, prompt, 0, False)
    calls: list[int] = []  # the kernel rows of each fused step
    straddled = 0
    with counted() as kernel:
        while caches[0].get_seq_length() < 2 * KV_BLOCK_TOKENS + 4:
            held, k = caches[0].get_seq_length(), 2 + len(calls) % 4
            straddled += held % KV_BLOCK_TOKENS + k > KV_BLOCK_TOKENS
            both(caches, stack, random_prompt(rng, k))
            accepted = rng.randrange(k)  # drafts accepted: the rest roll back
            for cache in caches:
                cache.roll_back(held + 1 + accepted)
            calls.append(k)
            if accepted % 2:
                both(caches, stack, random_prompt(rng, 1))
                calls.append(1)
    assert straddled >= 1 and 1 in calls
    assert kernel.rows == calls and kernel.blocks == len(calls) * fused_blocks
    assert_same_caches(*caches)


@pytest.mark.parametrize("others", [2, FAST_ROWS])
def test_a_verification_row_beside_decode_rows_of_other_sessions(others: int) -> None:
    """A session verifying 4 positions in the same step as `others` sessions decoding one each
    (6 kernel rows: one call; 10: the many-row path, its products by the packed weights), two
    of its drafts rolled back, then a step of decode rows only, then another mixed step:
    every row's logits and every cache as the model's path."""
    stack = packed(stack_of(llama_config()))
    n = stack.n_units
    rng = random.Random(7)
    sides = [[grown(stack) for _ in range(others + 1)] for _ in range(2)]  # fused, model's
    for k in range(others + 1):
        prompt = random_prompt(rng, FAST_ROWS + 1 + 3 * k)
        for caches in sides:
            forward(stack, caches[k], prompt, 0, False)
    attend = mock.patch.object(fused_kernel, "attend_rows", wraps=fused_kernel.attend_rows)
    with counted() as kernel, attend as attended:
        for step in range(3):
            verifying = step != 1
            ids = [random_prompt(rng, 4 if verifying and k == 0 else 1)
                   for k in range(others + 1)]
            outs = []
            for caches, on in zip(sides, (True, False), strict=True):
                rows = [StepRow(0, n, torch.tensor([ids[k]]), cache.get_seq_length(), cache,
                                head_positions=len(ids[k]))
                        for k, cache in enumerate(caches)]
                with fast_paths(FastPaths(fused=on)):
                    outputs, _ = run_step(stack, rows)
                assert all(out.error is None and out.out is not None for out in outputs)
                outs.append(torch.cat([out.out for out in outputs if out.out is not None]))
                if verifying:
                    caches[0].roll_back(caches[0].get_seq_length() - 2)
            assert outs[0].shape[0] == others + (4 if verifying else 1)
            torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)
    if others + 4 <= FAST_ROWS:  # the decode step: the lane's call
        assert kernel.rows == [others + 4, others + 1, others + 4] and attended.call_count == 0
    else:
        assert kernel.calls == 0 and attended.call_count == 3 * stack.n_blocks
    for fast, slow in zip(*sides, strict=True):
        assert_same_caches(fast, slow)


def test_a_verification_row_that_does_not_fit_fails_alone() -> None:
    """A session whose cache does not fit the blocks (another model's) verifying 3 positions
    beside a session verifying 2 and one decoding: that row gets its error before its cache
    holds anything new; the others run in the same kernel call (6 rows, the failed row's
    skipped) as the model's path, and decode on afterwards."""
    stack = stack_of(llama_config())
    n = stack.n_units
    wrong = misfit()
    goods, twins = [grown(stack) for _ in range(2)], [grown(stack) for _ in range(2)]
    for cache in goods + twins:
        forward(stack, cache, [3, 4, 5], 0, False)
    rows = [StepRow(0, n, torch.tensor([ids]), 3, cache, head_positions=len(ids))
            for ids, cache in (([6, 7, 8], wrong), ([6, 7], goods[0]), ([6], goods[1]))]
    with counted() as kernel:
        outputs, _ = run_step(stack, rows)
    assert isinstance(outputs[0].error, ValueError) and "do not fit" in str(outputs[0].error)
    assert wrong.get_seq_length() == 3 and kernel.rows == [6]
    for out, ids, twin in zip(outputs[1:], ([6, 7], [6]), twins, strict=True):
        assert out.out is not None
        torch.testing.assert_close(out.out, forward(stack, twin, ids, 3, False, verify=True),
                                   atol=ATOL, rtol=0)
    for good, twin in zip(goods, twins, strict=True):
        torch.testing.assert_close(forward(stack, good, [9], good.get_seq_length(), True),
                                   forward(stack, twin, [9], twin.get_seq_length(), False),
                                   atol=ATOL, rtol=0)
        assert_same_caches(good, twin)


def test_the_engine_decodes_one_row_by_fused_blocks(tiny_llama: LoadedModel) -> None:
    """Behind the engine: one compiled call for the blocks, one for the head's norm and
    product."""
    stack = UnitStack(tiny_llama.model)
    Engine(stack, ServerMetrics(stack.names), EngineConfig(), threads=1, start=False)
    cache = stack.new_cache(0, stack.n_units, grown_in_blocks=True)
    assert cache is not None
    forward(stack, cache, [3, 4, 5], 0, True)
    head_calls = mock.patch.object(fused_kernel, "head_rows", wraps=fused_kernel.head_rows)
    with counted() as kernel, head_calls as head:
        forward(stack, cache, [6], 3, True)
    assert kernel.calls == 1 and kernel.blocks == stack.n_blocks and head.call_count == 1


def greedy_fused(stack: UnitStack, prompt: list[int], new_tokens: int) -> list[int]:
    cache = stack.new_cache(0, stack.n_units, grown_in_blocks=True)
    assert cache is not None
    tokens: list[int] = []
    ids = prompt
    with counted() as kernel:
        for _ in range(new_tokens):
            logits = forward(stack, cache, ids, cache.get_seq_length(), True)
            ids = [int(logits.argmax(-1))]
            tokens.append(ids[0])
    fused_steps = new_tokens - (len(prompt) > FAST_ROWS)  # a long prompt: the model's path
    assert kernel.blocks == fused_steps * stack.n_blocks
    return tokens


def test_fused_greedy_tokens_equal_the_unsplit_model(tiny_llama: LoadedModel) -> None:
    prompt = random_prompt(random.Random(3), 6)
    want = list(generate_tokens(LocalPipe(tiny_llama.model), prompt, 24))
    assert greedy_fused(UnitStack(tiny_llama.model), prompt, 24) == want


@pytest.mark.slow
def test_fused_smollm2_equals_the_model_path_and_the_unsplit_model(smollm2: LoadedModel) -> None:
    """The real model, its weights in huge pages as the engine keeps them: logits of both paths
    step by step past a KV block growth, and the unsplit model's greedy tokens."""
    prompt = encode_prompt(smollm2, "Name three colours of the rainbow.")
    want = list(generate_tokens(LocalPipe(smollm2.model), prompt, 20))
    move_to_huge_pages(smollm2.model)
    stack = UnitStack(smollm2.model)
    assert greedy_fused(stack, prompt, 20) == want
    fast, slow = (stack.new_cache(0, stack.n_units, grown_in_blocks=True) for _ in range(2))
    assert fast is not None and slow is not None
    ids = prompt
    for token in want[:KV_BLOCK_TOKENS + 2]:
        position = fast.get_seq_length()
        torch.testing.assert_close(forward(stack, fast, ids, position, True),
                                   forward(stack, slow, ids, position, False),
                                   atol=ATOL, rtol=0)
        ids = [token]
    assert_same_caches(fast, slow)


@pytest.mark.slow
def test_fused_smollm2_verification_passes_equal_the_model_path(smollm2: LoadedModel) -> None:
    """The real model: passes of k = 5, 3, 2, 4 positions through the fused blocks, each rolled
    back (drafts rejected) and followed by a decode step: logits and caches as the model's
    path."""
    stack = UnitStack(smollm2.model)
    caches = grown(stack), grown(stack)
    prompt = encode_prompt(smollm2, "Rewrite: the cat sat on the mat.")
    for cache in caches:
        forward(stack, cache, prompt, 0, False)
    with counted() as kernel:
        for k in (5, 3, 2, 4):
            held = caches[0].get_seq_length()
            drafts = both(caches, stack, [prompt[-1], *prompt[1:k]]).argmax(-1).tolist()
            for cache in caches:
                cache.roll_back(held + 1 + k // 3)
            both(caches, stack, drafts[k // 3:k // 3 + 1])
    assert kernel.rows == [5, 1, 3, 1, 2, 1, 4, 1]
    assert_same_caches(*caches)


def test_huge_pages_keep_the_model_and_its_tied_weights() -> None:
    torch.manual_seed(0)
    config = llama_config()
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.inference_mode():
        want = model(ids).logits
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    before = {p.data_ptr() for p in model.parameters()}
    moved = move_to_huge_pages(model)
    assert moved >= sum(v.numel() * 4 for v in values.values())
    assert move_to_huge_pages(model) == 0  # idempotent
    assert not before & {p.data_ptr() for p in model.parameters()}
    for name, p in model.named_parameters():
        assert torch.equal(p, values[name]), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, want)
    model(ids).logits.sum().backward()  # still a trainable model
    grads: list[Any] = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)


def test_the_servers_step_model_is_timed_on_the_fused_path(tiny_llama: LoadedModel) -> None:
    """A server's step model times its decode steps as the engine runs them: 1 and 4 rows by
    the fused blocks (a model timed on the model's own blocks put the server's work 1.5-1.8x
    too high), with the engine's one thread whatever the caller's."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with counted() as kernel:
            state = ServerState(tiny_llama, ServerConfig(threads=1))
        state.engine.stop()
        assert torch.get_num_threads() == 2  # the caller's setting, given back
    finally:
        torch.set_num_threads(before)
    n = state.stack.n_blocks
    # the engine's warm-up (a dummy block), then 1 and 4 rows, 2 decode steps a round, a
    # warm-up round and STEP_ROUNDS rounds: one call per step over every block
    decode_steps = 2 * 2 * (STEP_ROUNDS + 1)
    assert kernel.calls == 1 + decode_steps
    assert sum(call.args[2] - call.args[1] for call in kernel.kernel.call_args_list[1:]) == \
        decode_steps * n
    assert state.step_models is not None
    assert state.step_models.start.wall.block.points[0][0] == 1


def _steps_alike(stack: UnitStack, script: list[list[tuple[int, list[int]]]]) -> int:
    """Each step of `script` (rows of (session, ids), the sessions' caches grown from 0) on the
    fused path and on the model's path: the same logits and caches. How many blocks the
    kernel's attention ran on the fused side (the many-row path: once per block a step)."""
    sessions = 1 + max(s for step in script for s, _ in step)
    sides = [[grown(stack) for _ in range(sessions)] for _ in range(2)]  # fused, model's path
    attended = 0
    for step in script:
        outputs = []
        for caches, on in zip(sides, (True, False), strict=True):
            rows = [StepRow(0, stack.n_units, torch.tensor([ids]),
                            caches[s].get_seq_length(), caches[s]) for s, ids in step]
            attend = mock.patch.object(fused_kernel, "attend_rows",
                                       wraps=fused_kernel.attend_rows)
            with fast_paths(FastPaths(fused=on)), attend as attend_rows:
                outs, _ = run_step(stack, rows)
            attended += attend_rows.call_count if on else 0
            outputs.append([out.out for out in outs])
        for got, want in zip(*outputs, strict=True):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for got_cache, want_cache in zip(*sides, strict=True):
        assert_same_caches(got_cache, want_cache)
    return attended


@pytest.mark.parametrize("name", CONFIGS)
def test_prompt_chunks_run_fused_beside_decode_rows(name: str) -> None:
    """A prompt of more than FAST_ROWS positions in two chunks (the second attending over the
    first) beside another session's decode rows takes the many-row path, logits and caches as
    the model's path; a chunk of more than `SESSION_POSITIONS` sends its step by the model's
    path."""
    make, fused_blocks = CONFIGS[name]
    stack = packed(stack_of(make()))
    rng = random.Random(3)
    first, second = random_prompt(rng, FAST_ROWS + 5), random_prompt(rng, FAST_ROWS + 3)
    script = [[(1, random_prompt(rng, 3))],
              [(0, first), (1, random_prompt(rng, 1))],
              [(1, random_prompt(rng, 1)), (0, second)]]
    assert _steps_alike(stack, script) == 2 * fused_blocks  # the two steps with a chunk
    with mock.patch.object(fused, "SESSION_POSITIONS", FAST_ROWS + 4):
        # the first chunk is longer: its step by the model's path; the second's fused
        assert _steps_alike(stack, script) == fused_blocks
