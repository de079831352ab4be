"""The one crossing formula: scalars and arrays agree, and a path pays each switch once."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from splitllm.planner.network import (
    Link,
    carried_bytes,
    crossing_s,
    path_network_s,
    switch_costs,
)

LINK = Link(uplink_bytes_per_s=1000.0, downlink_bytes_per_s=4000.0, rtt_s=0.2)


def test_a_crossing_is_passes_half_rtts_plus_bytes_over_bandwidth() -> None:
    assert crossing_s(LINK, True, 500.0, passes=3) == pytest.approx(3 * 0.1 + 0.5)
    assert crossing_s(LINK, False, 500.0, passes=3) == pytest.approx(3 * 0.1 + 0.125)
    assert crossing_s(LINK, True, 0.0, passes=2, server_wait_s=0.05) == pytest.approx(0.3)
    assert crossing_s(LINK, False, 0.0, passes=2, server_wait_s=0.05) == pytest.approx(0.2)


def test_arrays_cross_elementwise() -> None:
    nbytes = np.array([0.0, 100.0, 2500.0])
    for up in (True, False):
        together = crossing_s(LINK, up, nbytes, passes=2, server_wait_s=0.01)
        one_by_one = [crossing_s(LINK, up, float(b), passes=2, server_wait_s=0.01)
                      for b in nbytes]
        assert together.tolist() == one_by_one


def test_a_path_pays_every_switch_and_the_way_back() -> None:
    carried = carried_bytes(10.0, [100.0, 200.0, 300.0], 4.0)  # [input, out0, out1, result]
    assert carried.tolist() == [10.0, 100.0, 200.0, 4.0]
    up, down = partial(crossing_s, LINK, True, passes=2), partial(crossing_s, LINK, False, passes=2)
    cases = {
        "CCC": 0.0,
        "SSS": up(10.0) + down(4.0),
        "CSC": up(100.0) + down(200.0),
        "SCS": up(10.0) + down(100.0) + up(200.0) + down(4.0),
    }
    for sides, expected in cases.items():
        on_server = np.array([s == "S" for s in sides])
        edges = switch_costs(LINK, carried, passes=2)
        assert path_network_s(on_server, edges) == pytest.approx(expected)


def test_a_link_is_equal_to_another_of_the_same_costs_whatever_its_name() -> None:
    assert Link(name="4g", uplink_bytes_per_s=1000.0, downlink_bytes_per_s=4000.0,
                rtt_s=0.2) == LINK
