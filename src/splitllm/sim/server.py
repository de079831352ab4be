"""Server scheduling models: how the jobs queued on the server share it.

A job is one visit of one request to the server in one pass (a server segment), exactly what
the real server handles as one message. Each model takes `arrive(now, r, j, service_s)` and its
own wake-up events `wake(now, a, b)`, both returning new events for the engine, and calls
`on_done(now, r, j, charge, rows, held_s)` as each job completes (`charge`: server-seconds
charged to the job per second of its solo service time; 1 except in batches, where a step's time
is shared; `rows`: the jobs its step served, 1 except in batches; `held_s`: the seconds of the
service that completed it, so that it started at `now - held_s`: its step's in a batch, else
None for its solo service time, the equivalent under processor sharing).

- `fcfs`: first come, first served on `workers` identical workers.
- `ps`: processor sharing: n jobs present each progress at 1/n speed (virtual time).
- `batched`: one step serves the waiting jobs of up to `max_batch` sessions at once; its time
  is the roofline of the batch, unit by unit: weights of a unit read once per step, every
  session's KV cache read, every session's FLOPs (see `batching.step_s`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from splitllm.sim.batching import BatchCost, JobShape
from splitllm.sim.engine import Kind, NewEvent, Sharing
from splitllm.sim.world import ServerSpec

WAKE = Kind.SERVER_WAKE  # the event every scheduling model schedules for itself
OnDone = Callable[[float, int, int, float, int, "float | None"], "NewEvent | None"]
SOLO = 1.0  # a job served alone is charged its own service time


class BusyMeter:
    """Busy server-seconds, in total and within the measurement window [lo, hi]."""

    __slots__ = ("hi", "lo", "total_s", "window_s")

    def __init__(self, lo_s: float, hi_s: float) -> None:
        self.lo, self.hi = lo_s, hi_s
        self.total_s = 0.0
        self.window_s = 0.0

    def add(self, start_s: float, end_s: float) -> None:
        """Count one busy interval."""
        self.total_s += end_s - start_s
        overlap = min(end_s, self.hi) - max(start_s, self.lo)
        if overlap > 0:
            self.window_s += overlap


class FcfsServer:
    """First come, first served on `workers` workers."""

    def __init__(self, spec: ServerSpec, on_done: OnDone, busy: BusyMeter) -> None:
        self.free = spec.workers
        self.capacity = spec.workers
        self.queue: deque[tuple[int, int, float]] = deque()
        self.on_done, self.busy = on_done, busy

    def arrive(self, now_s: float, r: int, j: int, service_s: float) -> list[NewEvent] | None:
        if self.free:
            self.free -= 1
            self.busy.add(now_s, now_s + service_s)
            return [(now_s + service_s, WAKE, r, j)]
        self.queue.append((r, j, service_s))
        return None

    def wake(self, now_s: float, r: int, j: int) -> list[NewEvent]:
        out: list[NewEvent] = []
        svc = self.queue
        if svc:
            r2, j2, s2 = svc.popleft()
            self.busy.add(now_s, now_s + s2)
            out.append((now_s + s2, WAKE, r2, j2))
        else:
            self.free += 1
        nxt = self.on_done(now_s, r, j, SOLO, 1, None)
        if nxt is not None:
            out.append(nxt)
        return out


class PsServer:
    """Processor sharing, by virtual time: each of n jobs gets 1/n of the server."""

    def __init__(self, spec: ServerSpec, on_done: OnDone, busy: BusyMeter) -> None:
        self.sharing = Sharing(1.0, WAKE, lambda began_s, now_s, _n: busy.add(began_s, now_s))
        self.on_done = on_done

    def arrive(self, now_s: float, r: int, j: int, service_s: float) -> list[NewEvent]:
        wake = self.sharing.push(now_s, r, j, service_s)
        return [] if wake is None else [wake]

    def wake(self, now_s: float, version: int, _b: int) -> list[NewEvent] | None:
        woken = self.sharing.wake(now_s, version)
        if woken is None:
            return None
        done, wake = woken
        out = [] if wake is None else [wake]
        for _finish, _seq, r, j, _tag in done:
            nxt = self.on_done(now_s, r, j, SOLO, 1, None)
            if nxt is not None:
                out.append(nxt)
        return out


class BatchedServer:
    """Steps that each serve the jobs waiting when the step starts (up to `max_batch`)."""

    def __init__(self, spec: ServerSpec, on_done: OnDone, busy: BusyMeter,
                 shape: Callable[[int, int], JobShape], cost: BatchCost,
                 slowdown: Callable[[], float] | None = None) -> None:
        self.max_batch = spec.max_batch
        self.slowdown = slowdown  # a step's time x this when it starts (co-located clients)
        self.queue: deque[tuple[int, int, float]] = deque()
        self.running: list[tuple[int, int, float]] = []
        self.step_s = 0.0
        self.on_done, self.busy, self.shape, self.cost = on_done, busy, shape, cost

    def _start(self, now_s: float) -> list[NewEvent]:
        take = min(self.max_batch, len(self.queue))
        batch = [self.queue.popleft() for _ in range(take)]
        self.running = batch
        self.step_s = self.cost.step_s([self.shape(r, j) for r, j, _ in batch])
        if self.slowdown is not None:
            self.step_s *= self.slowdown()
        self.busy.add(now_s, now_s + self.step_s)
        return [(now_s + self.step_s, WAKE, 0, 0)]

    def arrive(self, now_s: float, r: int, j: int, service_s: float) -> list[NewEvent] | None:
        self.queue.append((r, j, service_s))
        return None if self.running else self._start(now_s)

    def wake(self, now_s: float, _a: int, _b: int) -> list[NewEvent]:
        batch, step_s = self.running, self.step_s
        self.running = []
        out = self._start(now_s) if self.queue else []
        solo_total = sum(s for _, _, s in batch)
        charge = step_s / solo_total if solo_total > 0 else SOLO  # shared by solo times
        for r, j, _ in batch:
            nxt = self.on_done(now_s, r, j, charge, len(batch), step_s)
            if nxt is not None:
                out.append(nxt)
        return out


Server = FcfsServer | PsServer | BatchedServer


def make_server(spec: ServerSpec, on_done: OnDone, busy: BusyMeter,
                shape: Callable[[int, int], JobShape], cost: BatchCost | None,
                slowdown: Callable[[], float] | None = None) -> Server:
    """The scheduling model the spec names (`slowdown`: batched steps' time factor, read as
    each step starts)."""
    if spec.scheduler == "fcfs":
        return FcfsServer(spec, on_done, busy)
    if spec.scheduler == "ps":
        return PsServer(spec, on_done, busy)
    if spec.scheduler == "batched" and cost is not None:
        return BatchedServer(spec, on_done, busy, shape, cost, slowdown)
    raise ValueError(f"unknown scheduler {spec.scheduler!r}")
