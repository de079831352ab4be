"""One thread's memory read bandwidth, by several witnesses (the physical limit of a decode step).

The limit of one session's decode is the weights' bytes over what one thread can read. One
measurement of it is noisy on a shared machine and depends on how the memory is mapped, so each
witness here is the best of several rounds, and the limit takes the best witness:

- a sum of a large tensor in ordinary (4 KiB-page) memory, and the same in huge pages;
- the compiled matrix-vector kernel (runtime/gemv.py) over every weight matrix of the model as
  its memory lies now: what a decode step's linear layers can read, nothing else.

The best of a few short runs is a burst: a witness repeated back to back for a second or two can
read less (`Witness.sustained_bytes_per_s`, the median of such a run), and a decode streams the
weights for that long.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from splitllm.runtime.fused_kernel import linear_rows
from splitllm.runtime.hugepages import huge_page_array

SUM_BYTES = 2**29


def run_seconds(run: Callable[[], object], *, rounds: int = 1, min_s: float = 0.0,
                ) -> list[float]:
    """Seconds of each of back-to-back runs after one warm-up run: at least `rounds` of them,
    and on until `min_s` seconds have passed."""
    run()
    seconds: list[float] = []
    begin = time.perf_counter()
    while len(seconds) < rounds or time.perf_counter() - begin < min_s:
        clock = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - clock)
    return seconds


@dataclass(frozen=True)
class Witness:
    """A run that reads `nbytes` once (on one thread)."""

    run: Callable[[], object]
    nbytes: int

    def best_bytes_per_s(self, rounds: int) -> float:
        """nbytes over the fastest of `rounds` runs: the burst the memory can give."""
        return self.nbytes / min(run_seconds(self.run, rounds=rounds))

    def sustained_bytes_per_s(self, duration_s: float) -> float:
        """nbytes over the median run of back-to-back runs lasting `duration_s`: what the memory
        gives for as long as a decode streams."""
        return self.nbytes / statistics.median(run_seconds(self.run, min_s=duration_s))


def sum_buffers() -> dict[str, torch.Tensor]:
    """Two large fp32 tensors of ones, in 4 KiB pages and in huge pages (allocated once: the
    benchmark re-measures with them between its runs)."""
    small = torch.ones(SUM_BYTES // 4, dtype=torch.float32)
    huge = torch.from_numpy(huge_page_array(SUM_BYTES).view(np.float32))
    huge.fill_(1.0)
    return {"tensor sum, 4 KiB pages": small, "tensor sum, huge pages": huge}


def tensor_sum(data: torch.Tensor) -> Witness:
    """The tensor summed by torch on one thread."""
    return Witness(data.sum, data.numel() * 4)


def weights_matvec(model: nn.Module) -> Witness:
    """Every fp32 weight matrix of the model (as its memory lies now) times one row by the
    compiled kernel."""
    matrices = {p.data_ptr(): p.detach().numpy() for p in model.parameters()
                if p.dim() == 2 and p.dtype == torch.float32 and p.is_contiguous()}
    rows = {m.shape[1]: np.ones((1, m.shape[1]), dtype=np.float32) for m in matrices.values()}
    outs = [np.empty((1, m.shape[0]), dtype=np.float32) for m in matrices.values()]

    def sweep() -> None:
        for matrix, out in zip(matrices.values(), outs, strict=True):
            linear_rows(matrix, rows[matrix.shape[1]], out)

    return Witness(sweep, sum(m.nbytes for m in matrices.values()))


def read_bandwidth(model: nn.Module, rounds: int = 5) -> dict[str, float]:
    """One thread's read bandwidth by each witness, the best of `rounds`, bytes/s (call with
    one torch thread)."""
    witnesses = {name: tensor_sum(data) for name, data in sum_buffers().items()}
    witnesses["matvec kernel over the weights"] = weights_matvec(model)
    return {name: witness.best_bytes_per_s(rounds) for name, witness in witnesses.items()}
