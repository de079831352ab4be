"""Shared fixtures of the planner tests (the helpers themselves live in planner_kit.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from planner_kit import BruteForce, brute_force, random_instance

from splitllm.planner.instance import Instance


@pytest.fixture(scope="session")
def make_instance() -> Callable[..., Instance]:
    """random_instance(rng, n, *, mem, pins, phases, passes, server_wait, integer_work, sla_s)."""
    return random_instance


@pytest.fixture(scope="session")
def oracle() -> Callable[[Instance], BruteForce]:
    """brute_force(instance): every placement scored from the spec."""
    return brute_force
