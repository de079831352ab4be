"""Measuring the path to the server: RTT from pings, both bandwidths from timed probes."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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
