"""Speculative decoding in the cost model: fewer, wider decode passes."""

from __future__ import annotations

import math

import pytest

from splitllm.placement import Placement
from splitllm.planner.configs import load_model_config
from splitllm.planner.costs import model_costs
from splitllm.planner.hardware import device_preset, link_preset
from splitllm.planner.instance import Instance, Request, build_instance, evaluate
from splitllm.planner.solvers import compare
from splitllm.planner.speculation import Speculation, decode_passes, measured_hit_rate

COSTS = model_costs(load_model_config("llama-3-8b"))


def instance(speculation: Speculation | None, sla_s: float = 30.0, link: str = "4g") -> Instance:
    request = Request(prompt_tokens=512, output_tokens=128, sla_s=sla_s,
                      speculation=speculation)
    return build_instance(COSTS, device_preset("laptop"), device_preset("datacenter-gpu"),
                          link_preset(link), request)


def test_expected_tokens_per_pass_is_the_geometric_sum_of_the_hit_rate() -> None:
    assert Speculation(draft_tokens=3, hit_rate=0.5).tokens_per_pass == pytest.approx(1.875)
    assert Speculation(draft_tokens=4, hit_rate=1.0).tokens_per_pass == 5
    assert Speculation(draft_tokens=8, hit_rate=0.0).tokens_per_pass == 1
    assert decode_passes(127, Speculation(draft_tokens=4, hit_rate=1.0)) == 26
    assert decode_passes(127, None) == 127


def test_no_drafts_cost_exactly_what_plain_decoding_costs() -> None:
    assert instance(Speculation(draft_tokens=0, hit_rate=0.9)) == instance(None)


def test_passes_shrink_and_rejected_drafts_still_cost_server_work() -> None:
    plain, hits = instance(None), instance(Speculation(draft_tokens=4, hit_rate=0.7))
    misses = instance(Speculation(draft_tokens=4, hit_rate=0.0))
    assert plain.passes == 128
    assert hits.passes == 1 + math.ceil(127 / 2.7731)
    assert misses.passes == 128
    split = Placement("S" * 20 + "C" * 14)
    with_hits, without = evaluate(hits, split), evaluate(plain, split)
    assert with_hits.network_s < without.network_s  # a third of the round trips
    all_server = Placement("S" * 34)
    # Five positions per pass where one was needed: never cheaper, and more FLOPs.
    assert evaluate(misses, all_server).server_work > evaluate(plain, all_server).server_work


def test_the_exact_plan_with_speculation_puts_more_units_on_the_client() -> None:
    plain = compare(instance(None), "exact", 0.001)["exact"]
    fast = compare(instance(Speculation(draft_tokens=4, hit_rate=0.7)), "exact", 0.001)["exact"]
    assert plain is not None and fast is not None
    assert fast.latency_s <= 30.0 and plain.latency_s <= 30.0
    assert str(fast.placement).count("C") > str(plain.placement).count("C")
    assert fast.server_work < plain.server_work


def test_the_measured_hit_rate_gives_back_the_tokens_per_pass() -> None:
    for k, rate in ((4, 0.7), (1, 0.3), (8, 0.95), (3, 0.01)):
        tokens_per_pass = Speculation(draft_tokens=k, hit_rate=rate).tokens_per_pass
        assert measured_hit_rate(k, tokens_per_pass) == pytest.approx(rate, abs=1e-9)
    assert measured_hit_rate(4, 1.0) == 0.0  # no draft ever accepted
    assert measured_hit_rate(4, 5.0) == 1.0  # every draft accepted
    assert measured_hit_rate(0, 2.0) == 0.0
