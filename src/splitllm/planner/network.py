"""The network between a client and the server: the Link value and the one crossing formula.

A switch between the sides in one direction costs `passes * rtt_s / 2 + bytes / bandwidth`:
each forward pass pays the one-way delay, and the bytes (totalled over all passes) pay the
bandwidth of that direction. A switch up is a visit to the server: each pass also pays the
link's `visit_s`, the fixed cost of one message on both sides (framing, (de)serialisation,
hand-offs), a per-segment constant like the delay. The planner (instance evaluation, solver
cost arrays), the simulator's walks and the runtime's emulated link all call `crossing_s`;
only the independent checks (the MILP, the tests' brute force) restate it on purpose.

A request that runs any unit on the server first opens its session there: one more round trip
(`session_open_s`, an `open` up and `opened` down), paid once per request before its first
pass; a request that stays on the client opens none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

Amount = TypeVar("Amount", float, np.ndarray)  # a plain float, or an array taken elementwise


@dataclass(frozen=True, kw_only=True)
class Link:
    """A client's network path to the server (a preset, a profile file, or measured)."""

    uplink_bytes_per_s: float
    downlink_bytes_per_s: float
    rtt_s: float
    # Fixed seconds of one visit to the server per pass beyond the round trip: both sides'
    # message handling (framing, (de)serialisation, the engine's hand-off). Measured at connect.
    visit_s: float = 0.0
    name: str = field(default="link", compare=False)  # a label: links that cost the same are equal


def crossing_s(
    link: Link, up: bool, nbytes: Amount, passes: float = 1, server_wait_s: float = 0.0
) -> Amount:
    """Seconds of one switch in one direction over `passes` passes (elementwise on arrays).

    Going up (a visit), each pass also pays the link's `visit_s` and may wait `server_wait_s`
    in the server's queue.
    """
    if up:
        return (passes * (link.rtt_s / 2 + link.visit_s + server_wait_s)
                + nbytes / link.uplink_bytes_per_s)
    return passes * link.rtt_s / 2 + nbytes / link.downlink_bytes_per_s


def session_open_s(link: Link, up_bytes: float = 0.0, down_bytes: float = 0.0) -> float:
    """Seconds of opening a request's server session: one round trip with the `open` and
    `opened` messages' bytes (a few hundred: < 1 ms on 4G; callers that know them pass them).
    No visit's fixed cost: an open runs no units, and measured it takes its round trip alone
    (emulated 4g: 52.2 ms against an RTT of 51.4 ms; wifi: 6.5 ms against 7.6 ms)."""
    bare = replace(link, visit_s=0.0)
    return float(crossing_s(bare, True, up_bytes) + crossing_s(bare, False, down_bytes))


def carried_bytes(input_bytes: float, out_bytes: Sequence[float], output_bytes: float
                  ) -> np.ndarray:
    """[L + 1] bytes on the edge into unit l: the input, then unit l - 1's output; edge L
    carries the result back to the client."""
    return np.array([input_bytes, *out_bytes[:-1], output_bytes], dtype=float)


@dataclass(frozen=True, kw_only=True)
class Switches:
    """Seconds of switching on each edge: edge l leads into unit l, edge L back to the client."""

    up_s: np.ndarray  # [L + 1]
    down_s: np.ndarray  # [L + 1]


def switch_costs(link: Link, carried: np.ndarray, passes: float, server_wait_s: float = 0.0
             ) -> Switches:
    """What a switch up or down costs on every edge; carried [L + 1] from `carried_bytes`."""
    return Switches(up_s=crossing_s(link, True, carried, passes, server_wait_s),
                    down_s=crossing_s(link, False, carried, passes))


def path_network_s(on_server: np.ndarray, edges: Switches) -> float:
    """Seconds a path spends crossing: every switch, from the input on the client to the result
    back on it. on_server [L] bool."""
    sides = np.concatenate(([False], on_server, [False]))  # [L + 2]: starts and ends on C
    up = sides[1:]  # [L + 1]: the edge into unit l arrives on the server
    seconds = np.where(up, edges.up_s, edges.down_s)[sides[:-1] != up]
    return float(sum(seconds.tolist()))  # in path order, as a walk adds them up


def visits(on_server: np.ndarray) -> int:
    """Visits to the server (switches up) of a path that starts on the client; on_server [L]."""
    sides = np.concatenate(([False], on_server))  # [L + 1]
    return int(np.count_nonzero(sides[1:] & ~sides[:-1]))
