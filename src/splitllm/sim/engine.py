"""The discrete-event core: one heap of `(time_s, seq, kind, a, b)`; handlers return new events.

An event is a plain tuple so the hot loop allocates nothing but the tuples themselves. `kind`
indexes the handler table; `a` and `b` are two integers the handler interprets (a request id
and a job index, say). `seq` breaks ties in time by insertion order, which keeps runs
deterministic and never compares handlers or payloads.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from enum import IntEnum
from typing import Any

NewEvent = tuple[float, int, int, int]  # (time_s, kind, a, b): what a handler asks for


class Kind(IntEnum):
    """The kinds of event of a simulation run, in the order of its handler table."""

    ARRIVE = 0  # a request arrives: a = request
    AT_SERVER = 1  # a request's job reaches the server: a = request, b = job
    SERVER_WAKE = 2  # the server model's own wake-up (a job or a step ends): a, b are its own
    CLIENT_WAKE = 3  # the shared client cores' wake-up (`client_host`): a, b are its own
    CLIENT_POLL = 4  # the clients' process reads the server's load (`client_host`)


def handler_table(handlers: dict[Kind, Handler]) -> list[Handler]:
    """The handlers as `run` indexes them, one for every kind."""
    return [handlers[kind] for kind in Kind]
Handler = Callable[[float, int, int], Iterable[NewEvent] | None]


class EventQueue:
    """A time-ordered heap of events, stable for equal times."""

    __slots__ = ("heap", "popped", "pushed")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.pushed = 0
        self.popped = 0

    def push(self, time_s: float, kind: int, a: int = 0, b: int = 0) -> None:
        """Schedule one event."""
        self.pushed += 1
        heapq.heappush(self.heap, (time_s, self.pushed, kind, a, b))

    def __len__(self) -> int:
        return len(self.heap)


def run(queue: EventQueue, handlers: Sequence[Handler], until_s: float = float("inf")) -> float:
    """Pop events in time order and dispatch them until the heap is empty or time passes `until_s`.

    Returns the time of the last event handled. Events later than `until_s` stay in the heap.
    """
    heap = queue.heap
    pop, push = heapq.heappop, heapq.heappush
    seq = queue.pushed
    popped = 0
    now_s = 0.0
    while heap:
        if heap[0][0] > until_s:
            break
        now_s, _, kind, a, b = pop(heap)
        popped += 1
        new = handlers[kind](now_s, a, b)
        if new:
            for event in new:
                seq += 1
                push(heap, (event[0], seq, event[1], event[2], event[3]))
    queue.pushed = seq
    queue.popped += popped
    return now_s


REL_EPS = 1e-12


Progressed = Callable[[float, float, int], None]  # (began_s, now_s, jobs present in between)


class Sharing:
    """Processor sharing on `cores` cores, by virtual time: each of the n jobs present
    progresses at min(1, cores / n) seconds of work per second. It schedules its own wake-ups
    (events of `kind`, a = its version, so a stale one is ignored); jobs are (virtual finish,
    seq, a, b, tag) in a heap; `progressed` hears of every interval that had jobs."""

    def __init__(self, cores: float, kind: Kind, progressed: Progressed) -> None:
        self.cores, self.kind, self.progressed = cores, kind, progressed
        self.jobs: list[tuple[float, int, int, int, int]] = []
        self.virtual_s = 0.0  # work each job present has received
        self.last_s = 0.0
        self.version = 0
        self.seq = 0

    def _advance(self, now_s: float) -> None:
        n = len(self.jobs)
        if n:  # n <= cores: each at full speed; else cores / n (1 / n on one core, exactly)
            elapsed_s = now_s - self.last_s
            self.virtual_s += elapsed_s if n <= self.cores else elapsed_s * self.cores / n
            self.progressed(self.last_s, now_s, n)
        self.last_s = now_s

    def _next(self, now_s: float) -> NewEvent | None:
        self.version += 1  # any earlier wake-up is now stale
        if not self.jobs:
            return None
        n, left_s = len(self.jobs), max(self.jobs[0][0] - self.virtual_s, 0.0)
        return (now_s + (left_s if n <= self.cores else left_s * n / self.cores), self.kind,
                self.version, 0)

    def push(self, now_s: float, a: int, b: int, work_s: float, tag: int = 0) -> NewEvent | None:
        """A job of `work_s` seconds of work starts now: the next wake-up."""
        self._advance(now_s)
        self.seq += 1
        heapq.heappush(self.jobs, (self.virtual_s + work_s, self.seq, a, b, tag))
        return self._next(now_s)

    def wake(self, now_s: float, version: int
             ) -> tuple[list[tuple[float, int, int, int, int]], NewEvent | None] | None:
        """At a wake-up: the jobs done and the next wake-up (None: a stale wake-up)."""
        if version != self.version:
            return None
        self._advance(now_s)
        done = pop_due(self.jobs, self.virtual_s)
        return done, self._next(now_s)


def pop_due(jobs: list[Any], virtual_s: float) -> list[Any]:
    """From a heap of (virtual finish, ...) jobs under processor sharing: the head job, which a
    wake-up was for, and every other one due by `virtual_s` (finishing together, to rounding)."""
    done = [heapq.heappop(jobs)]
    limit = virtual_s * (1 + REL_EPS) + REL_EPS
    while jobs and jobs[0][0] <= limit:
        done.append(heapq.heappop(jobs))
    return done
