"""The decode lane: a step of decode rows that hold still runs with the arguments of the step
before, in two compiled calls.

Measured on SmolLM2 (fp32, one session, one thread): of ~21.3 ms per token the fused blocks took
15.0 and the LM head's product 4.1; the other ~2.2 ms went to Python and torch calls around
them (packing the rows, the step cache, each cache layer checked and its K/V gathered into new
typed lists, the rotary call, the final norm by torch, the head's wrapper), each slow because
streaming 540 MB of weights leaves none of their code or data in the CPU's caches: the same
calls timed warm add up to ~0.4 ms. So a step whose rows are single positions through the same
units, whose sessions' caches hold still since the lane's last step (the same K/V buffers,
every layer at the length the lane left it), keeps everything the
kernel takes: each row's embedding (or hidden state) is copied in, the rotary table of its
position taken, the blocks run in one call (`fused_kernel.run_blocks`), the final norm and the
LM head in another (`fused_kernel.head_rows`, with each row's greedy token). A full buffer grows
in the lane (the new buffers taken); anything else (a rollback, a prompt chunk, another set of
rows) builds the lane anew with the fused path's checks; a row that does not fit leaves the
step to the general path (runtime/step.py), where it fails alone.
The model keeps its last `LANES_KEPT` lanes, so that a session whose placement visits the
server several times per token finds each of its server segments' lanes again: with one lane
kept, every visit of such a session built one (measured on SmolLM2, one row's decode through
16 blocks in 2-8 segments: 0.36-0.69 ms of the engine step's CPU outside its units, against
0.24 ms with the lane held). A session's lanes go when it closes (`drop_lanes`), with the K/V
they hold.
The caches end as the fused path leaves them, so rollbacks, speculation and later prompt chunks
see no difference.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from numba.typed import List
from torch import nn

from splitllm.runtime import fused_kernel as kernel
from splitllm.runtime.fused import (
    BlockWeights,
    HeadWeights,
    StackWeights,
    fused_now,
    head_weights,
    layers_of,
    reserve_position,
    segment_kv,
    stack_weights,
)
from splitllm.runtime.gemv import FAST_ROWS, fast_paths_now
from splitllm.runtime.kvcache import BlockLayer
from splitllm.runtime.units import SegmentCache, UnitStack


class LaneRow(Protocol):
    """What the lane reads of a step's row (runtime/step.py's StepRow; step imports lane)."""

    @property
    def start(self) -> int: ...
    @property
    def stop(self) -> int: ...
    @property
    def x(self) -> torch.Tensor: ...  # token ids [1, 1] from embed, else hidden [1, 1, D]
    @property
    def tokens(self) -> int: ...  # its positions t
    @property
    def first_position(self) -> int: ...
    @property
    def cache(self) -> SegmentCache | None: ...
    @property
    def head_positions(self) -> int: ...

_LANES = "_splitllm_decode_lanes"  # the model's last lanes, newest first
LANES_KEPT = 8  # lanes of as many row sets (one session's server segments: one each)
_LANES_LOCK = threading.Lock()  # the engine's thread keeps lanes, a closing session drops its own
_ROTARY = "_splitllm_rotary_table"
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # tables that do not move with the context


class RotaryTable:
    """The model's own rotary tables (`rotary_emb`) of positions [0, P), taken in one call and
    doubled as positions grow: a row's table is a slice, not ~10 torch ops per step (the same
    values: each position's angles are one product, and cos/sin elementwise)."""

    def __init__(self, rotary: nn.Module, hidden_size: int) -> None:
        self.rotary, self.hidden_size = rotary, hidden_size
        self.cos = self.sin = np.zeros((0, 0), dtype=np.float32)  # [P, d]
        self.inv_freq = _inv_freq(rotary)
        self.data_ptr = self.inv_freq.data_ptr()

    def holds(self) -> bool:
        """Whether the frequencies are the ones the tables were taken with (static rope types
        never change them in place)."""
        return _inv_freq(self.rotary) is self.inv_freq and \
            self.inv_freq.data_ptr() == self.data_ptr

    def rows(self, positions: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [R, d] of these positions."""
        top = max(positions)
        if top >= self.cos.shape[0]:
            self._take(max(256, 2 * top))
        if len(positions) == 1:
            p = positions[0]
            return self.cos[p:p + 1], self.sin[p:p + 1]
        return self.cos[positions], self.sin[positions]

    def _take(self, count: int) -> None:
        probe = torch.zeros(1, 1, self.hidden_size)
        cos, sin = self.rotary(probe, torch.arange(count)[None])  # [1, P, d] each
        self.cos, self.sin = cos[0].contiguous().numpy(), sin[0].contiguous().numpy()


def _inv_freq(rotary: nn.Module) -> torch.Tensor:
    inv_freq = rotary.inv_freq
    assert isinstance(inv_freq, torch.Tensor)  # checked by rotary_table
    return inv_freq


def rotary_table(stack: UnitStack) -> RotaryTable | None:
    """The stack's rotary table (kept on the model), where its rope type is static."""
    rotary = stack.rotary_emb
    if rotary is None or stack.rotary_per_layer_type or getattr(
            rotary, "rope_type", None) not in STATIC_ROPE or not isinstance(
            getattr(rotary, "inv_freq", None), torch.Tensor):
        return None
    held: RotaryTable | None = stack.model.__dict__.get(_ROTARY)
    if held is None or held.rotary is not rotary or not held.holds():
        held = RotaryTable(rotary, stack.hidden_size)
        stack.model.__dict__[_ROTARY] = held
    return held


@dataclass(eq=False)
class DecodeLane:
    """A few sessions' decode rows through units [start, stop) with the kernel's arguments kept:
    valid while the same caches hold the same buffers at the lengths it left them."""

    stack: UnitStack
    start: int
    stop: int
    caches: tuple[SegmentCache, ...]
    layers: tuple[tuple[BlockLayer, ...], ...]  # per row: the cache layers of the blocks
    buffers: list[tuple[torch.Tensor, ...]]  # per row: each layer's key buffer
    held: list[int]  # per row: the positions every layer holds
    capacity: list[int]  # per row: the positions its buffers have room for
    weights: StackWeights
    blocks: tuple[BlockWeights, ...]
    head: HeadWeights | None  # None: the rows stop before the head
    embedding: np.ndarray | None  # [V, D], where the rows start at embed
    embedding_weight: torch.Tensor | None  # the model's: moved elsewhere, the view is stale
    embedding_at: int  # where its storage was when the view was taken
    keys: List
    values: List
    kv_first: np.ndarray  # [R]: each cache's first block
    lengths: np.ndarray  # [R, blocks]: where each row writes its K/V
    rotary: RotaryTable

    def __post_init__(self) -> None:
        # What run_blocks takes that stays from step to step (all but x, the rotary tables)
        self.kernel_args = dict(**self.weights.lists, keys=self.keys, values=self.values,
                                lengths=self.lengths,
                                active=np.ones(len(self.caches), dtype=np.bool_))

    @property
    def block_range(self) -> range:
        return self.stack.blocks_in(self.start, self.stop)

    def holds(self, rows: Sequence[LaneRow]) -> bool:
        """Whether these rows are this lane's, their caches as it left them (the caches checked
        first: of the lanes kept, most are other rows')."""
        if len(rows) != len(self.caches) or any(
                row.cache is not cache for row, cache in zip(rows, self.caches, strict=True)) \
                or not self._weights_hold() or not self.rotary.holds():
            return False
        for r, row in enumerate(rows):
            if row.start != self.start or \
                    row.stop != self.stop or row.tokens != 1 or \
                    row.head_positions != 1 or \
                    (self.start > 0 and row.x.dtype != torch.float32):
                return False
            held = self.held[r]
            for layer, buffer in zip(self.layers[r], self.buffers[r], strict=True):
                if layer.length != held or layer.key_buffer is not buffer:
                    return False
        return True

    def make_room(self) -> bool:
        """Room for one more position in every row's buffers: a full row's cache grows (an
        arena: every layer at once) and the lane takes its new buffers, rather than being built
        anew (~1 ms after the weights streamed through the CPU's caches); False where a growth
        fails (the lane is then built anew, and that row fails alone on the general path). The
        buffers keep their K/V shape as they grow (runtime/kvcache.py): checked at the build."""
        for r, held in enumerate(self.held):
            if held < self.capacity[r]:
                continue
            try:
                for layer in self.layers[r]:
                    layer.reserve(1)
            except Exception:  # out of memory, say
                return False
            self.buffers[r] = tuple(layer.key_buffer for layer in self.layers[r])
            self.capacity[r] = min(buffer.shape[2] for buffer in self.buffers[r])
            self.keys[r], self.values[r] = segment_kv(self.caches[r])
        return True

    def _weights_hold(self) -> bool:
        """No weight moved since the lane took its views: the first and last blocks' (as
        fused.block_weights checks each; the model's weights move together), the head's, the
        embedding's."""
        return all(own.q_weight.data_ptr() == own.data_ptr
                   for own in (self.blocks[0], self.blocks[-1])) and (
            self.head is None or self.head.hold()) and (
            self.embedding_weight is None
            or self.embedding_weight.data_ptr() == self.embedding_at)

    def run(self, rows: Sequence[LaneRow], unit_cpu: bool,
            ) -> tuple[LaneOutputs, tuple[Lap, ...]]:
        """The rows through the lane's units, the blocks in one call, the head in another: the
        rows' outputs and the laps."""
        clock = Clock(unit_cpu, len(rows))
        embed = None
        x = self._input(rows)  # [R, D]
        cos, sin = self.rotary.rows([row.first_position for row in rows])  # [R, d] each
        if self.start == 0:
            embed = clock.lap(range(0, 1))
        blocks = self.block_range
        self._hold(1)  # now, while holds() has just read the layers (in the CPU's caches)
        try:  # each row's K/V written at self.lengths (then one on), the positions held before
            kernel.run_blocks(x, blocks.start, blocks.stop, self.kv_first, cos=cos, sin=sin,
                              **self.kernel_args)
        except BaseException:
            self._hold(-1)
            raise
        ran = clock.lap(range(blocks.start + 1, blocks.stop + 1))
        laps: tuple[Lap, ...] = (ran,) if embed is None else (embed, ran)
        if self.head is None:
            return LaneOutputs(hidden=_rows_of(torch.from_numpy(x)[:, None])), laps  # [1, 1, D]
        logits = np.empty((len(rows), self.head.matrix.shape[0]), dtype=np.float32)  # [R, V]
        greedy = np.empty(len(rows), dtype=np.int64)
        kernel.head_rows(x, self.head.norm, self.head.eps, self.head.matrix, logits, greedy)
        laps += (clock.lap(range(self.stack.n_units - 1, self.stack.n_units)),)
        return LaneOutputs(logits=logits, greedy=greedy.tolist()), laps

    def _hold(self, positions: int) -> None:
        """Every layer of every row holds `positions` more (BlockLayer.advance, without a call
        per layer)."""
        for r, layers in enumerate(self.layers):
            held = self.held[r] = self.held[r] + positions
            for layer in layers:
                layer.length = held

    def _input(self, rows: Sequence[LaneRow]) -> np.ndarray:
        """The rows' hidden states [R, D], a new array (the outputs are views of it)."""
        if self.embedding is not None:  # the model's embedding is a plain lookup (checked)
            ids = rows[0].x.numpy()[0] if len(rows) == 1 else np.concatenate(
                [row.x.numpy()[0] for row in rows])
            return np.take(self.embedding, ids, axis=0)
        x = np.empty((len(rows), self.stack.hidden_size), dtype=np.float32)
        for r, row in enumerate(rows):
            x[r] = row.x.numpy()[0, 0]
        return x


@dataclass(frozen=True)
class LaneOutputs:
    """A lane step's outputs: each row's hidden state [1, 1, D] (rows that stop before the
    head), or the logits [R, V] as numpy (a tensor is made only where one is asked for: torch's
    calls cost ~70 us each here, after the weights streamed through the CPU's caches) with each
    row's greedy token (np.argmax's)."""

    hidden: list[torch.Tensor] | None = None
    logits: np.ndarray | None = None
    greedy: list[int] | None = None


def _rows_of(out: torch.Tensor) -> list[torch.Tensor]:
    """Each row's output of out [R, ...], [1, ...] each (one row: out itself, unsliced)."""
    return [out] if out.shape[0] == 1 else [out[r:r + 1] for r in range(out.shape[0])]


@dataclass(frozen=True)
class Lap:
    """Units that ran together (alike: equal shares), their wall (and this thread's CPU)
    seconds, and the tokens (head: rows) they ran on."""

    units: range
    wall_s: float
    cpu_s: float
    tokens: int


class Clock:
    """Laps of wall and (if asked) this thread's CPU time: a CPU clock read costs microseconds."""

    def __init__(self, cpu: bool, tokens: int) -> None:
        self.cpu, self.tokens = cpu, tokens
        self.wall, self.thread = time.perf_counter(), time.thread_time() if cpu else 0.0

    def lap(self, units: range) -> Lap:
        wall, thread = time.perf_counter(), time.thread_time() if self.cpu else 0.0
        lap = Lap(units, wall - self.wall, thread - self.thread, self.tokens)
        self.wall, self.thread = wall, thread
        return lap


def decode_lane(stack: UnitStack, rows: Sequence[LaneRow]) -> DecodeLane | None:
    """The lane of these rows: a kept one that holds them, else a new one if every row is a
    single position through the same units the fused path covers (kept first, in place of
    those of the same caches: they no longer hold them), else None."""
    for held in kept_lanes(stack):
        if held.holds(rows) and held.make_room():
            _keep(stack, held)
            return held
    lane = _build(stack, rows)
    if lane is not None:
        _keep(stack, lane)
    return lane


def kept_lanes(stack: UnitStack) -> list[DecodeLane]:
    """The stack's kept lanes, newest first (a copy)."""
    with _LANES_LOCK:
        return [held for held in stack.model.__dict__.get(_LANES, ()) if held.stack is stack]


def _keep(stack: UnitStack, lane: DecodeLane) -> None:
    """`lane` first among the model's kept lanes, no other of its caches kept, `LANES_KEPT`."""
    mine = {id(cache) for cache in lane.caches}
    with _LANES_LOCK:
        others = [held for held in stack.model.__dict__.get(_LANES, ())
                  if held is not lane and mine.isdisjoint(map(id, held.caches))]
        stack.model.__dict__[_LANES] = [lane, *others][:LANES_KEPT]


def drop_lanes(stack: UnitStack, caches: Sequence[SegmentCache]) -> None:
    """Forget the kept lanes of any of these caches (a closing session's: their K/V go)."""
    gone = {id(cache) for cache in caches}
    with _LANES_LOCK:
        stack.model.__dict__[_LANES] = [held for held in stack.model.__dict__.get(_LANES, ())
                                        if gone.isdisjoint(map(id, held.caches))]


def _build(stack: UnitStack, rows: Sequence[LaneRow]) -> DecodeLane | None:
    start, stop = rows[0].start, rows[0].stop
    blocks = stack.blocks_in(start, stop)
    if not _applies(stack, rows) or not len(blocks):
        return None
    weights = stack_weights(stack)
    head = head_weights(stack) if stop == stack.n_units else None
    embedding = _embedding(stack) if start == 0 else None
    rotary = rotary_table(stack)
    if not all(weights.covered[b] for b in blocks) or (stop == stack.n_units and head is None) \
            or (start == 0 and embedding is None) or rotary is None \
            or not _rotary_fits(rotary, weights, blocks, stack.hidden_size):
        return None
    own = tuple(w for w in weights.blocks[blocks.start:blocks.stop] if w is not None)
    layers, held = [], []
    for row in rows:
        assert row.cache is not None  # checked in _applies
        mine = layers_of(row.cache, blocks.start, blocks.stop)
        if len(mine) != len(blocks) or any(type(layer) is not BlockLayer for layer in mine):
            return None
        try:
            for layer, weight in zip(mine, own, strict=True):
                reserve_position(layer, weight)  # room for one more position, the block's K/V shape
        except Exception:  # this row's: the general path fails it alone
            return None
        lengths = {layer.get_seq_length() for layer in mine}
        if len(lengths) != 1:
            return None
        layers.append(tuple(mine))
        held.append(lengths.pop())
    kv = [segment_kv(row.cache) for row in rows if row.cache is not None]
    return DecodeLane(
        stack=stack, start=start, stop=stop, caches=tuple(row.cache for row in rows
                                                           if row.cache is not None),
        layers=tuple(layers), buffers=[tuple(layer.key_buffer for layer in mine)
                                       for mine in layers],
        held=held, capacity=[min(layer.key_buffer.shape[2] for layer in mine)
                            for mine in layers],
        weights=weights, blocks=own, head=head,
        embedding=None if embedding is None else embedding[0],
        embedding_weight=None if embedding is None else embedding[1],
        embedding_at=0 if embedding is None else embedding[1].data_ptr(),
        keys=List([k for k, _ in kv]), values=List([v for _, v in kv]),
        kv_first=np.array([row.cache.first_block for row in rows if row.cache is not None]),
        lengths=np.array([[h] * len(blocks) for h in held], dtype=np.int64), rotary=rotary)


def _applies(stack: UnitStack, rows: Sequence[LaneRow]) -> bool:
    """Few single-position rows through the same units, fp32 on the CPU, one thread."""
    first = rows[0]
    return (fused_now() and fast_paths_now().lane and 0 < len(rows) <= FAST_ROWS
            and all(row.start == first.start and row.stop == first.stop and row.cache is not None
                    and row.tokens == 1 and row.head_positions == 1
                    and row.x.is_cpu and (first.start == 0 or (
                        row.x.dtype == torch.float32
                        and row.x.shape == (1, 1, stack.hidden_size))) for row in rows))


def _embedding(stack: UnitStack) -> tuple[np.ndarray, torch.Tensor] | None:
    """The embedding matrix [V, D] (and its tensor) where embed is a plain fp32 lookup (no
    scale, no positions)."""
    table = stack.embed_tokens
    weight = getattr(table, "weight", None)
    if type(table) is not nn.Embedding or stack.embed_multiplier is not None or \
            stack.position_table is not None or not isinstance(weight, torch.Tensor) or \
            weight.dtype != torch.float32 or not weight.is_cpu or not weight.is_contiguous():
        return None
    return weight.detach().numpy(), weight


def _rotary_fits(rotary: RotaryTable, weights: StackWeights, blocks: range,
                 hidden_size: int) -> bool:
    """The rotary tables' width is every block's head dim (as fused._check requires)."""
    cos, _ = rotary.rows([0])
    return all(own is not None and own.head_dim == cos.shape[-1] and own.q.shape[1] == hidden_size
               for own in weights.blocks[blocks.start:blocks.stop])
