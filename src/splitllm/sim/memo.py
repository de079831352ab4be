"""Caches shared by all runs in one process: plans and walks do not depend on the arrival rate.

A capacity search simulates the same world at many rates; without sharing, every probe would
plan every kind of request again. Tables are keyed by what their entries depend on (the
server device, the client classes and the request types, plus e.g. the policy), and the least
recently used tables are dropped beyond `MAX_TABLES`; each user bounds its own table's size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from splitllm.sim.world import World

MAX_TABLES = 16
_TABLES: OrderedDict[Hashable, dict[Any, Any]] = OrderedDict()


def planning_key(world: World) -> Hashable:
    """What plans and walks depend on: the server (device, scheduling, measured steps),
    clients, request types, headroom."""
    return (world.server, world.clients, world.types, world.plan_headroom)


def table(*key: Hashable) -> dict[Any, Any]:
    """The shared dict for `key`, created empty the first time."""
    found = _TABLES.get(key)
    if found is None:
        found = _TABLES[key] = {}
        while len(_TABLES) > MAX_TABLES:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return found


def bounded_put(cache: dict[Any, Any], key: Hashable, value: Any, limit: int) -> None:
    """Store an entry, emptying the table first when it is full (entries are cheap to redo)."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
