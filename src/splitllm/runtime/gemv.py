"""Linear layers at few rows at the speed of memory: a compiled matrix-vector product.

A decode step of one session multiplies one row by every weight matrix: the step is bound by
reading the weights. MKL's fp32 GEMM at one row reads SmolLM2's block weights at ~11 GB/s on
this AMD EPYC (the LM head at ~10 GB/s), about half of what one thread can read; a plain dot
product per output, compiled by numba (vectorised with fastmath), reads them at ~18 GB/s.
`install_fast_linear` routes a model's `nn.Linear` layers through it where it wins (fp32 on the
CPU, one intra-op thread, at most `FAST_ROWS` rows) and leaves every other call to
`F.linear`. Results differ from MKL's only by the rounding of a reordered fp32 sum; weights,
their layout and the model's structure are untouched, so clients sharing the model object see
the same model.
"""

from __future__ import annotations

import types
from typing import Any

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FAST_ROWS = 4  # rows up to which the kernel beats MKL here (memory-bound: 4 rows cost what 1 does)
_FLAG = "_splitllm_fast_linear"


@numba.njit(fastmath=True, nogil=True, cache=True, boundscheck=False)
def _matvec(weight: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """out[r, o] = dot(weight[o], rows[r]): each weight row is read once for all rows."""
    for o in range(weight.shape[0]):
        for r in range(rows.shape[0]):
            acc = np.float32(0.0)
            for i in range(weight.shape[1]):
                acc += weight[o, i] * rows[r, i]
            out[r, o] = acc


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), by the compiled kernel where it is faster."""
    features = weight.shape[-1]
    rows = x.numel() // features if features else 0
    if not _fits(x, weight, rows):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, features).contiguous()  # [R, in]
    out = torch.empty(rows, weight.shape[0], dtype=x.dtype)  # [R, out]
    _matvec(weight.detach().numpy(), flat.detach().numpy(), out.numpy())
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


def _fits(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    return (0 < rows <= FAST_ROWS and x.dtype == weight.dtype == torch.float32
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and weight.is_contiguous() and not torch.is_grad_enabled()
            and torch.get_num_threads() == 1)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return fast_linear(x, self.weight, self.bias)


def install_fast_linear(model: nn.Module) -> None:
    """Route every `nn.Linear` of the model through fast_linear (idempotent)."""
    for layer in model.modules():
        if type(layer) is nn.Linear and not getattr(layer, _FLAG, False):
            layer.forward = types.MethodType(_forward, layer)  # type: ignore[method-assign]
            setattr(layer, _FLAG, True)


def warm_up() -> Any:
    """Compile (or load from numba's cache) the kernel now rather than in the first step."""
    weight = np.zeros((2, 2), dtype=np.float32)
    _matvec(weight, weight, np.empty((2, 2), dtype=np.float32))
