"""How fast the decode kernel's matrix-vector products stream SmolLM2's weights, against a sum.

One session's decode reads every weight once, so its limit is the weights' bytes over what one
thread reads. This puts the kernel's products (`fused_kernel.linear_rows`: a dot product per
weight row, each row read once) beside plain reads of the same bytes, all in one compiled call
over SmolLM2's block and head matrices in one huge-page arena, in the order a decode step
reads them, alternating, each the median of back-to-back runs over `--seconds`
(`bandwidth.Witness.sustained_bytes_per_s`):

- `tensor sum`: torch's sum of a tensor of as many bytes (the bandwidth witness);
- `sum of the weights`: a compiled sum of every weight, matrix after matrix (loads only);
- `row sums`: each weight row's sum (the kernel's per-row reduction, no vector);
- `kernel`: the kernel's products with one row;
- `two rows at a time`: each pass reads weight rows o and o + 1 (two interleaved streams);
- with `--c` (needs gcc and AVX-512): `C rows`, the kernel's loop in C with AVX-512 intrinsics
  (`benchmarks/matvec_layouts.c`), and `C packed by 4`, the same product over the weights
  packed so that four rows' 16-float pieces lie interleaved (one stream; a load of the vector
  serves four rows), the layout a faster kernel would read.

    .venv/bin/python benchmarks/matvec_stream.py [--rounds 4] [--seconds 1] [--c]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
import torch
from numba.typed import List

from bandwidth import Witness
from splitllm.runtime.fused_kernel import linear_rows
from splitllm.runtime.hugepages import huge_page_array

_JIT = numba.njit(fastmath=True, nogil=True, boundscheck=False)
HIDDEN, KV, MLP, VOCAB, BLOCKS = 576, 192, 1536, 49152, 30  # SmolLM2-135M
BLOCK_SHAPES = ((HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN),
                (MLP, HIDDEN), (HIDDEN, MLP))  # q, k, v, o, gate, up, down: [out, in]


def smollm2_matrices() -> List:
    """SmolLM2's block matrices and its head, one arena in huge pages, cache-line aligned."""
    shapes = [*BLOCK_SHAPES * BLOCKS, (VOCAB, HIDDEN)]
    arena = huge_page_array(sum(a * b * 4 for a, b in shapes) + 64 * len(shapes))
    floats = arena.view(np.float32)
    floats[:] = 0.01
    matrices, offset = List(), 0
    for rows, cols in shapes:
        matrices.append(floats[offset:offset + rows * cols].reshape(rows, cols))
        offset += rows * cols + 16
    return matrices


@_JIT
def kernel(matrices: List, xs: List, outs: List) -> None:  # pragma: no cover
    for m in range(len(matrices)):
        linear_rows(matrices[m], xs[m], outs[m])


@_JIT
def weights_sum(matrices: List, xs: List, outs: List) -> None:  # pragma: no cover
    for m in range(len(matrices)):
        flat, acc = matrices[m].reshape(-1), np.float32(0.0)
        for i in range(flat.shape[0]):
            acc += flat[i]
        outs[m][0, 0] = acc


@_JIT
def row_sums(matrices: List, xs: List, outs: List) -> None:  # pragma: no cover
    for m in range(len(matrices)):
        weight, out = matrices[m], outs[m]
        for o in range(weight.shape[0]):
            acc = np.float32(0.0)
            for i in range(weight.shape[1]):
                acc += weight[o, i]
            out[0, o] = acc


@_JIT
def two_rows(matrices: List, xs: List, outs: List) -> None:  # pragma: no cover
    for m in range(len(matrices)):
        weight, x, out = matrices[m], xs[m][0], outs[m]
        for o in range(0, weight.shape[0], 2):
            first, second = weight[o], weight[o + 1]
            a, b = np.float32(0.0), np.float32(0.0)
            for i in range(weight.shape[1]):
                a += first[i] * x[i]
                b += second[i] * x[i]
            out[0, o], out[0, o + 1] = a, b


def c_runs(matrices: List, xs: List, outs: List) -> dict[str, Callable[[], object]]:
    """The C variants over the same matrices (the packed one over packed copies, each in huge
    pages of its own)."""
    library = Path(tempfile.mkdtemp()) / "matvec_layouts.so"
    subprocess.run(["gcc", "-O3", "-march=native", "-shared", "-fPIC", "-o", str(library),
                    str(Path(__file__).with_name("matvec_layouts.c"))], check=True)
    compiled = ctypes.CDLL(str(library))
    packed = []
    for matrix in matrices:
        rows, cols = matrix.shape
        copy = huge_page_array(matrix.nbytes).view(np.float32)
        copy[:] = matrix.reshape(rows // 4, 4, cols // 16, 16).transpose(0, 2, 1, 3).reshape(-1)
        packed.append(copy)

    def calls(function: Callable[..., object], weights: list[np.ndarray]) -> Callable[[], None]:
        args = [(ctypes.c_void_p(w.ctypes.data), ctypes.c_void_p(x.ctypes.data),
                 ctypes.c_void_p(out.ctypes.data), m.shape[0], m.shape[1])
                for w, m, x, out in zip(weights, matrices, xs, outs, strict=True)]

        def run() -> None:
            assert weights  # keeps the arrays the pointers point into alive
            for arguments in args:
                function(*arguments)
        return run

    return {"C rows": calls(compiled.rows, list(matrices)),
            "C packed by 4": calls(compiled.packed4, packed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--c", action="store_true", help="add the C variants (gcc, AVX-512)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    matrices = smollm2_matrices()
    nbytes = sum(m.nbytes for m in matrices)
    xs = List([np.ones((1, m.shape[1]), dtype=np.float32) for m in matrices])
    outs = List([np.empty((1, m.shape[0]), dtype=np.float32) for m in matrices])
    witness = torch.from_numpy(huge_page_array(nbytes).view(np.float32))
    witness.fill_(1.0)
    runs: dict[str, Callable[[], object]] = {
        "tensor sum": witness.sum,
        "sum of the weights": lambda: weights_sum(matrices, xs, outs),
        "row sums": lambda: row_sums(matrices, xs, outs),
        "kernel": lambda: kernel(matrices, xs, outs),
        "two rows at a time": lambda: two_rows(matrices, xs, outs)}
    if args.c:
        runs.update(c_runs(matrices, xs, outs))
    rates: dict[str, list[float]] = {name: [] for name in runs}
    print(f"{nbytes / 1e6:.0f} MB of SmolLM2's matrices in huge pages, one thread, "
          f"load average {os.getloadavg()[0]:.1f}; GB/s, each the median of {args.seconds:g} s")
    for round_index in range(args.rounds):
        for name, run in runs.items():
            rates[name].append(Witness(run, nbytes).sustained_bytes_per_s(args.seconds) / 1e9)
        print(f"round {round_index + 1}: " + ", ".join(
            f"{name} {values[-1]:.1f}" for name, values in rates.items()), flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print("medians: " + ", ".join(
        f"{name} {rate:.1f} ({rate / medians['tensor sum']:.0%} of the tensor sum)"
        for name, rate in medians.items()) + f"; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
