"""The compiled few-row linear kernel: F.linear's results, used only where it applies."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitllm.runtime import gemv
from splitllm.runtime.engine import Engine, EngineConfig
from splitllm.runtime.gemv import (
    FAST_ROWS,
    FastPaths,
    fast_linear,
    fast_paths,
    install_fast_linear,
    pack_weights,
)
from splitllm.runtime.metrics import ServerMetrics
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.step import StepRow, run_step
from splitllm.runtime.units import UnitStack


def kernel_calls() -> Any:
    """The few-row kernel's calls, counted (it still runs)."""
    return mock.patch.object(gemv, "linear_rows", wraps=gemv.linear_rows)


@pytest.mark.parametrize("shape", [(1, 1, 48), (1, 3, 48), (2, 2, 48), (4, 48), (48,)])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_linear_equals_f_linear(shape: tuple[int, ...], bias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 48, generator=generator)
    b = torch.randn(40, generator=generator) if bias else None
    x = torch.randn(*shape, generator=generator)
    with torch.inference_mode(), kernel_calls() as kernel:
        got = fast_linear(x, weight, b)
    assert kernel.call_count == 1  # the kernel ran, not the fallback
    want = F.linear(x, weight, b)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["rows", "grad", "dtype", "threads", "strided"])
def test_fast_linear_falls_back_where_the_kernel_does_not_apply(case: str) -> None:
    weight, x = torch.randn(8, 16), torch.randn(1, 1, 16)
    if case == "rows":
        x = torch.randn(1, FAST_ROWS + 1, 16)
    elif case == "dtype":
        weight, x = weight.double(), x.double()
    elif case == "strided":
        weight = torch.randn(16, 8).t()
    threads = torch.get_num_threads()
    if case == "threads":
        torch.set_num_threads(2)
    try:
        with mock.patch.object(gemv, "linear_rows") as kernel, \
                torch.set_grad_enabled(case == "grad"):
            got = fast_linear(x, weight, None)
    finally:
        torch.set_num_threads(threads)
    kernel.assert_not_called()
    torch.testing.assert_close(got, F.linear(x, weight))


def test_fast_linear_rejects_a_wrong_shape_as_f_linear_does() -> None:
    weight, x = torch.randn(8, 16), torch.randn(1, 1, 32)  # 32 = two rows of 16: not a match
    with torch.inference_mode(), pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        fast_linear(x, weight, None)


def test_installed_linear_layers_keep_their_results_and_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8, bias=False))
    x = torch.randn(1, 1, 32)
    with torch.inference_mode():
        want = model(x)
    weights = [p.clone() for p in model.parameters()]
    install_fast_linear(model)
    install_fast_linear(model)  # idempotent
    with torch.inference_mode(), kernel_calls() as kernel:
        got = model(x)
    assert kernel.call_count == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for before, after in zip(weights, model.parameters(), strict=True):
        assert torch.equal(before, after) and after.is_contiguous()
    model(x).sum().backward()  # with grad: F.linear, gradients as before
    assert model[0].weight.grad is not None


def test_the_engine_decodes_one_row_through_the_kernel(tiny_llama: LoadedModel) -> None:
    stack = UnitStack(tiny_llama.model)
    Engine(stack, ServerMetrics(stack.names), EngineConfig(), threads=1, start=False)
    cache = stack.new_cache(0, stack.n_units, grown_in_blocks=True)
    tokens = FAST_ROWS + 1
    prompt = StepRow(0, stack.n_units, torch.arange(1, tokens + 1)[None], 0, cache)
    # the model's own blocks and head (the fused ones: test_runtime_fused.py)
    with kernel_calls() as kernel, fast_paths(FastPaths(fused=False)):
        run_step(stack, [prompt])
        assert kernel.call_count == 1  # the prompt's blocks by MKL; the head's one row
        run_step(stack, [StepRow(0, stack.n_units, torch.tensor([[7]]), tokens, cache)])
    linear = sum(type(m) is nn.Linear for m in stack.model.modules())
    assert kernel.call_count == 1 + linear


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="this torch has no oneDNN")


@needs_onednn
def test_packed_weights_serve_steps_of_many_rows_and_only_those() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8, bias=False))
    install_fast_linear(model)
    assert pack_weights(model) == (64 * 32 + 8 * 64) * 4
    many, few = torch.randn(3, FAST_ROWS, 32), torch.randn(1, FAST_ROWS, 32)
    with torch.no_grad():
        want = [F.linear(F.relu(F.linear(x, model[0].weight, model[0].bias)), model[2].weight)
                for x in (many, few)]
    packed = mock.patch.object(gemv, "packed_product", wraps=gemv.packed_product)
    with torch.inference_mode(), packed as calls:
        got_many = model(many)  # 18 rows: both layers packed
        assert calls.call_count == 2
        got_few = model(few)  # FAST_ROWS rows: the few-row kernel
        assert calls.call_count == 2
        with fast_paths(FastPaths(packed=False)):
            model(many)
        assert calls.call_count == 2
    torch.testing.assert_close(got_many, want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_few, want[1], rtol=1e-4, atol=1e-5)
    with packed as calls:  # with autograd: F.linear
        model(many).sum().backward()
    calls.assert_not_called()


@needs_onednn
def test_a_moved_weight_drops_its_packed_copy() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    install_fast_linear(layer)
    pack_weights(layer)
    with torch.no_grad():
        layer.weight.data = layer.weight.data.clone() * 2  # new storage: the copy is stale
    x = torch.randn(FAST_ROWS + 1, 16)
    with torch.inference_mode(), mock.patch.object(gemv, "packed_product") as calls:
        got = layer(x)
    calls.assert_not_called()
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_the_engine_runs_a_prompt_through_the_packed_weights(tiny_llama: LoadedModel) -> None:
    stack = UnitStack(tiny_llama.model)
    engine = Engine(stack, ServerMetrics(stack.names), EngineConfig(), threads=1, start=False)
    blocks = sum(type(m) is nn.Linear for layer in stack.layers for m in layer.modules())
    assert engine.packed_bytes > 0
    tokens = FAST_ROWS + 1
    prompt = StepRow(0, stack.n_units, torch.arange(1, tokens + 1)[None], 0,
                     stack.new_cache(0, stack.n_units))
    with mock.patch.object(gemv, "packed_product", wraps=gemv.packed_product) as calls:
        run_step(stack, [prompt])
    assert calls.call_count == blocks  # every block product; the head reads its one row
