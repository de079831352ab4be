"""One decode row through a Llama-style block in ONE compiled call (what gpt-fast compiles).

A decode step of one session is bound by reading the weights, yet through the model's own modules
a block costs ~40 small torch ops and Python calls (RMSNorm as 5 ops, rotary with cat/neg, the
packed-attention dispatcher, SDPA, the cache update, SiLU*mul, residual adds): on SmolLM2 a
third of the step. `decode_block` does the whole block for one single-position row in one numba
call: norm -> q/k/v -> rotary -> write K/V into the session's `BlockLayer` buffers -> attention
over the held positions -> o-proj + residual -> norm -> gate/up -> SiLU*mul -> down + residual.

The weights are the model's own tensors (numpy views, no copies); the rotary tables are the
model's own (`rotary_emb`, so any rope scaling applies); the cache ends holding exactly what the
model's path would write (rotated keys, values), so rollback, speculation and later prefill
chunks read it alike. It applies to fp32 on the CPU with one intra-op thread, to full-attention
blocks of the families in `FAMILIES` whose modules have the standard layout (checked per block);
every other block, row or setting keeps the model's own path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import torch
from torch import nn
from transformers.activations import SiLUActivation

from splitllm.runtime.families import FULL
from splitllm.runtime.kvcache import BlockLayer
from splitllm.runtime.units import SegmentCache, UnitStack

FAMILIES = ("llama", "mistral", "qwen2")  # RMSNorm, rotary, GQA, SiLU-gated MLP, optional biases
_WEIGHTS = "_splitllm_fused_weights"
_NONE = np.zeros(0, dtype=np.float32)  # an absent bias
_enabled = True  # what `fused_decode` switches (benchmarks compare both paths)


@dataclass(frozen=True)
class BlockWeights:
    """A block's parameters as numpy views of the model's own tensors ([out, in] matrices)."""

    norm_in: np.ndarray
    norm_post: np.ndarray
    eps_in: float
    eps_post: float
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    o: np.ndarray
    q_bias: np.ndarray
    k_bias: np.ndarray
    v_bias: np.ndarray
    o_bias: np.ndarray
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    gate_bias: np.ndarray
    up_bias: np.ndarray
    down_bias: np.ndarray
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    q_weight: torch.Tensor  # the model's q weight: moved elsewhere, the views are stale
    data_ptr: int  # where the q weight's storage was when the views were taken


@contextlib.contextmanager
def fused_decode(enabled: bool) -> Iterator[None]:
    """Use the fused path (or not) inside the block: to compare it with the model's own."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


class FusedRow:
    """One decode row of a step through the blocks the fused path covers: the rotary tables of
    its position (the model's own) and the blocks' layers, taken once per step."""

    def __init__(self, stack: UnitStack, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.stack = stack
        self.layers = list(stack.layers)
        self.cos, self.sin = cos.numpy().reshape(-1), sin.numpy().reshape(-1)  # [d] each

    @staticmethod
    def of(stack: UnitStack, hidden: torch.Tensor, positions: torch.Tensor) -> FusedRow | None:
        """The row of a step's packed rows [1, T, D], if the fused path applies: one fp32 CPU
        row, one intra-op thread, no autograd, one rotary table for every block."""
        if not (_enabled and hidden.shape[:2] == (1, 1) and hidden.dtype == torch.float32
                and hidden.is_cpu and torch.get_num_threads() == 1
                and not torch.is_grad_enabled()) or stack.rotary_emb is None \
                or stack.rotary_per_layer_type:
            return None
        cos, sin = stack.rotary_emb(hidden, positions)  # [1, 1, d] each
        return FusedRow(stack, cos.contiguous(), sin.contiguous())

    def run(self, block: int, hidden: torch.Tensor, cache: SegmentCache) -> bool:
        """Block `block` on the row's contiguous hidden state [1, 1, D] in place, if the fused
        path covers it (False: nothing done, the model's path runs it). Errors are the row's,
        raised before the cache holds anything new."""
        weights = block_weights(self.layers[block], self.stack.family)
        layer = cache.layers[block - cache.first_block]
        if weights is None or type(layer) is not BlockLayer or \
                self.stack.layer_types[block] != FULL or \
                self.stack.layer_windows[block] is not None:
            return False
        decode_block(weights, hidden.numpy().reshape(-1), self.cos, self.sin, layer)
        return True


def block_weights(layer: nn.Module, family: str) -> BlockWeights | None:
    """The block's weights if the fused path can run it, else None (kept on the layer while
    its weights stay where they are)."""
    held = layer.__dict__.get(_WEIGHTS)
    if held is not None and held.q_weight.data_ptr() == held.data_ptr:
        return held
    weights = _weights_of(layer, family)
    if weights is not None:
        layer.__dict__[_WEIGHTS] = weights
    return weights


def _weights_of(layer: nn.Module, family: str) -> BlockWeights | None:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if family not in FAMILIES or attn is None or mlp is None or any(
            getattr(attn, n, None) is None for n in ("scaling", "head_dim", *names)):
        return None
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm") or not isinstance(
            getattr(mlp, "act_fn", None), (SiLUActivation, nn.SiLU)):
        return None
    linears = [getattr(attn, n) for n in names] + [
        getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    norms: list[Any] = [getattr(layer, n, None)
                        for n in ("input_layernorm", "post_attention_layernorm")]
    if not all(type(x) is nn.Linear for x in linears) or not all(
            isinstance(getattr(n, "weight", None), torch.Tensor)
            and hasattr(n, "variance_epsilon") for n in norms):
        return None
    tensors = [p for m in linears + norms for p in m.parameters()]
    if not all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in tensors):
        return None
    arrays = [x.weight.detach().numpy() for x in linears]
    biases = [_NONE if x.bias is None else x.bias.detach().numpy() for x in linears]
    head_dim = int(attn.head_dim)
    heads, kv_heads = arrays[0].shape[0] // head_dim, arrays[1].shape[0] // head_dim
    return BlockWeights(
        norm_in=norms[0].weight.detach().numpy(), norm_post=norms[1].weight.detach().numpy(),
        eps_in=float(norms[0].variance_epsilon), eps_post=float(norms[1].variance_epsilon),
        q=arrays[0], k=arrays[1], v=arrays[2], o=arrays[3], q_bias=biases[0], k_bias=biases[1],
        v_bias=biases[2], o_bias=biases[3], gate=arrays[4], up=arrays[5], down=arrays[6],
        gate_bias=biases[4], up_bias=biases[5], down_bias=biases[6], heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, scaling=float(attn.scaling),
        q_weight=linears[0].weight, data_ptr=linears[0].weight.data_ptr())


def decode_block(weights: BlockWeights, x: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                 layer: BlockLayer) -> None:
    """One row's hidden state x [D] through the block, in place; its K/V appended to `layer`
    (grown in Python first, so the cache stays what the model's path would hold)."""
    if x.shape[0] != weights.q.shape[1] or cos.shape[0] != weights.head_dim:
        raise ValueError(f"hidden {x.shape} or rotary {cos.shape} does not fit the block")
    if not layer.is_initialized:  # the buffers' shape [1, Hkv, 0, d], as the model's K/V set it
        empty = torch.empty(1, weights.kv_heads, 0, weights.head_dim)
        layer.lazy_initialization(empty, empty)
    keys, values = layer.reserve(1)
    if keys.shape[1] != weights.kv_heads or keys.shape[3] != weights.head_dim or \
            keys.dtype != torch.float32:
        raise ValueError(f"the session's K/V {tuple(keys.shape)} do not fit the block")
    _block(x, weights.norm_in, weights.norm_post, weights.eps_in, weights.eps_post, weights.q,
           weights.k, weights.v, weights.o, weights.q_bias, weights.k_bias, weights.v_bias,
           weights.o_bias, weights.gate, weights.up, weights.down, weights.gate_bias,
           weights.up_bias, weights.down_bias, cos, sin, keys.numpy()[0], values.numpy()[0],
           layer.length, weights.scaling)
    layer.advance(1)


def warm_up() -> None:
    """Compile (or load from numba's cache) the block kernel now rather than in a step."""
    square, vector = np.eye(2, dtype=np.float32), np.ones(2, dtype=np.float32)
    kv = np.zeros((1, 1, 2), dtype=np.float32)
    _block(vector.copy(), vector, vector, 1e-6, 1e-6, square, square, square, square, _NONE,
           _NONE, _NONE, _NONE, square, square, square, _NONE, _NONE, _NONE, vector, vector,
           kv, kv.copy(), 0, 1.0)


@numba.njit(fastmath=True, nogil=True, cache=True, boundscheck=False, inline="always")
def _linear(weight: np.ndarray, bias: np.ndarray, x: np.ndarray,
            out: np.ndarray) -> None:  # pragma: no cover
    """out = weight @ x (+ bias): each weight row read once."""
    for o in range(weight.shape[0]):
        acc = np.float32(0.0)
        for i in range(weight.shape[1]):
            acc += weight[o, i] * x[i]
        out[o] = acc + bias[o] if bias.shape[0] else acc


@numba.njit(fastmath=True, nogil=True, cache=True, boundscheck=False, inline="always")
def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float,
              out: np.ndarray) -> None:  # pragma: no cover
    """out = weight * x / sqrt(mean(x^2) + eps), as the model's RMSNorm in fp32."""
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        total += x[i] * x[i]
    scale = np.float32(1.0 / np.sqrt(total / x.shape[0] + eps))
    for i in range(x.shape[0]):
        out[i] = weight[i] * (x[i] * scale)


@numba.njit(fastmath=True, nogil=True, cache=True, boundscheck=False, inline="always")
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


@numba.njit(fastmath=True, nogil=True, cache=True, boundscheck=False, inline="always")
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


@numba.njit(fastmath=True, nogil=True, cache=True, boundscheck=False)
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
