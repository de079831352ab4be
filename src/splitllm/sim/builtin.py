"""Built-in scenarios: `mixed` (a simulated request mix), `azure-conv` and `azure-code` (the
Azure LLM inference traces replayed) and `paper` (the planning grid).

Each simulated one is written as the same document a scenario file holds and goes through the
same validation, so `splitllm simulate --scenario mixed` and a file with this content agree.
The Azure traces (the first rows of each, in `splitllm/data/`) are CC-BY 4.0: Patel et al.,
"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024.
"""

from __future__ import annotations

import copy
from pathlib import Path
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


DATA = Path(__file__).resolve().parents[1] / "data"
THIRDS = [  # a third each of phones on 4G, laptops on Wi-Fi and edge boxes on a LAN
    {"name": "phone-4g", "device": "phone", "link": "4g", "share": 1},
    {"name": "laptop-wifi", "device": "laptop", "link": "wifi", "share": 1},
    {"name": "edge-lan", "device": "edge-box", "link": "lan", "share": 1},
]


def azure(name: str, trace: str, limits: dict[str, float], rows: int,
          probe_requests: int) -> dict[str, Any]:
    """A scenario replaying the first `rows` requests of an Azure trace: Llama-3-8B (fp16,
    8k context: prompts capped at 4,000 tokens, outputs at 500) on one datacenter GPU, every
    request held to `limits` (sla_s, ttft_s, tpot_s), each capacity probe replaying at least
    `probe_requests` of them."""
    return {
        "name": name,
        "seed": 5,
        "duration_s": 300,
        "warmup_s": 60,
        "server": {"device": "datacenter-gpu", "scheduler": "ps"},
        "clients": copy.deepcopy(THIRDS),
        "request_types": [{
            "name": "llama", "model": "llama-3-8b", **limits,
            # what the trace's rows replace; the range lets plans round token counts up
            "prompt_tokens": {"dist": "uniform", "low": 1, "high": 4000},
            "output_tokens": {"dist": "uniform", "low": 1, "high": 500},
        }],
        "arrivals": {"process": "trace", "path": str(DATA / trace), "format": "azure",
                     "rows": rows, "max_prompt_tokens": 4000, "max_output_tokens": 500},
        "plan_headroom": 0.2,
        "sweep": {"target_attainment": 0.9, "rel_tol": 0.03, "min_requests": probe_requests},
    }


BUILTINS: dict[str, dict[str, Any]] = {
    "mixed": MIXED,
    # A probe must hold the trace's bursts. The conversation trace is smooth (its busiest 10 s
    # hold 1.5x its mean rate): a window of 300 requests measures it. The code trace is not
    # (its busiest 10 s hold 12x its mean; 77% of its requests arrive in a fifth of its
    # span): a window would measure only the bursts it happens to hold, so every probe
    # replays all 3,000 requests.
    "azure-conv": azure("azure-conv", "azure_conv_2023_head.csv", {"sla_s": 60.0}, 3000, 300),
    "azure-code": azure("azure-code", "azure_code_2023_head.csv", {"sla_s": 60.0}, 3000, 3000),
}


def builtin_document(name: str) -> dict[str, Any]:
    """A copy of a built-in simulated scenario's document."""
    if name not in BUILTINS:
        raise ValueError(f"no built-in simulated scenario {name!r}")
    return copy.deepcopy(BUILTINS[name])


def builtin_world(name: str) -> World:
    """The world of a built-in simulated scenario (see BUILTINS)."""
    return resolve(parse_scenario(builtin_document(name), name))
