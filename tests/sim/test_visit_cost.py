"""The per-visit cost of a link in the simulator's walk: the planner's crossing formula."""

from __future__ import annotations

from dataclasses import replace

import pytest

from splitllm.placement import Placement
from splitllm.planner.instance import evaluate
from splitllm.planner.network import session_open_s
from splitllm.sim import walk as walk_module
from splitllm.sim.builtin import builtin_world
from splitllm.sim.policies import request_instance
from splitllm.sim.walk import WalkBuilder
from splitllm.sim.world import World

VISIT_S = 0.004


def with_visit_cost(world: World, visit_s: float) -> World:
    clients = tuple(replace(c, link=replace(c.link, visit_s=visit_s)) for c in world.clients)
    return replace(world, clients=clients)


def test_the_walk_pays_each_visit_as_the_planner_does() -> None:
    plain = builtin_world("mixed")
    costly = with_visit_cost(plain, VISIT_S)
    rtype = next(t for t in costly.types if t.model is not None)
    t = costly.types.index(rtype)
    n = len(rtype.model.units) if rtype.model is not None else 0
    p, g = 64, 8
    multi = "C" + "S" * (n // 2) + "C" * 3 + "S" * (n - n // 2 - 5) + "C"
    for sides, visits in (("S" * n, 1), (multi, 2), ("C" * n, 0)):
        latency = {}
        for name, world in (("plain", plain), ("costly", costly)):
            walk = WalkBuilder(world).walk(t, 0, p, g, Placement(sides))
            latency[name] = sum(walk.gaps_s) + sum(walk.service_s)
            # At zero load a walk takes what the planner's cost model says.
            instance = request_instance(rtype, world.clients[0], world, p, g)
            assert latency[name] == pytest.approx(
                evaluate(instance, Placement(sides)).latency_s, rel=1e-9)
        assert latency["costly"] - latency["plain"] == pytest.approx(visits * g * VISIT_S)


def test_the_walk_opens_the_server_session_once_per_request_as_the_planner_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A walk with server jobs pays `session_open_s` of its link once, in the gap before its
    first job (a delay: the jobs' service is unchanged); a client-only walk opens nothing. At
    zero load the walk takes the planner's latency, which holds the same opening."""
    world = builtin_world("mixed")
    rtype = next(t for t in world.types if t.model is not None)
    t = world.types.index(rtype)
    n = len(rtype.model.units) if rtype.model is not None else 0
    link = world.clients[0].link
    opening = session_open_s(link)
    assert opening == link.rtt_s > 0
    p, g = 64, 8
    multi = "C" + "S" * (n // 2) + "C" * 3 + "S" * (n - n // 2 - 5) + "C"
    cases = (("S" * n, 1), (multi, 1), ("C" * n, 0))
    walks = {sides: WalkBuilder(world).walk(t, 0, p, g, Placement(sides)) for sides, _ in cases}
    monkeypatch.setattr(walk_module, "session_open_s", lambda link: 0.0)
    for sides, opened in cases:
        walk, bare = walks[sides], WalkBuilder(world).walk(t, 0, p, g, Placement(sides))
        assert walk.gaps_s[0] - bare.gaps_s[0] == pytest.approx(opened * opening)
        assert walk.gaps_s[1:] == bare.gaps_s[1:] and walk.service_s == bare.service_s
        instance = request_instance(rtype, world.clients[0], world, p, g)
        assert instance.session_open_s == opening
        plan = evaluate(instance, Placement(sides))
        assert sum(walk.gaps_s) + sum(walk.service_s) == pytest.approx(plan.latency_s, rel=1e-9)
