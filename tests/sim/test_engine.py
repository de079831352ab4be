"""The event core: one table of event kinds, handlers dispatched by kind in time order."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from splitllm.sim import engine
from splitllm.sim.engine import EventQueue, Kind, NewEvent


def test_the_handler_table_follows_the_kinds_and_needs_every_one() -> None:
    seen: list[tuple[Kind, float]] = []

    def recorder(kind: Kind) -> engine.Handler:
        def handle(now_s: float, a: int, b: int) -> Iterable[NewEvent] | None:
            seen.append((kind, now_s))
            # an arrival at 0 sends its job to the server at 1; the server wakes at 2
            return [(now_s + 1.0, kind + 1, a, b)] if kind < Kind.SERVER_WAKE else None
        return handle

    table = engine.handler_table({k: recorder(k) for k in reversed(Kind)})
    queue = EventQueue()
    queue.push(0.0, Kind.ARRIVE)
    assert engine.run(queue, table) == 2.0
    assert seen == [(Kind.ARRIVE, 0.0), (Kind.AT_SERVER, 1.0), (Kind.SERVER_WAKE, 2.0)]
    with pytest.raises(KeyError):
        engine.handler_table({Kind.ARRIVE: recorder(Kind.ARRIVE)})
