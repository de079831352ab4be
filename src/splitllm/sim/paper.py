"""The reference work's planning sweep: server workload of each policy at zero load on a grid.

Per model, every combination of sequence length, SLA, client-to-server speed ratio and link
is one grid point: one request, planned by every policy. The SLA of a point is `slack` times
the latency of running everything on the server for that request, so server-only is always
feasible and every reduction is measured against a plan that meets the same SLA. The client
is the server device scaled down by `speed ratio` in FLOP/s and memory bandwidth, with
`client_memory_bytes` of memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from splitllm.placement import Placement
from splitllm.planner.configs import load_model_config
from splitllm.planner.costs import model_costs
from splitllm.planner.hardware import DeviceProfile, device_preset, link_preset
from splitllm.planner.instance import Request, build_instance, evaluate
from splitllm.planner.solvers import solve

POLICIES = ("server-only", "greedy", "best-single-cut", "exact")


@dataclass(frozen=True)
class PaperGrid:
    """The grid swept (see docs/paper-grid.md)."""

    models: tuple[str, ...] = ("transformer-base", "bert-base", "gpt2", "vit-base",
                               "smollm2-135m", "llama-3-8b")
    prompt_tokens: tuple[int, ...] = (32, 128, 512)  # text models' sequence lengths
    vit_patches: tuple[int, ...] = (50, 197, 577)  # 112, 224, 384 px images, 16 px patches
    output_tokens: int = 32  # decoders generate this many tokens
    sla_slack: tuple[float, ...] = (1.1, 1.5, 2.0, 3.0)  # SLA = slack x server-only latency
    speed_ratio: tuple[float, ...] = (3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)  # server / client
    links: tuple[str, ...] = ("lan", "wifi", "5g", "4g")
    server: str = "datacenter-gpu"
    client_memory_bytes: float = 8e9

    def quick(self) -> PaperGrid:
        """A small grid for tests and CI (48 points)."""
        return replace(self, prompt_tokens=(128,), vit_patches=(197,), sla_slack=(1.5, 3.0),
                       speed_ratio=(10.0, 30.0), links=("wifi", "4g"))

    def lengths(self, model: str) -> tuple[int, ...]:
        return self.vit_patches if model == "vit-base" else self.prompt_tokens

    @property
    def size(self) -> int:
        per_model = len(self.sla_slack) * len(self.speed_ratio) * len(self.links)
        return sum(len(self.lengths(m)) * per_model for m in self.models)


@dataclass(frozen=True)
class PaperPoint:
    """One grid point: its parameters and each policy's server work (nan: no feasible plan)."""

    model: str
    prompt_tokens: int
    sla_slack: float
    speed_ratio: float
    link: str
    sla_s: float
    server_work_s: tuple[float, ...]  # per POLICIES
    latency_s: tuple[float, ...]
    placements: tuple[str, ...]  # "" where infeasible


def scaled_client(server: DeviceProfile, ratio: float, memory_bytes: float) -> DeviceProfile:
    """A client `ratio` times slower than the server in compute and memory bandwidth."""
    return DeviceProfile(name=f"client-1/{ratio:g}",
                         peak_flops_per_s=server.peak_flops_per_s / ratio,
                         mem_bandwidth_bytes_per_s=server.mem_bandwidth_bytes_per_s / ratio,
                         mem_capacity_bytes=memory_bytes, efficiency=server.efficiency)


def solve_length(grid: PaperGrid, model: str, prompt_tokens: int) -> list[PaperPoint]:
    """Every grid point of one model at one sequence length (one sweep task)."""
    costs = model_costs(load_model_config(model))
    server = device_preset(grid.server)
    decoder = costs.config.kind == "decoder"
    points = []
    for ratio in grid.speed_ratio:
        client = scaled_client(server, ratio, grid.client_memory_bytes)
        for link in grid.links:
            request = Request(prompt_tokens=prompt_tokens,
                              output_tokens=grid.output_tokens if decoder else 1)
            base = build_instance(costs, client, server, link_preset(link), request)
            all_server = evaluate(base, Placement.all_on("S", len(base))).latency_s
            for slack in grid.sla_slack:
                instance = replace(base, sla_s=slack * all_server)
                plans = [solve(instance, policy) for policy in POLICIES]
                points.append(PaperPoint(
                    model, prompt_tokens, slack, ratio, link, instance.sla_s,
                    tuple(p.server_work if p else math.nan for p in plans),
                    tuple(p.latency_s if p else math.nan for p in plans),
                    tuple(p.placement.sides if p else "" for p in plans),
                ))
    return points


@dataclass(frozen=True)
class ModelSummary:
    """A model's averages over its grid points."""

    model: str
    points: int
    reduction_vs_server_only: tuple[float, ...]  # mean over points, per POLICIES
    aggregate_reduction: tuple[float, ...]  # 1 - sum(work) / sum(server-only work)
    infeasible: tuple[int, ...]  # points where the policy found no plan (counted as 0)
    exact_vs_greedy: float  # mean over points of 1 - exact / greedy
    exact_beats_greedy: int  # points where exact's work is strictly below greedy's


def reductions(points: list[PaperPoint]) -> np.ndarray:
    """[points, policies]: 1 - work / server-only work; an infeasible policy counts as 0
    (it would fall back to server-only); a point with no server work at all counts as 0."""
    work = np.array([p.server_work_s for p in points])
    base = work[:, :1]
    with np.errstate(invalid="ignore", divide="ignore"):
        red = np.where(base > 0, 1 - work / base, 0.0)
    return np.where(np.isnan(red), 0.0, red)


def exact_over_greedy(points: list[PaperPoint]) -> np.ndarray:
    """[points]: 1 - exact work / greedy work (0 where greedy's work is 0 or it has no plan)."""
    work = np.array([p.server_work_s for p in points])
    g, e = work[:, POLICIES.index("greedy")], work[:, POLICIES.index("exact")]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(g > 0, 1 - e / g, 0.0)
    return np.where(np.isnan(out), 0.0, out)


def summarize_model(model: str, points: list[PaperPoint]) -> ModelSummary:
    """Averages over one model's points."""
    work = np.array([p.server_work_s for p in points])
    red = reductions(points)
    total = np.nansum(np.where(np.isnan(work), work[:, :1], work), axis=0)
    g, e = POLICIES.index("greedy"), POLICIES.index("exact")
    return ModelSummary(
        model=model,
        points=len(points),
        reduction_vs_server_only=tuple(float(v) for v in red.mean(axis=0)),
        aggregate_reduction=tuple(float(1 - t / total[0]) if total[0] else 0.0 for t in total),
        infeasible=tuple(int(v) for v in np.isnan(work).sum(axis=0)),
        exact_vs_greedy=float(exact_over_greedy(points).mean()),
        exact_beats_greedy=int((work[:, e] < work[:, g] * (1 - 1e-9)).sum()),
    )
