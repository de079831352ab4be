"""Built-in scenarios: `mixed` (a simulated request mix) and `paper` (the planning grid).

`mixed` is written as the same document a scenario file holds and goes through the same
validation, so `splitllm simulate --scenario mixed` and a file with this content agree.
"""

from __future__ import annotations

from typing import Any

from splitllm.sim.scenario import parse_scenario, resolve
from splitllm.sim.world import World

# One datacenter GPU serving, one job at a time (like the runtime's server with workers=1),
# three kinds of clients and five kinds of requests. Rates are chosen by the capacity search;
# at those rates the server, not the clients, saturates first (see docs/paper-grid.md).
MIXED: dict[str, Any] = {
    "name": "mixed",
    "seed": 7,
    "duration_s": 300,
    "warmup_s": 30,
    "server": {"device": "datacenter-gpu", "scheduler": "fcfs", "workers": 1},
    "clients": [
        {"name": "phone-4g", "device": "phone", "link": "4g", "share": 0.5},
        {"name": "laptop-wifi", "device": "laptop", "link": "wifi", "share": 0.3},
        {"name": "edge-lan", "device": "edge-box", "link": "lan", "share": 0.2},
    ],
    "request_types": [
        {"name": "chat", "model": "llama-3-8b", "share": 0.35, "sla_s": 20,
         "prompt_tokens": {"dist": "uniform", "low": 64, "high": 512},
         "output_tokens": {"dist": "choice", "values": [32, 64, 128]}},
        {"name": "summarize", "model": "llama-3-8b", "share": 0.10, "sla_s": 40,
         "prompt_tokens": {"dist": "uniform", "low": 1024, "high": 4096},
         "output_tokens": 128},
        {"name": "classify", "model": "bert-base", "share": 0.25, "sla_s": 0.5,
         "prompt_tokens": 128},
        {"name": "vision", "model": "vit-base", "share": 0.15, "sla_s": 0.5,
         "prompt_tokens": 197},
        {"name": "small-chat", "model": "smollm2-135m", "share": 0.15, "sla_s": 8,
         "prompt_tokens": {"dist": "uniform", "low": 64, "high": 512}, "output_tokens": 64},
    ],
    "arrivals": {"process": "poisson", "rate_per_s": 1.0},
    # Plans keep 20% of each SLA for queueing: plans made for an idle server sit exactly on the
    # SLA and miss it under any load (see docs/simulator.md for the same study at 0).
    "plan_headroom": 0.2,
    "sweep": {"target_attainment": 0.9, "rel_tol": 0.03},
}


def builtin_world(name: str) -> World:
    """The world of a built-in simulated scenario (`mixed`)."""
    if name != "mixed":
        raise ValueError(f"no built-in simulated scenario {name!r}")
    return resolve(parse_scenario(MIXED, "mixed"))
