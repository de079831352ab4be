"""Rows of a few positions through a run of Llama-style blocks in ONE compiled call (gpt-fast).

A decode step of one session is bound by reading the weights, yet through the model's own modules
a block costs ~40 small torch ops and Python calls (RMSNorm as 5 ops, rotary with cat/neg, the
packed-attention dispatcher, SDPA, the cache update, SiLU*mul, residual adds): on SmolLM2 a
third of the step. `FusedRows.run` sends a step of up to FAST_ROWS positions in all (decode
positions, the k + 1 of a speculative verification, a short prompt) through a run of blocks in
one numba call (runtime/fused_kernel.py), each position one kernel row: per block norm -> q/k/v ->
rotary -> write K/V into each session's `BlockLayer` buffers at the position's place -> causal
attention over the session's held positions and its new ones up to this one -> o-proj +
residual -> norm -> gate/up -> SiLU*mul -> down + residual, every weight read once for all rows
(up to FAST_ROWS of them). Steps of more positions (many sessions, prompt chunks) are
compute-bound: there each block's products run by oneDNN on packed weights (runtime/gemv.py),
norms, rotary, the K/V writes and attention by the same kernel's parts (no padded copies of the
caches), SiLU*mul by torch. Prompt chunks take it too (up to `SESSION_POSITIONS` positions
of a session): a step's time is then one function of its tokens whatever its rows (the step
model's premise). When a prompt of more than FAST_ROWS positions sent its whole step by the
model's path, a load test's prompt steps took 1.11-1.15x what the step model priced for their
tokens, and the requests of a burst that waited behind them missed their SLA.

The weights are the model's own tensors (numpy views, no copies); the rotary tables are the
model's own (`rotary_emb`, so any rope scaling applies); the cache ends holding exactly what the
model's path would write (rotated keys, values), so rollback, speculation and later prefill
chunks read it alike. It applies to fp32 on the CPU with one intra-op thread, to full-attention
blocks of the families in `FAMILIES` whose modules have the standard layout (checked per block);
every other block, row or setting keeps the model's own path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numba.typed import List
from torch import nn
from transformers.activations import SiLUActivation

from splitllm.runtime import fused_kernel as kernel
from splitllm.runtime.families import FULL
from splitllm.runtime.gemv import FAST_ROWS, fast_paths_now, packed_product, packed_weight
from splitllm.runtime.kvcache import BlockLayer
from splitllm.runtime.packing import RowGroup
from splitllm.runtime.units import SegmentCache, UnitStack

# A session's positions in one fused step, at most: a longer prompt chunk sends its step by the
# model's path (SDPA), as the kernel's attention loops over every earlier position of each.
# `benchmarks/bench_prefill.py` (SmolLM2, one prompt through every unit, the fused path's
# seconds over the model's path's, two runs): P = 8: 0.75-0.80, 17: 0.76-0.80, 32: 0.77-0.83,
# 62: 0.88-1.00, 128: 0.98, 256: 0.88-0.99, 512: 1.02-1.07.
SESSION_POSITIONS = 256

FAMILIES = ("llama", "mistral", "qwen2")  # RMSNorm, rotary, GQA, SiLU-gated MLP, optional biases
_WEIGHTS = "_splitllm_fused_weights"
_STACK = "_splitllm_fused_stack"
_KV = "_splitllm_fused_kv"
_HEAD = "_splitllm_fused_head"


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
    linears: tuple[nn.Linear, ...]  # the modules of q, k, v, o, gate, up, down (packed weights)
    q_weight: torch.Tensor  # the model's q weight: moved elsewhere, the views are stale
    data_ptr: int  # where the q weight's storage was when the views were taken



@dataclass(frozen=True)
class KernelRows:
    """The kernel's per-row arguments of a step's groups: one kernel row per position, a
    session's positions consecutive and in order, each at its own held length."""

    keys: List  # [R]: the row's session's K buffers (index = block - kv_first)
    values: List
    kv_first: np.ndarray  # [R]: the first block of the row's session's cache
    lengths: np.ndarray  # [R, blocks]: where the row writes its K/V (held + its place)
    active: np.ndarray  # [R]: its session has no error yet

    @staticmethod
    def of(groups: list[RowGroup], block: int, stop: int) -> KernelRows:
        """The rows of blocks [block, stop), the groups' caches fitting them (checked)."""
        spans = [group.end - group.begin for group in groups]
        owner = np.repeat(np.arange(len(groups)), spans)  # [R]: each row's group
        place = np.arange(len(owner)) - np.repeat([group.begin for group in groups], spans)
        kv = [segment_kv(group.cache) for group in groups]
        held = np.array([[layer.get_seq_length() for layer in layers_of(group.cache, block, stop)]
                         for group in groups], dtype=np.int64)  # [G, blocks]
        return KernelRows(
            keys=List([kv[g][0] for g in owner]), values=List([kv[g][1] for g in owner]),
            kv_first=np.array([groups[g].cache.first_block for g in owner]),
            lengths=held[owner] + place[:, None],
            active=np.array([groups[g].error is None for g in owner], dtype=np.bool_))


class FusedRows:
    """The rows of a step (a few positions of each session) through the blocks the fused path
    covers, with the rotary tables of their positions (the model's own), taken once per step:
    up to FAST_ROWS positions in all in one kernel call, more block by block with the products
    by oneDNN on the packed weights (runtime/gemv.py) and the rest by the kernel's parts."""

    def __init__(self, stack: UnitStack, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.stack = stack
        self.cos, self.sin = cos.numpy()[0], sin.numpy()[0]  # [R, d] each

    @staticmethod
    def of(stack: UnitStack, hidden: torch.Tensor, positions: torch.Tensor,
           groups: list[RowGroup]) -> FusedRows | None:
        """The rows of a step's packed rows [1, R, D], if the fused path applies: at most
        `SESSION_POSITIONS` positions per session, fp32 on the CPU, one intra-op thread, no
        autograd, one rotary table for every block."""
        if not (fused_now() and all(group.end - group.begin <= SESSION_POSITIONS
                                    for group in groups)
                and hidden.dtype == torch.float32 and hidden.is_cpu) \
                or stack.rotary_emb is None or stack.rotary_per_layer_type:
            return None
        cos, sin = stack.rotary_emb(hidden, positions)  # [1, R, d] each
        return FusedRows(stack, cos.contiguous(), sin.contiguous())

    def run(self, block: int, stop: int, hidden: torch.Tensor, groups: list[RowGroup]) -> int:
        """Blocks [block, b) on the rows' contiguous hidden states [1, R, D] in place, in one
        call, b <= stop the first block the fused path does not cover for every row: how many
        ran (0: none, the model's path runs `block`). A session's positions are consecutive
        kernel rows, each writing its K/V after the ones before it and attending over them
        (causal). A row whose cache does not fit gets its error before its cache holds
        anything new; the other rows go on."""
        weights = stack_weights(self.stack)
        covered = weights.covered[block:stop]
        if hidden.shape[1] > FAST_ROWS:  # many rows: the blocks' products by their packed weights
            covered = tuple(own is not None and all(packed_weight(m) is not None
                                                     for m in own.linears)
                            for own in weights.blocks[block:stop])
        count = stop - block
        for group in groups:
            layers = layers_of(group.cache, block, stop)
            count = min(count, next((k for k, (layer, on) in enumerate(zip(
                layers, covered, strict=True)) if not on or type(layer) is not BlockLayer),
                len(layers)))
        if count == 0:
            return 0
        x = hidden.numpy()[0]  # [R, D], the tensor's memory
        for group in groups:
            if group.error is None:
                try:
                    _check(x, self.cos, layers_of(group.cache, block, block + count),
                           weights.blocks[block:block + count], tokens=group.end - group.begin)
                except Exception as exc:  # this row's; the others go on
                    group.error = exc
        if all(group.error is not None for group in groups):
            return count  # every row has its error: nothing to run, as the model's path would
        rows = KernelRows.of(groups, block, block + count)
        if x.shape[0] <= FAST_ROWS:
            kernel.run_blocks(x, block, block + count, rows.kv_first, **weights.lists,
                              cos=self.cos, sin=self.sin, keys=rows.keys, values=rows.values,
                              lengths=rows.lengths, active=rows.active)
        else:
            for j, own in enumerate(weights.blocks[block:block + count]):
                assert own is not None  # covered
                self._many_rows(hidden[0], own, layer=block + j - rows.kv_first, keys=rows.keys,
                                values=rows.values,
                                lengths=np.ascontiguousarray(rows.lengths[:, j]),
                                active=rows.active)
        for group in groups:
            for layer in layers_of(group.cache, block, block + count) \
                    if group.error is None else ():
                layer.advance(group.end - group.begin)
        return count

    def _many_rows(self, x: torch.Tensor, own: BlockWeights, *, layer: np.ndarray, keys: List,
                   values: List, lengths: np.ndarray, active: np.ndarray) -> None:
        """One block over many rows x [R, D] in place: the products by oneDNN on the packed
        weights (compute-bound at many rows), norms and attention by the kernel's parts."""
        q, k, v, o, gate, up, down = own.linears
        normed = torch.empty_like(x)
        kernel.norm_rows(x.numpy(), own.norm_in, own.eps_in, normed.numpy())
        qs, ks, vs = (_product(m, normed) for m in (q, k, v))
        attended = torch.zeros_like(qs)
        kernel.attend_rows(qs.numpy(), ks.numpy(), vs.numpy(), layer, self.cos, self.sin, keys,
                           values, lengths, own.scaling, active, attended.numpy())
        x += _product(o, attended)
        kernel.norm_rows(x.numpy(), own.norm_post, own.eps_post, normed.numpy())
        gated = F.silu(_product(gate, normed), inplace=True)  # torch's exp is vectorised
        x += _product(down, gated.mul_(_product(up, normed)))


def _product(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x @ the layer's weight.T + its bias, by oneDNN on the packed weight."""
    packed = packed_weight(layer)
    assert packed is not None  # checked when the block was taken
    return packed_product(x, packed, layer.bias, layer.out_features)


def fused_now() -> bool:
    """Whether the compiled paths may run now: switched on, one intra-op thread, no autograd."""
    return fast_paths_now().fused and torch.get_num_threads() == 1 \
        and not torch.is_grad_enabled()


def layers_of(cache: SegmentCache, block: int, stop: int) -> list[Any]:
    """The cache layers of blocks [block, stop)."""
    return cache.layers[block - cache.first_block:stop - cache.first_block]


def _check(x: np.ndarray, cos: np.ndarray, layers: list[Any],
           blocks: tuple[BlockWeights | None, ...], tokens: int) -> None:
    """One session's cache layers fit the blocks (grown for its `tokens` new positions), or a
    ValueError."""
    for layer, own in zip(layers, blocks, strict=True):
        assert own is not None  # covered
        if x.shape[1] != own.q.shape[1] or cos.shape[1] != own.head_dim:
            raise ValueError(f"hidden {x.shape} or rotary {cos.shape} does not fit the blocks")
        reserve_position(layer, own, tokens)


def reserve_position(layer: BlockLayer, weights: BlockWeights, tokens: int = 1) -> None:
    """Room for `tokens` more positions in the layer's buffers, which must fit the blocks'
    K/V."""
    if not layer.is_initialized:  # the buffers' shape [1, Hkv, 0, d], as the model's K/V set it
        empty = torch.empty(1, weights.kv_heads, 0, weights.head_dim)
        layer.lazy_initialization(empty, empty)
    keys, _ = layer.reserve(tokens)
    if keys.shape[1] != weights.kv_heads or keys.shape[3] != weights.head_dim or \
            keys.dtype != torch.float32:
        raise ValueError(f"the session's K/V {tuple(keys.shape)} do not fit the block")


def segment_kv(cache: SegmentCache) -> tuple[List, List]:
    """The segment's K/V buffers [Hkv, capacity, d] as typed lists (index = layer), rebuilt
    only when a buffer was replaced (grown)."""
    buffers = tuple(getattr(layer, "key_buffer", None) for layer in cache.layers)
    held = cache.__dict__.get(_KV)
    if held is None or any(a is not b for a, b in zip(held[0], buffers, strict=True)):
        lists = tuple(List([kernel.NO_KV if buffer is None else getattr(layer, name).numpy()[0]
                            for buffer, layer in zip(buffers, cache.layers, strict=True)])
                      for name in ("key_buffer", "value_buffer"))
        held = (buffers, *lists)
        cache.__dict__[_KV] = held
    return held[1], held[2]


@dataclass(frozen=True)
class StackWeights:
    """Every block's weights as typed lists (block b's at b * len(MATRICES) + m, ...) for one
    call over a run of blocks; a block the fused path does not run holds empty placeholders."""

    blocks: tuple[BlockWeights | None, ...]
    covered: tuple[bool, ...]
    lists: dict[str, Any]  # run_blocks' weight arguments by name


def stack_weights(stack: UnitStack) -> StackWeights:
    """The stack's blocks' weights for the kernel (kept on the model while they stay valid)."""
    held: StackWeights | None = stack.model.__dict__.get(_STACK)
    blocks = tuple(block_weights(layer, stack.family) if stack.layer_types[b] == FULL
                   and stack.layer_windows[b] is None else None
                   for b, layer in enumerate(stack.layers))
    if held is not None and all(a is b for a, b in zip(held.blocks, blocks, strict=True)):
        return held
    lists: dict[str, Any] = {  # block b's: at b * len(MATRICES) + m, ...
        "matrices": List([kernel.NO_MATRIX if w is None else getattr(w, name)
                          for w in blocks for name in kernel.MATRICES]),
        "vectors": List([kernel.NONE if w is None else getattr(w, name)
                         for w in blocks for name in kernel.VECTORS]),
        "scalars": np.array([[0.0 if w is None else getattr(w, name) for name in kernel.SCALARS]
                             for w in blocks]).reshape(len(blocks), len(kernel.SCALARS))}
    weights = StackWeights(blocks, tuple(w is not None for w in blocks), lists)
    stack.model.__dict__[_STACK] = weights
    return weights


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


@dataclass(frozen=True)
class HeadWeights:
    """The final norm and the LM head as numpy views of the model's own tensors."""

    norm: np.ndarray
    eps: float
    matrix: np.ndarray  # [V, D]
    weight: torch.Tensor  # the LM head's weight: moved elsewhere, the views are stale
    data_ptr: int

    def hold(self) -> bool:
        """Whether the views still show the model's weights (none has moved since)."""
        return self.weight.data_ptr() == self.data_ptr


def head_weights(stack: UnitStack) -> HeadWeights | None:
    """The head's weights if the compiled head (`fused_kernel.head_rows`) can run it: the
    families' RMSNorm, a bias-free fp32 Linear, no logit scaling (kept while they stay)."""
    held: HeadWeights | None = stack.model.__dict__.get(_HEAD)
    if held is not None and held.hold():
        return held
    norm, head = stack.final_norm, stack.lm_head
    weights = [getattr(norm, "weight", None), getattr(head, "weight", None)]
    if stack.family not in FAMILIES or type(head) is not nn.Linear or head.bias is not None \
            or not hasattr(norm, "variance_epsilon") or not all(
                isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.is_cpu
                and w.is_contiguous() for w in weights) or any(
                scale is not None for scale in (stack.logit_multiplier, stack.logit_divisor,
                                                stack.logit_softcap)):
        return None
    held = HeadWeights(norm=norm.weight.detach().numpy(), eps=float(norm.variance_epsilon),
                       matrix=head.weight.detach().numpy(), weight=head.weight,
                       data_ptr=head.weight.data_ptr())
    stack.model.__dict__[_HEAD] = held
    return held


def head_logits(stack: UnitStack, hidden: torch.Tensor) -> tuple[torch.Tensor, np.ndarray] | None:
    """Logits [R, V] of a few rows' hidden states [R, D] by one compiled call (final norm and
    LM head) with each row's greedy token [R], or None where it does not apply (the model's
    modules then run the head)."""
    if not (fused_now() and 0 < hidden.shape[0] <= FAST_ROWS
            and hidden.dtype == torch.float32 and hidden.is_cpu):
        return None
    weights = head_weights(stack)
    if weights is None or hidden.shape[1] != weights.matrix.shape[1]:
        return None
    logits = np.empty((hidden.shape[0], weights.matrix.shape[0]), dtype=np.float32)
    greedy = np.empty(hidden.shape[0], dtype=np.int64)
    kernel.head_rows(np.ascontiguousarray(hidden.numpy()), weights.norm, weights.eps,
                     weights.matrix, logits, greedy)
    return torch.from_numpy(logits), greedy


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
    biases = [kernel.NONE if x.bias is None else x.bias.detach().numpy() for x in linears]
    head_dim = int(attn.head_dim)
    heads, kv_heads = arrays[0].shape[0] // head_dim, arrays[1].shape[0] // head_dim
    return BlockWeights(
        norm_in=norms[0].weight.detach().numpy(), norm_post=norms[1].weight.detach().numpy(),
        eps_in=float(norms[0].variance_epsilon), eps_post=float(norms[1].variance_epsilon),
        q=arrays[0], k=arrays[1], v=arrays[2], o=arrays[3], q_bias=biases[0], k_bias=biases[1],
        v_bias=biases[2], o_bias=biases[3], gate=arrays[4], up=arrays[5], down=arrays[6],
        gate_bias=biases[4], up_bias=biases[5], down_bias=biases[6], heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, scaling=float(attn.scaling), linears=tuple(linears),
        q_weight=linears[0].weight, data_ptr=linears[0].weight.data_ptr())
