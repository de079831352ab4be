"""One thread's memory read bandwidth, by several witnesses (the physical limit of a decode step).

The limit of one session's decode is the weights' bytes over what one thread can read. One
measurement of it is noisy on a shared machine and depends on how the memory is mapped, so each
witness here is the best of several rounds, and the limit takes the best witness:

- a sum of a large tensor in ordinary (4 KiB-page) memory, and the same in huge pages;
- the compiled matrix-vector kernel (runtime/gemv.py) over every weight matrix of the model as
  its memory lies now: what a decode step's linear layers can read, nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from splitllm.runtime.fused_kernel import linear_rows
from splitllm.runtime.hugepages import huge_page_array

SUM_BYTES = 2**29


def best_bytes_per_s(run: Callable[[], object], nbytes: int, rounds: int) -> float:
    """nbytes over the fastest of `rounds` runs (after one warm-up run)."""
    run()
    best = float("inf")
    for _ in range(rounds):
        clock = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - clock)
    return nbytes / best


def sum_buffers() -> dict[str, torch.Tensor]:
    """Two large fp32 tensors of ones, in 4 KiB pages and in huge pages (allocated once: the
    benchmark re-measures with them between its runs)."""
    small = torch.ones(SUM_BYTES // 4, dtype=torch.float32)
    huge = torch.from_numpy(huge_page_array(SUM_BYTES).view(np.float32))
    huge.fill_(1.0)
    return {"tensor sum, 4 KiB pages": small, "tensor sum, huge pages": huge}


def tensor_sum(data: torch.Tensor, rounds: int) -> float:
    """The tensor summed by torch on one thread, bytes/s."""
    return best_bytes_per_s(data.sum, data.numel() * 4, rounds)


def weights_matvec(model: nn.Module, rounds: int) -> float:
    """Every fp32 weight matrix of the model times one row by the compiled kernel, bytes/s."""
    matrices = {p.data_ptr(): p.detach().numpy() for p in model.parameters()
                if p.dim() == 2 and p.dtype == torch.float32 and p.is_contiguous()}
    rows = {m.shape[1]: np.ones((1, m.shape[1]), dtype=np.float32) for m in matrices.values()}
    outs = [np.empty((1, m.shape[0]), dtype=np.float32) for m in matrices.values()]

    def sweep() -> None:
        for matrix, out in zip(matrices.values(), outs, strict=True):
            linear_rows(matrix, rows[matrix.shape[1]], out)

    return best_bytes_per_s(sweep, sum(m.nbytes for m in matrices.values()), rounds)


def read_bandwidth(model: nn.Module, rounds: int = 5) -> dict[str, float]:
    """One thread's read bandwidth by each witness, bytes/s (call with one torch thread)."""
    witnesses = {name: tensor_sum(data, rounds) for name, data in sum_buffers().items()}
    return {**witnesses, "matvec kernel over the weights": weights_matvec(model, rounds)}
