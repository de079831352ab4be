"""The compiled decode of one row through a run of Llama-style blocks (runtime/fused.py).

`run_blocks` is ONE numba call for blocks [first, stop): per block, norm -> q/k/v -> rotary ->
K/V written at the held length of the session's buffers -> attention over the held positions ->
o-proj + residual -> norm -> gate/up -> SiLU*mul -> down + residual, all in fp32 on one thread,
the row's hidden state updated in place. Every block's weights come as typed lists (index =
block), the session's K/V buffers likewise (index = block - kv_first), so a step of one session
crosses from Python into compiled code once per segment rather than ~40 times per block.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.typed import List

_KERNEL = numba.njit(fastmath=True, nogil=True, cache=True, boundscheck=False)
_PART = numba.njit(fastmath=True, nogil=True, cache=True, boundscheck=False, inline="always")
NONE = np.zeros(0, dtype=np.float32)  # an absent bias
NO_MATRIX = np.zeros((0, 0), dtype=np.float32)  # a block the fused path does not run
NO_KV = np.zeros((0, 0, 0), dtype=np.float32)  # a cache layer it does not write
MATRICES = ("q", "k", "v", "o", "gate", "up", "down")
VECTORS = ("norm_in", "norm_post", "q_bias", "k_bias", "v_bias", "o_bias", "gate_bias",
           "up_bias", "down_bias")
SCALARS = ("eps_in", "eps_post", "scaling")


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now rather than in a step."""
    square, vector = np.eye(2, dtype=np.float32), np.ones(2, dtype=np.float32)
    matrices = {name: List([square]) for name in MATRICES}
    vectors = {name: List([vector if name.startswith("norm") else NONE]) for name in VECTORS}
    scalars = {name: np.ones(1) for name in SCALARS}
    kv = np.zeros((1, 1, 2), dtype=np.float32)
    run_blocks(vector.copy(), 0, 1, 0, **matrices, **vectors, **scalars, cos=vector, sin=vector,
               keys=List([kv]), values=List([kv.copy()]), lengths=np.zeros(1, dtype=np.int64))


@_KERNEL
def run_blocks(x: np.ndarray, first: int, stop: int, kv_first: int, q: List, k: List, v: List,
               o: List, gate: List, up: List, down: List, norm_in: List, norm_post: List,
               q_bias: List, k_bias: List, v_bias: List, o_bias: List, gate_bias: List,
               up_bias: List, down_bias: List, eps_in: np.ndarray, eps_post: np.ndarray,
               scaling: np.ndarray, cos: np.ndarray, sin: np.ndarray, keys: List, values: List,
               lengths: np.ndarray) -> None:  # pragma: no cover
    """x [D] through blocks [first, stop) in place; block b's K/V written at lengths[b - first]
    of keys/values[b - kv_first] [Hkv, capacity, d]."""
    for b in range(first, stop):
        at = b - kv_first
        _block(x, norm_in[b], norm_post[b], eps_in[b], eps_post[b], q[b], k[b], v[b], o[b],
               q_bias[b], k_bias[b], v_bias[b], o_bias[b], gate[b], up[b], down[b],
               gate_bias[b], up_bias[b], down_bias[b], cos, sin, keys[at], values[at],
               lengths[b - first], scaling[b])


@_PART
def _linear(weight: np.ndarray, bias: np.ndarray, x: np.ndarray,
            out: np.ndarray) -> None:  # pragma: no cover
    """out = weight @ x (+ bias): each weight row read once."""
    for o in range(weight.shape[0]):
        acc = np.float32(0.0)
        for i in range(weight.shape[1]):
            acc += weight[o, i] * x[i]
        out[o] = acc + bias[o] if bias.shape[0] else acc


@_PART
def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float,
              out: np.ndarray) -> None:  # pragma: no cover
    """out = weight * x / sqrt(mean(x^2) + eps), as the model's RMSNorm in fp32."""
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        total += x[i] * x[i]
    scale = np.float32(1.0 / np.sqrt(total / x.shape[0] + eps))
    for i in range(x.shape[0]):
        out[i] = weight[i] * (x[i] * scale)


@_PART
def _rotate(x: np.ndarray, heads: int, cos: np.ndarray, sin: np.ndarray,
            ) -> None:  # pragma: no cover
    """x [heads * d] in place: x * cos + rotate_half(x) * sin, per head (the Llama convention)."""
    d = cos.shape[0]
    half = d // 2
    for h in range(heads):
        base = h * d
        for i in range(half):
            a, b = x[base + i], x[base + half + i]
            x[base + i] = a * cos[i] - b * sin[i]
            x[base + half + i] = b * cos[half + i] + a * sin[half + i]


@_PART
def _attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, held: int, scaling: float,
            out: np.ndarray) -> None:  # pragma: no cover
    """out [H * d] = softmax(q k^T * scaling) v per head over the `held` positions (GQA)."""
    kv_heads, _, d = keys.shape
    groups = q.shape[0] // d // kv_heads
    scores = np.empty(held, dtype=np.float32)
    for h in range(q.shape[0] // d):
        kv, base = h // groups, h * d
        top = np.float32(-np.inf)
        for t in range(held):
            acc = np.float32(0.0)
            for i in range(d):
                acc += q[base + i] * keys[kv, t, i]
            scores[t] = acc * scaling
            top = max(top, scores[t])
        total = np.float32(0.0)
        for t in range(held):
            scores[t] = np.exp(scores[t] - top)
            total += scores[t]
        for i in range(d):
            out[base + i] = 0.0
        for t in range(held):
            weight = scores[t] / total
            for i in range(d):
                out[base + i] += weight * values[kv, t, i]


@_PART
def _block(x: np.ndarray, norm_in: np.ndarray, norm_post: np.ndarray, eps_in: float,
           eps_post: float, wq: np.ndarray, wk: np.ndarray, wv: np.ndarray, wo: np.ndarray,
           bq: np.ndarray, bk: np.ndarray, bv: np.ndarray, bo: np.ndarray, w_gate: np.ndarray,
           w_up: np.ndarray, w_down: np.ndarray, b_gate: np.ndarray, b_up: np.ndarray,
           b_down: np.ndarray, cos: np.ndarray, sin: np.ndarray, keys: np.ndarray,
           values: np.ndarray, length: int, scaling: float) -> None:  # pragma: no cover
    """x [D] through one block in place; its K/V written at `length` of keys/values [Hkv, L, d]."""
    kv_heads, _, d = keys.shape
    normed = np.empty(x.shape[0], dtype=np.float32)
    _rms_norm(x, norm_in, eps_in, normed)
    q = np.empty(wq.shape[0], dtype=np.float32)
    k = np.empty(wk.shape[0], dtype=np.float32)
    _linear(wq, bq, normed, q)
    _linear(wk, bk, normed, k)
    _rotate(q, wq.shape[0] // d, cos, sin)
    _rotate(k, kv_heads, cos, sin)
    v = np.empty(wv.shape[0], dtype=np.float32)
    _linear(wv, bv, normed, v)
    for h in range(kv_heads):
        for i in range(d):
            keys[h, length, i] = k[h * d + i]
            values[h, length, i] = v[h * d + i]
    attended = np.empty(wq.shape[0], dtype=np.float32)
    _attend(q, keys, values, length + 1, scaling, attended)
    out = np.empty(x.shape[0], dtype=np.float32)
    _linear(wo, bo, attended, out)
    for i in range(x.shape[0]):
        x[i] += out[i]
    _rms_norm(x, norm_post, eps_post, normed)
    gate = np.empty(w_gate.shape[0], dtype=np.float32)
    up = np.empty(w_up.shape[0], dtype=np.float32)
    _linear(w_gate, b_gate, normed, gate)
    _linear(w_up, b_up, normed, up)
    for i in range(gate.shape[0]):
        gate[i] = gate[i] / (np.float32(1.0) + np.exp(-gate[i])) * up[i]
    _linear(w_down, b_down, gate, out)
    for i in range(x.shape[0]):
        x[i] += out[i]
