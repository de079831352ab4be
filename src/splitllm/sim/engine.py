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


def pop_due(jobs: list[Any], virtual_s: float) -> list[Any]:
    """From a heap of (virtual finish, ...) jobs under processor sharing: the head job, which a
    wake-up was for, and every other one due by `virtual_s` (finishing together, to rounding)."""
    done = [heapq.heappop(jobs)]
    limit = virtual_s * (1 + REL_EPS) + REL_EPS
    while jobs and jobs[0][0] <= limit:
        done.append(heapq.heappop(jobs))
    return done
