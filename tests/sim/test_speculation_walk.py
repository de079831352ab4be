"""The simulator's walk models speculative decoding as the planner does."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from sim_kit import tiny_world

from splitllm.placement import Placement
from splitllm.planner.instance import Request, build_instance, evaluate
from splitllm.planner.speculation import Speculation
from splitllm.sim.builtin import MIXED, builtin_world
from splitllm.sim.scenario import load_scenario
from splitllm.sim.walk import WalkBuilder


def test_the_walk_takes_fewer_wider_passes_and_agrees_with_the_planner() -> None:
    world = tiny_world((0.0,), prompt=8, output=9)
    spec = Speculation(draft_tokens=3, hit_rate=1.0)
    fast_world = replace(world, types=(replace(world.types[0], speculation=spec),))
    model = world.types[0].model
    assert model is not None
    placement = Placement("CSC" + "S" * (len(model.units) - 3))
    plain = WalkBuilder(world).walk(0, 0, 8, 9, placement)
    fast = WalkBuilder(fast_world).walk(0, 0, 8, 9, placement)
    assert fast.jobs < plain.jobs  # 1 + ceil(8 / 4) passes instead of 9
    request = Request(prompt_tokens=8, output_tokens=9, speculation=spec)
    rtype, client = fast_world.types[0], fast_world.clients[0]
    assert rtype.model is not None
    planned = evaluate(build_instance(rtype.model, client.device, fast_world.server.device,
                                      client.link, request), placement)
    assert sum(fast.gaps_s) + sum(fast.service_s) == pytest.approx(planned.latency_s, rel=1e-9)


def test_a_scenario_gives_each_request_type_its_drafts_and_hit_rate(tmp_path: Path) -> None:
    doc = copy.deepcopy(MIXED)
    doc["request_types"][0]["speculation"] = {"draft_tokens": 4, "hit_rate": 0.7}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    world = load_scenario(path)
    assert world.types[0].speculation == Speculation(draft_tokens=4, hit_rate=0.7)
    assert all(t.speculation is None for t in world.types[1:])
    model = world.types[0].model
    assert model is not None
    placement = Placement("C" + "S" * (len(model.units) - 2) + "C")
    fast = WalkBuilder(world).walk(0, 0, 300, 64, placement)
    plain = WalkBuilder(builtin_world("mixed")).walk(0, 0, 300, 64, placement)
    assert fast.jobs < plain.jobs  # 1 + ceil(63 / E) passes instead of 64, E = 2.77
