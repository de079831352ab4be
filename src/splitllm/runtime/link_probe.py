"""Measuring the path to the server: RTT from pings, both bandwidths from timed probes, and the
fixed cost of one visit to the server beyond them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from splitllm.planner.network import Link
from splitllm.runtime import protocol as wire
from splitllm.runtime.remote import receive
from splitllm.runtime.transport import Transport

PROBE_BYTES = 128 * 1024


def measure_link(transport: Transport, timeout_s: float = 30.0, *, pings: int = 5,
                 probe_bytes: int = PROBE_BYTES,
                 clock: Callable[[], float] = time.perf_counter) -> Link:
    """RTT (median of pings) and both bandwidths (timed probes) of the path to the server."""
    rtts = []
    for i in range(pings):
        start_s = clock()
        transport.send(wire.text({"type": "ping", "t": i}))
        receive(transport, "pong", timeout_s)
        rtts.append(clock() - start_s)
    rtt_s = statistics.median(rtts)
    start_s = clock()
    transport.send(wire.encode_frame({"type": "probe", "reply_bytes": 0}, bytes(probe_bytes)))
    receive(transport, "probe_reply", timeout_s)
    up_s = max(clock() - start_s - rtt_s, 1e-6)
    start_s = clock()
    transport.send(wire.encode_frame({"type": "probe", "reply_bytes": probe_bytes}))
    receive(transport, "probe_reply", timeout_s)
    down_s = max(clock() - start_s - rtt_s, 1e-6)
    return Link(uplink_bytes_per_s=probe_bytes / up_s,
                downlink_bytes_per_s=probe_bytes / down_s, rtt_s=rtt_s, name="measured")


def measure_visit_s(transport: Transport, n_units: int, timeout_s: float = 30.0, *,
                    visits: int = 5, clock: Callable[[], float] = time.perf_counter) -> float:
    """The fixed cost of one visit to the server beyond the round trip (median of `visits`).

    A visit that does next to no compute: one token id through the server's embedding, its
    hidden state back, each timed right after a ping so that both see the same load. What it
    takes beyond the ping's round trip is both sides' message handling (tensor framing and
    decoding, the session's bookkeeping, the engine's hand-off). 0 when the server has no
    session to spare for the probe (it is at capacity): unmeasured, not refused.
    """
    from splitllm.placement import CLIENT, SERVER, Placement
    from splitllm.runtime.remote import RemoteSession
    from splitllm.runtime.transport import ServerError

    try:
        remote = RemoteSession(transport, Placement(SERVER + CLIENT * (n_units - 1)), n_units,
                               timeout_s=timeout_s)
    except ServerError as exc:
        if exc.code != "busy":
            raise
        return 0.0
    extra_s = []
    try:
        for position in range(visits + 1):  # the first one warms up the session's path
            start_s = clock()
            transport.send(wire.text({"type": "ping", "t": position}))
            receive(transport, "pong", timeout_s)
            ping_s, start_s = clock() - start_s, clock()
            remote.forward((0, 1), torch.tensor([[position % 64]]), (position, position + 1),
                           return_logits=False)
            extra_s.append(clock() - start_s - ping_s)
    finally:
        remote.close()
    return max(statistics.median(extra_s[1:]), 0.0)
