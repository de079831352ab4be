"""Linear layers at few rows at the speed of memory: a compiled matrix-vector product.

A decode step of one session multiplies one row by every weight matrix: the step is bound by
reading the weights. MKL's fp32 GEMM at one row reads SmolLM2's block weights at ~11 GB/s on
this AMD EPYC (the LM head at ~10 GB/s), about half of what one thread can read; dot products
compiled by numba (`fused_kernel.linear_rows`, the fused decode's own products) read them at
~27-32 GB/s in huge pages. `install_fast_linear` routes a model's `nn.Linear` layers through
them where they win (fp32 on the CPU, one intra-op thread, at most `FAST_ROWS` rows).

Steps of more rows are compute-bound, and there MKL's fp32 GEMM on this AMD EPYC stays at
~45 GFLOP/s at 16 rows of SmolLM2's shapes: oneDNN on weights reordered once into its blocked
layout (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU freezing uses) reaches
~77 (a step's products 56 vs 97 ms at 16 rows). `pack_weights` keeps that second copy of each
weight (the model's own stays for the few-row kernel and everything else); without it, or where
oneDNN is absent, the rest goes to `F.linear`. Results differ from MKL's only by the rounding
of a reordered fp32 sum; the model's weights, their layout and its structure are untouched, so
clients sharing the model object see the same model.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from splitllm.runtime.fused_kernel import linear_rows

FAST_ROWS = 6  # rows up to which the kernel beats MKL here (memory-bound: 6 rows cost ~1.1x what 1
# does, half of MKL; even at 8): one session, a few together, a speculative pass of k <= 5 drafts
_FLAG = "_splitllm_fast_linear"
_ARRAY = "_splitllm_weight_array"
_PACKED = "_splitllm_packed_weight"
PACK_ROWS_HINT = 16  # the row count oneDNN lays the packed weights out for (any count works)


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths run (benchmarks and tests switch them to compare with the model's own):
    the fused decode blocks (runtime/fused.py), the few-row kernel up to `kernel_rows` rows (0:
    MKL), the packed weights of many rows, the decode lane of fused steps (runtime/lane.py)."""

    fused: bool = True
    kernel_rows: int = FAST_ROWS
    packed: bool = True
    lane: bool = True


_paths = FastPaths()


def fast_paths_now() -> FastPaths:
    """The fast paths in force."""
    return _paths


@contextlib.contextmanager
def fast_paths(paths: FastPaths) -> Iterator[None]:
    """These fast paths inside the block, e.g. `fast_paths(FastPaths(fused=False))`."""
    global _paths
    before, _paths = _paths, paths
    try:
        yield
    finally:
        _paths = before


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                weight_array: np.ndarray | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), by the compiled kernel where it is faster (weight_array: the
    weight's numpy view, where the caller keeps one)."""
    features = weight.shape[-1]
    rows = x.numel() // features if x.dim() and x.shape[-1] == features > 0 else 0
    if not _fits(x, weight, rows):  # F.linear: other cases, and wrong shapes' errors
        return F.linear(x, weight, bias)
    if weight_array is None:
        weight_array = weight.detach().numpy()
    flat = np.ascontiguousarray(x.detach().numpy().reshape(rows, features))  # [R, in]
    out = np.empty((*x.shape[:-1], weight.shape[0]), dtype=np.float32)  # [..., out]
    linear_rows(weight_array, flat, out.reshape(rows, weight.shape[0]))
    result = torch.from_numpy(out)
    if bias is not None:
        result += bias
    return result


def _fits(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    return (0 < rows <= _paths.kernel_rows and torch.get_num_threads() == 1
            and not torch.is_grad_enabled() and x.dtype == weight.dtype == torch.float32
            and x.is_cpu and weight.is_cpu and weight.is_contiguous())


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    packed = packed_weight(self)  # the oneDNN copy, while the weight's storage stays
    if packed is not None and _packed_fits(x, weight):
        return packed_product(x, packed, self.bias, weight.shape[0])
    held = self.__dict__.get(_ARRAY)  # the weight's numpy view, while its storage stays
    if held is None or held[0] != weight.data_ptr():
        held = (weight.data_ptr(), weight.detach().numpy()) if weight.is_cpu and \
            weight.dtype == torch.float32 else (weight.data_ptr(), None)
        self.__dict__[_ARRAY] = held
    return fast_linear(x, weight, self.bias, held[1])


def packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                   out_features: int) -> torch.Tensor:
    """x [..., in] @ the packed weight (+ bias) by oneDNN: [..., out_features]."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out_features)


def _packed_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Rows beyond the few-row kernel's, fp32 on the CPU, no autograd, the weight's width."""
    return (x.dim() >= 2 and x.shape[-1] == weight.shape[-1]
            and x.numel() // max(x.shape[-1], 1) > _paths.kernel_rows and x.dtype == torch.float32
            and x.is_cpu and not torch.is_grad_enabled())


def pack_weights(model: nn.Module) -> int:
    """Keep a oneDNN-packed copy of each fp32 CPU Linear weight of the model for steps of many
    rows (call after the weights have moved for good: a moved weight drops its copy); returns
    the copies' bytes (0 where this torch has no oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    total = 0
    for layer in model.modules():
        weight = getattr(layer, "weight", None)
        if getattr(layer, _FLAG, False) and weight is not None and weight.is_cpu \
                and weight.dtype == torch.float32:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
            layer.__dict__[_PACKED] = (weight.data_ptr(), packed)
            total += weight.numel() * weight.element_size()
    return total


def packed_weight(layer: nn.Module) -> torch.Tensor | None:
    """The layer's packed weight if it has a current one and packing is on, else None."""
    packed = layer.__dict__.get(_PACKED)
    weight = getattr(layer, "weight", None)
    if not _paths.packed or packed is None or weight is None or \
            packed[0] != weight.data_ptr():
        return None
    return packed[1]




def install_fast_linear(model: nn.Module) -> None:
    """Route every `nn.Linear` of the model through fast_linear (idempotent)."""
    for layer in model.modules():
        if type(layer) is nn.Linear and not getattr(layer, _FLAG, False):
            layer.forward = types.MethodType(_forward, layer)  # type: ignore[method-assign]
            setattr(layer, _FLAG, True)

