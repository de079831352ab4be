"""The compiled decode of a few rows through a run of Llama-style blocks (runtime/fused.py).

`run_blocks` is ONE numba call for blocks [first, stop) over a few rows (a position each: one of
each of a few sessions, or a session's consecutive positions, e.g. a speculative verification's
k + 1): per block, norm -> q/k/v -> rotary -> K/V written at the held length of
each session's buffers -> attention over each session's held positions -> o-proj + residual ->
norm -> gate/up -> SiLU*mul -> down + residual, all in fp32 on one thread, the rows' hidden
states updated in place and every weight read once for all rows. Every block's weights come as
typed lists (index = block), each session's K/V buffers likewise (index = block - its first
block), so a step crosses from Python into compiled code once per segment rather than ~40 times
per block.
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
MATRICES = ("q", "k", "v", "o", "gate", "up", "down")  # a block's, in run_blocks' order
VECTORS = ("norm_in", "norm_post", "q_bias", "k_bias", "v_bias", "o_bias", "gate_bias",
           "up_bias", "down_bias")
SCALARS = ("eps_in", "eps_post", "scaling")


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now rather than in a step."""
    square, vector = np.eye(2, dtype=np.float32), np.ones(2, dtype=np.float32)
    matrices = List([square] * len(MATRICES))
    vectors = List([vector if name.startswith("norm") else NONE for name in VECTORS])
    kv = List([np.zeros((1, 1, 2), dtype=np.float32)])
    rows = vector[None].copy()  # [1, 2]
    run_blocks(rows, 0, 1, np.zeros(1, dtype=np.int64), matrices=matrices, vectors=vectors,
               scalars=np.ones((1, len(SCALARS))), cos=rows, sin=rows, keys=List([kv]),
               values=List([kv]), lengths=np.zeros((1, 1), dtype=np.int64),
               active=np.ones(1, dtype=np.bool_))
    norm_rows(rows, vector, 1.0, rows.copy())
    head_rows(rows, vector, 1.0, square, rows.copy(), np.zeros(1, dtype=np.int64))
    linear_rows(square, rows, rows.copy())
    attend_rows(rows.copy(), rows.copy(), rows.copy(), np.zeros(1, dtype=np.int64), rows, rows,
                List([kv]), List([kv]), np.zeros(1, dtype=np.int64), 1.0,
                np.ones(1, dtype=np.bool_), rows.copy())


@_KERNEL
def run_blocks(x: np.ndarray, first: int, stop: int, kv_first: np.ndarray, matrices: List,
               vectors: List, scalars: np.ndarray, cos: np.ndarray, sin: np.ndarray, keys: List,
               values: List, lengths: np.ndarray, active: np.ndarray) -> None:  # pragma: no cover
    """Rows x [R, D] (a position each) through blocks [first, stop) in place: every weight
    read once for all rows. Block b's matrices [out, in] are matrices[b * 7 + m] (in MATRICES'
    order), its vectors vectors[b * 9 + v] (VECTORS'; an absent bias empty), its scalars
    scalars[b] (SCALARS'): four typed lists in all, as numba's dispatcher types each typed list
    in Python (~7 us each here after the weights streamed through the CPU's caches). Row r's
    K/V for block b are written at lengths[r, b - first] of keys/values[r][b - kv_first[r]]
    [Hkv, capacity, d], and it attends over the positions before and at it; a session's rows
    in order at consecutive lengths are causal attention over its new positions. A row not
    `active` (its error already known) writes and attends nothing. Every row's lengths end one
    on, past the position it wrote (the decode lane's next step writes there: no call of its
    own, ~50 us here)."""
    rows, width = x.shape
    normed = np.empty((rows, width), dtype=np.float32)
    out = np.empty((rows, width), dtype=np.float32)
    for b in range(first, stop):
        mat, vec = b * len(MATRICES), b * len(VECTORS)  # the block's first matrix, vector
        eps_in, eps_post, scaling = scalars[b, 0], scalars[b, 1], scalars[b, 2]
        _norm_rows(x, vectors[vec], eps_in, normed)
        qs = np.empty((rows, matrices[mat].shape[0]), dtype=np.float32)
        ks = np.empty((rows, matrices[mat + 1].shape[0]), dtype=np.float32)
        vs = np.empty((rows, matrices[mat + 2].shape[0]), dtype=np.float32)
        _linear(matrices[mat], vectors[vec + 2], normed, qs)
        _linear(matrices[mat + 1], vectors[vec + 3], normed, ks)
        _linear(matrices[mat + 2], vectors[vec + 4], normed, vs)
        attended = np.zeros((rows, matrices[mat].shape[0]), dtype=np.float32)
        _attend_rows(qs, ks, vs, b - kv_first, cos, sin, keys, values, lengths[:, b - first],
                     scaling, active, attended)
        _linear(matrices[mat + 3], vectors[vec + 5], attended, out)
        x += out
        _norm_rows(x, vectors[vec + 1], eps_post, normed)
        gated = np.empty((rows, matrices[mat + 4].shape[0]), dtype=np.float32)
        _linear(matrices[mat + 4], vectors[vec + 6], normed, gated)
        _gate_up(matrices[mat + 5], vectors[vec + 7], normed, gated)
        _linear(matrices[mat + 6], vectors[vec + 8], gated, out)
        x += out
    for r in range(rows):
        for b in range(stop - first):
            lengths[r, b] += 1


@_KERNEL
def linear_rows(weight: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """out [R, out] = rows [R, in] @ weight.T: `_linear` as one call (runtime/gemv.py)."""
    _linear(weight, NONE, rows, out)


@_KERNEL
def head_rows(x: np.ndarray, norm: np.ndarray, eps: float, weight: np.ndarray,
              out: np.ndarray, greedy: np.ndarray) -> None:  # pragma: no cover
    """out [R, V] = RMSNorm(x [R, D]) @ weight.T: the final norm and the LM head in one call;
    greedy [R] each row's argmax of out (np.argmax's after the call costs ~80 us here, its code
    no longer in the CPU's caches once the weights streamed through them)."""
    normed = np.empty_like(x)
    _norm_rows(x, norm, eps, normed)
    _linear(weight, NONE, normed, out)
    _argmax_rows(out, greedy)


@_PART
def _argmax_rows(logits: np.ndarray, greedy: np.ndarray) -> None:  # pragma: no cover
    """greedy[r] = np.argmax(logits[r]): the first of tied maxima, the first NaN if any. On the
    floats' bits as integers, ordered as the floats (-0 as +0), since fastmath's no-NaN rule
    (the caller's, inherited even where this is compiled without it) removes a float NaN test;
    the max and whether there is a NaN in one branch-free pass (vectorised), then the first
    place of either."""
    for r in range(logits.shape[0]):
        bits = logits[r].view(np.int32)
        top, nan = np.int32(-(2 ** 31)), False
        for o in range(bits.shape[0]):
            top = max(top, _order(bits[o]))
            nan |= bits[o] & 0x7FFFFFFF > 0x7F800000
        best = 0
        while not (bits[best] & 0x7FFFFFFF > 0x7F800000 if nan else _order(bits[best]) == top):
            best += 1
        greedy[r] = best


@_PART
def _order(bits: np.int32) -> np.int32:  # pragma: no cover
    """An fp32's bits as an integer ordered as the float (not NaN), -0 as +0."""
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return np.int32(0) if key == -1 else np.int32(key)


@_KERNEL
def norm_rows(x: np.ndarray, weight: np.ndarray, eps: float,
              out: np.ndarray) -> None:  # pragma: no cover
    """out[r] = RMSNorm(x[r]) for every row (the many-row path's parts between products)."""
    _norm_rows(x, weight, eps, out)


@_KERNEL
def attend_rows(qs: np.ndarray, ks: np.ndarray, vs: np.ndarray, layer: np.ndarray,
                cos: np.ndarray, sin: np.ndarray, keys: List, values: List,
                lengths: np.ndarray, scaling: float, active: np.ndarray,
                out: np.ndarray) -> None:  # pragma: no cover
    """`_attend_rows` as one call."""
    _attend_rows(qs, ks, vs, layer, cos, sin, keys, values, lengths, scaling, active, out)


@_PART
def _norm_rows(x: np.ndarray, weight: np.ndarray, eps: float,
               out: np.ndarray) -> None:  # pragma: no cover
    for r in range(x.shape[0]):
        _rms_norm(x[r], weight, eps, out[r])


@_PART
def _attend_rows(qs: np.ndarray, ks: np.ndarray, vs: np.ndarray, layer: np.ndarray,
                 cos: np.ndarray, sin: np.ndarray, keys: List, values: List,
                 lengths: np.ndarray, scaling: float, active: np.ndarray,
                 out: np.ndarray) -> None:  # pragma: no cover
    """Per active row r, in order: rotate its q/k, write its K/V at lengths[r] of
    keys/values[r][layer[r]] [Hkv, capacity, d], and attend over positions [0, lengths[r]]
    into out[r] (those a session's earlier rows wrote included: causal)."""
    d = cos.shape[1]
    for r in range(qs.shape[0]):
        if not active[r]:
            continue
        _rotate(qs[r], qs.shape[1] // d, cos[r], sin[r])
        _rotate(ks[r], ks.shape[1] // d, cos[r], sin[r])
        held_k, held_v = keys[r][layer[r]], values[r][layer[r]]
        at = lengths[r]
        for h in range(held_k.shape[0]):
            for i in range(d):
                held_k[h, at, i] = ks[r, h * d + i]
                held_v[h, at, i] = vs[r, h * d + i]
        _attend(qs[r], held_k, held_v, at + 1, scaling, out[r])


@_PART
def _gate_up(up: np.ndarray, bias: np.ndarray, rows: np.ndarray,
             gated: np.ndarray) -> None:  # pragma: no cover
    """gated [R, out] = SiLU(gated) * (rows [R, in] @ up.T (+ bias)), each output as soon as its
    product is done: the exp runs while the weights stream on (in a pass of its own after the
    products it took ~0.14 ms per token of SmolLM2, the stream stalled meanwhile)."""
    for o in range(up.shape[0]):
        for r in range(rows.shape[0]):
            value, gate = _dot(up, bias, o, rows[r]), gated[r, o]
            gated[r, o] = gate / (np.float32(1.0) + np.exp(-gate)) * value


@_PART
def _linear(weight: np.ndarray, bias: np.ndarray, rows: np.ndarray,
            out: np.ndarray) -> None:  # pragma: no cover
    """out [R, out] = rows [R, in] @ weight.T (+ bias): each weight row read once for all rows.
    (Two weight rows at a time, one from each half, measured no faster: -10% at 2 rows, +10% at
    4, the same at 1 and 6. At one row over a 400 MB huge-page matrix of 576 columns, side by
    side with a tensor sum of it (0.74-0.85x of the sum's GB/s): a 1-d row hoisted out of the
    loop or each weight row as a 1-d slice the same (0.68-0.91x); four consecutive weight rows
    at a time 0.41x, 16 explicit partial sums 0.35x; software prefetch (llvm.prefetch, 2-8 KiB
    ahead, into L1 or L2) 0.51-0.75x, where the hardware's own reads 0.96x in that run.)"""
    for o in range(weight.shape[0]):
        for r in range(rows.shape[0]):
            out[r, o] = _dot(weight, bias, o, rows[r])


@_PART
def _dot(weight: np.ndarray, bias: np.ndarray, o: int,
         row: np.ndarray) -> np.float32:  # pragma: no cover
    """row [in] . weight[o] (+ bias[o])."""
    acc = np.float32(0.0)
    for i in range(weight.shape[1]):
        acc += weight[o, i] * row[i]
    return acc + bias[o] if bias.shape[0] else acc


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
    """out [H * d] = softmax(q k^T * scaling) v per head over the `held` positions (GQA). The
    common head dims as constants (LLVM then unrolls the loops over a key or value row)."""
    d = keys.shape[2]
    if d == 64:
        _attend_grouped(q, keys, values, held, scaling, out, 64)
    elif d == 128:
        _attend_grouped(q, keys, values, held, scaling, out, 128)
    else:
        _attend_grouped(q, keys, values, held, scaling, out, d)


@_PART
def _attend_grouped(q: np.ndarray, keys: np.ndarray, values: np.ndarray, held: int,
                    scaling: float, out: np.ndarray, d: int) -> None:  # pragma: no cover
    """`_attend` with the query heads that share a K/V head together: each position's key and
    value row read once for the group, not once per query head (at 1024 positions a layer's K/V
    leave the L2 cache). Each head's query, output and each position's key and value are 1-d
    slices: indexing the 3-d buffers inside the inner loops kept LLVM from vectorising them."""
    kv_heads = keys.shape[0]
    groups = q.shape[0] // d // kv_heads
    scores = np.empty((groups, held), dtype=np.float32)
    for kv in range(kv_heads):
        first = kv * groups
        for t in range(held):
            key = keys[kv, t]
            for g in range(groups):
                query = q[(first + g) * d:(first + g + 1) * d]
                acc = np.float32(0.0)
                for i in range(d):
                    acc += query[i] * key[i]
                scores[g, t] = acc * scaling
        for g in range(groups):
            row = scores[g]
            top = np.float32(-np.inf)
            for t in range(held):
                top = max(top, row[t])
            total = np.float32(0.0)
            for t in range(held):
                row[t] = np.exp(row[t] - top)
                total += row[t]
            for t in range(held):
                row[t] /= total
            out[(first + g) * d:(first + g + 1) * d] = 0.0
        for t in range(held):
            value = values[kv, t]
            for g in range(groups):
                weight, head_out = scores[g, t], out[(first + g) * d:(first + g + 1) * d]
                for i in range(d):
                    head_out[i] += weight * value[i]
