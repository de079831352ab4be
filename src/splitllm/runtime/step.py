"""One engine step: every row walks its units once, each unit runs once over all its rows.

Rows join at their first unit and leave after their last. Blocks run on the rows packed into one
sequence (runtime/packing.py); the packing is rebuilt only where the set of rows changes, so a
step of sessions with the same server segment packs once. Embed runs once over all rows that
start there; the head runs once over the last position of every row that reaches it (every
position of a row that verifies draft tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from splitllm.runtime import fused
from splitllm.runtime.lane import DecodeLane, Lap, decode_lane
from splitllm.runtime.packing import STEP_KWARG, RowGroup, StepCache, install_packed_attention
from splitllm.runtime.units import SegmentCache, UnitStack


@dataclass(frozen=True)
class StepRow:
    """One row of a step: `x` through units [start, stop) at the consecutive absolute
    positions from `first_position` (decode, prompt chunks and draft verification alike)."""

    start: int
    stop: int
    x: torch.Tensor  # token ids [1, t] if start == 0, else hidden states [1, t, D]
    # an int, not a tensor: the decode lane reads it, and a torch call costs ~100 us after the
    # weights streamed through the CPU's caches (position_ids builds the tensor where read)
    first_position: int
    cache: SegmentCache | None
    head_positions: int = 1  # the head's last positions (all of them to verify draft tokens)

    @property
    def tokens(self) -> int:
        """The row's positions t."""
        return self.x.shape[1]

    @cached_property
    def position_ids(self) -> torch.Tensor:
        """The absolute positions [1, t]."""
        first = self.first_position
        return torch.arange(first, first + self.tokens, device=self.x.device)[None]


class RowOutput:
    """A row's result: hidden [1, t, D] (stop before the head) or logits [1, V], or its error.
    The decode lane's logits stay numpy until `out` is read; the compiled head's rows carry
    their greedy token (its argmax: np.argmax's)."""

    def __init__(self, out: torch.Tensor | None = None, error: BaseException | None = None, *,
                 logits: np.ndarray | None = None, greedy: int | None = None) -> None:
        self._out, self.error, self.logits, self.greedy = out, error, logits, greedy

    @property
    def out(self) -> torch.Tensor | None:
        if self._out is None and self.logits is not None:
            self._out = torch.from_numpy(self.logits)  # [1, V]
        return self._out

    @out.setter
    def out(self, value: torch.Tensor | None) -> None:
        self._out = value


@dataclass(frozen=True)
class StepTimes:
    """The step's laps (units that ran together, alike: equal shares of a lap's wall and CPU
    seconds), and per unit on demand: a step is accounted per lap (a decode step: three), not
    per unit."""

    laps: tuple[Lap, ...]
    cpu: bool  # the laps' CPU seconds were measured (else unit_cpu_s is empty)

    @cached_property
    def unit_s(self) -> dict[int, float]:
        """Wall seconds of each unit the step ran."""
        return {unit: lap.wall_s / len(lap.units) for lap in self.laps for unit in lap.units}

    @cached_property
    def unit_cpu_s(self) -> dict[int, float]:
        """This thread's CPU seconds of each unit (empty where not measured)."""
        return {unit: lap.cpu_s / len(lap.units) for lap in self.laps for unit in lap.units
                } if self.cpu else {}

    @cached_property
    def unit_tokens(self) -> dict[int, int]:
        """The tokens (head: rows) each unit ran on."""
        return {unit: lap.tokens for lap in self.laps for unit in lap.units}


def unit_seconds(laps: list[Lap], start: int, stop: int) -> tuple[float, ...]:
    """Wall seconds of each unit of [start, stop) summed over these laps (0: none ran it)."""
    seconds = [0.0] * (stop - start)
    for lap in laps:
        share = lap.wall_s / len(lap.units)
        for unit in range(max(lap.units.start, start), min(lap.units.stop, stop)):
            seconds[unit - start] += share
    return tuple(seconds)


class _Packed:
    """The rows now inside the blocks, packed into one sequence [1, T, D]."""

    def __init__(self, stack: UnitStack, rows: list[StepRow], hidden: dict[int, torch.Tensor],
                 members: tuple[int, ...]) -> None:
        self.members = members
        lengths = [rows[i].tokens for i in members]
        self.hidden = torch.cat([hidden[i] for i in members], dim=1)
        positions = torch.cat([rows[i].position_ids for i in members], dim=1)
        offsets = [sum(lengths[:k]) for k in range(len(members) + 1)]
        self.groups = [RowGroup(offsets[k], offsets[k + 1], _cache(rows[i]))
                       for k, i in enumerate(members)]
        self.cache = StepCache(self.groups)
        self.stack, self.positions = stack, positions
        self.kwargs_of: dict[str, dict[str, Any]] = {}
        # Rows of a few positions (decode, verification): covered blocks in one compiled call.
        self.fused = fused.FusedRows.of(stack, self.hidden, positions, self.groups)

    def run_blocks(self, block: int, stop: int) -> int:
        """Blocks from `block` (at most to `stop`) over the packed rows: a run of them in one
        fused call where it applies, else `block` by the model's own modules; how many ran."""
        if self.fused is not None and any(group.error is None for group in self.groups):
            self.hidden = self.hidden.contiguous()  # written in place through a numpy view
            try:
                ran = self.fused.run(block, stop, self.hidden, self.groups)
            except Exception as exc:  # not one row's (those are kept in their groups)
                for group in self.groups:
                    group.error = group.error or exc
                return 1
            if ran:
                return ran
        out = self.stack.layers[block](self.hidden, **self.kwargs(block))
        self.hidden = out[0] if isinstance(out, tuple) else out
        return 1

    def kwargs(self, block: int) -> dict[str, Any]:
        """The block's keyword arguments: the family's own (rotary tables of the packed
        positions, per attention type), with the step's cache; the masks are ours."""
        kind = self.stack.layer_types[block]
        if kind not in self.kwargs_of:
            kwargs = self.stack._block_kwargs(self.hidden, self.positions, None, kind)
            kwargs.update({"attention_mask": None, "use_cache": True, STEP_KWARG: self.cache,
                           self.stack._cache_kw: self.cache})
            self.kwargs_of[kind] = kwargs
        return self.kwargs_of[kind]

    def unpack(self, hidden: dict[int, torch.Tensor], outputs: list[RowOutput]) -> None:
        for i, group in zip(self.members, self.groups, strict=True):
            hidden[i] = self.hidden[:, group.begin:group.end]
            if group.error is not None and outputs[i].error is None:
                outputs[i].error = group.error


def _cache(row: StepRow) -> SegmentCache:
    if row.cache is None:
        raise ValueError("a row through blocks needs its segment's cache")
    return row.cache


def run_step(stack: UnitStack, rows: list[StepRow], unit_cpu: bool = True,
             ) -> tuple[list[RowOutput], StepTimes]:
    """Run every row through its units; a failure in one row's attention spares the others.
    unit_cpu=False leaves StepTimes.unit_cpu_s empty (a CPU clock read costs microseconds)."""
    if not torch.is_inference_mode_enabled():  # the engine's thread runs in it already
        with torch.inference_mode():
            return run_step(stack, rows, unit_cpu)
    install_packed_attention(stack.model)  # once per model; a no-op afterwards
    lane = decode_lane(stack, rows)
    if lane is not None:  # a few decode rows that hold still: the kernels' arguments kept
        return _lane_step(lane, rows, unit_cpu)
    n = stack.n_units
    outputs = [RowOutput() for _ in rows]
    hidden = {i: row.x for i, row in enumerate(rows) if row.start > 0}
    laps: list[Lap] = []
    packed: _Packed | None = None
    last_unit, ran = -1, 1  # the units the last iteration ran (a fused run of blocks: several)
    for unit in range(min(r.start for r in rows), max(r.stop for r in rows)):
        if unit < last_unit + ran:
            continue  # inside a fused run, which ran and timed it
        last_unit, ran = unit, 1
        clock, cpu_clock = time.perf_counter(), time.thread_time() if unit_cpu else 0.0
        active = tuple(i for i, r in enumerate(rows)
                       if r.start <= unit < r.stop and outputs[i].error is None)
        if packed is not None and (packed.members != active or unit in (0, n - 1)):
            packed.unpack(hidden, outputs)
            active = tuple(i for i in active if outputs[i].error is None)
            packed = None
        if not active:
            continue
        if unit == 0:
            _embed(stack, rows, active, hidden)
        elif unit == n - 1:
            _head(stack, rows, active, hidden, outputs)
        else:
            packed = packed or _Packed(stack, rows, hidden, active)
            ran = packed.run_blocks(unit - 1, _same_rows_until(rows, unit, n) - 1)
        if rows[0].x.is_cuda:
            torch.cuda.synchronize(rows[0].x.device)  # honest per-unit times for the step model
        wall_s = time.perf_counter() - clock
        cpu_s = time.thread_time() - cpu_clock if unit_cpu else 0.0
        tokens = (sum(rows[i].head_positions for i in active) if unit == n - 1
                  else sum(rows[i].tokens for i in active))
        laps.append(Lap(range(unit, unit + ran), wall_s, cpu_s, tokens))
    if packed is not None:
        packed.unpack(hidden, outputs)
    for i, row in enumerate(rows):
        if row.stop < n and outputs[i].error is None:
            outputs[i].out = hidden[i]
    return outputs, StepTimes(tuple(laps), unit_cpu)


def _lane_step(lane: DecodeLane, rows: list[StepRow], unit_cpu: bool,
               ) -> tuple[list[RowOutput], StepTimes]:
    outs, laps = lane.run(rows, unit_cpu)
    if outs.hidden is not None:
        return [RowOutput(out) for out in outs.hidden], StepTimes(laps, unit_cpu)
    assert outs.logits is not None and outs.greedy is not None
    logits = outs.logits
    return [RowOutput(logits=logits[r:r + 1], greedy=token)  # [1, V] each
            for r, token in enumerate(outs.greedy)], StepTimes(laps, unit_cpu)


def _same_rows_until(rows: list[StepRow], unit: int, n: int) -> int:
    """The first unit after `unit` where a row joins or leaves, or the head: the rows inside
    the blocks stay the same up to there."""
    return min([n - 1, *(edge for row in rows for edge in (row.start, row.stop) if edge > unit)])


def _head(stack: UnitStack, rows: list[StepRow], active: tuple[int, ...],
          hidden: dict[int, torch.Tensor], outputs: list[RowOutput]) -> None:
    """One LM head over the last head_positions of every row: outputs [h, V] each."""
    picked = [hidden[i][0, -rows[i].head_positions:] for i in active]  # [h_i, D]
    last = torch.cat(picked, dim=0) if len(picked) > 1 else picked[0]  # [sum h_i, D]
    fast = fused.head_logits(stack, last)  # a few rows: one compiled call
    logits, greedy = fast if fast is not None else (stack.logits_of(last), None)  # [sum h_i, V]
    begin = 0
    for i in active:
        end = begin + rows[i].head_positions
        outputs[i].out = logits[begin:end]
        if greedy is not None and end - begin == 1:
            outputs[i].greedy = int(greedy[begin])
        begin = end


def _embed(stack: UnitStack, rows: list[StepRow], active: tuple[int, ...],
           hidden: dict[int, torch.Tensor]) -> None:
    ids = torch.cat([rows[i].x for i in active], dim=1)  # [1, T]
    positions = torch.cat([rows[i].position_ids for i in active], dim=1)
    embedded = stack.embed(ids, positions)  # [1, T, D]
    begin = 0
    for i in active:
        end = begin + rows[i].tokens
        hidden[i] = embedded[:, begin:end]
        begin = end
