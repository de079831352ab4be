"""A request's walk through its placement: delays on the client and the network, server jobs.

Each forward pass (the prefill, then every decode step) goes through the placement's segments
in order. Client compute and network crossings never queue (every client is its own device,
and the link is not shared), so everything between two visits to the server folds into one
delay; each server segment of each pass is one job on the server's queue, as on the real
server. A walk is therefore `gap[0], job[0], gap[1], job[1], ..., job[n-1], gap[n]`.
Times come from the same roofline cost model as the planner (`instance.phase_times`), so a
walk at zero load takes exactly the latency `instance.evaluate` predicts for that request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitllm.placement import SERVER, Placement
from splitllm.planner.costs import ModelCosts
from splitllm.planner.hardware import DeviceProfile
from splitllm.planner.instance import Request, phase_times
from splitllm.planner.network import Link, carried_bytes, crossing_s, session_open_s
from splitllm.sim import memo
from splitllm.sim.world import World

CACHE_LIMIT = 2048  # phase-time tables kept (each is [units + 1, G] floats)


@dataclass(frozen=True, kw_only=True)
class Walk:
    """Delays and server jobs of one request, flattened over its passes."""

    gaps_s: list[float]  # [jobs + 1]: client compute + crossings before job j; last: after
    service_s: list[float]  # [jobs]: seconds job j takes on an otherwise idle server
    jobs_per_pass: int
    first_token_tail_s: float  # from the end of pass 0's last job (or arrival) to token 1
    server_segments: tuple[tuple[int, int], ...]  # units [a, b) of each job within a pass
    client_s: list[float]  # [jobs + 1]: the client compute within gap j (its device's time)

    @property
    def jobs(self) -> int:
        return len(self.service_s)


NO_WALK = Walk(gaps_s=[0.0], service_s=[], jobs_per_pass=0, first_token_tail_s=0.0,
               server_segments=(), client_s=[0.0])  # nothing on the server


def synthetic_walk(service_s: float, link: Link) -> Walk:
    """One server job of `service_s` seconds, half a round trip on each side."""
    half_s = crossing_s(link, True, 0.0)  # no bytes: half the round trip each way
    return Walk(gaps_s=[half_s, half_s], service_s=[service_s], jobs_per_pass=1,
                first_token_tail_s=half_s, server_segments=((0, 1),), client_s=[0.0, 0.0])


class WalkBuilder:
    """Builds walks for a world, caching the cumulative phase times per (device, P, G)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._cum: dict[tuple[int, int, int, int], np.ndarray] = memo.table(
            "phase-times", memo.planning_key(world))

    def _cumulative(self, type_index: int, device_index: int, device: DeviceProfile,
                    model: ModelCosts, prompt: int, output: int) -> np.ndarray:
        """[units + 1, passes] prefix sums over units of each pass's unit times."""
        key = (type_index, device_index, prompt, output)
        cum = self._cum.get(key)
        if cum is None:
            request = Request(prompt_tokens=prompt, output_tokens=output,
                              speculation=self.world.types[type_index].speculation)
            times = phase_times(model, device, request)
            per_pass = np.column_stack([times.prefill_s, times.decode_s])  # [units, passes]
            cum = np.vstack([np.zeros(per_pass.shape[1]), np.cumsum(per_pass, axis=0)])
            memo.bounded_put(self._cum, key, cum, CACHE_LIMIT)
        return cum

    def walk(self, type_index: int, class_index: int, prompt: int, output: int,
             placement: Placement, service_s: float = 0.0) -> Walk:
        """The walk of one request of a type from a client class under a placement."""
        rtype = self.world.types[type_index]
        client = self.world.clients[class_index]
        model = rtype.model
        if model is None:
            return synthetic_walk(service_s, client.link)
        if len(placement) != len(model.units):
            raise ValueError(f"placement {placement} does not fit {model.config.name}")
        on_client = self._cumulative(type_index, class_index, client.device, model, prompt,
                                     output)
        on_server = self._cumulative(type_index, -1, self.world.server.device, model, prompt,
                                     output)
        passes = on_client.shape[1]
        # The prefill carries every prompt token, a decode pass one (k + 1 when speculating).
        tokens = np.full(passes, rtype.speculation.positions_per_pass if rtype.speculation
                         else 1.0)
        tokens[0] = prompt
        return _fold(placement, model, client.link, on_client, on_server, tokens)


def _fold(placement: Placement, model: ModelCosts, link: Link, on_client: np.ndarray,
          on_server: np.ndarray, tokens: np.ndarray) -> Walk:
    """Fold client time and crossings into gaps between server jobs, pass by pass."""
    passes = len(tokens)
    per_token = carried_bytes(model.input_bytes_per_token,
                              [u.out_bytes_per_token for u in model.units],
                              model.output_bytes_per_token)  # [units + 1]
    carried = np.outer(per_token, tokens)  # [units + 1, passes]
    carried[-1] = model.output_bytes_per_token  # every pass returns one result
    gap = np.zeros(passes)
    computed = np.zeros(passes)  # the client compute within `gap`
    gaps: list[np.ndarray] = []
    computes: list[np.ndarray] = []
    services: list[np.ndarray] = []
    segments: list[tuple[int, int]] = []
    on_server_before = False  # the input starts on the client
    for seg in placement.segments():
        here_server = seg.side == SERVER
        if here_server != on_server_before:
            gap = gap + crossing_s(link, here_server, carried[seg.start])
        if here_server:
            gaps.append(gap)
            computes.append(computed)
            services.append(on_server[seg.stop] - on_server[seg.start])
            segments.append((seg.start, seg.stop))
            gap, computed = np.zeros(passes), np.zeros(passes)
        else:
            gap = gap + (on_client[seg.stop] - on_client[seg.start])
            computed = computed + (on_client[seg.stop] - on_client[seg.start])
        on_server_before = here_server
    if on_server_before:  # the result goes back down to the client
        gap = gap + crossing_s(link, False, carried[-1])
    tail = gap
    k = len(services)
    if k == 0:
        return Walk(gaps_s=[float(tail.sum())], service_s=[], jobs_per_pass=0,
                    first_token_tail_s=float(tail[0]), server_segments=(),
                    client_s=[float(computed.sum())])
    gap_matrix = np.column_stack(gaps)  # [passes, k]
    gap_matrix[1:, 0] += tail[:-1]  # a pass starts when the previous token reached the client
    gap_matrix[0, 0] += session_open_s(link)  # once per request, before its first visit
    compute_matrix = np.column_stack(computes)
    compute_matrix[1:, 0] += computed[:-1]
    return Walk(
        gaps_s=[*gap_matrix.ravel().tolist(), float(tail[-1])],
        service_s=np.column_stack(services).ravel().tolist(),
        jobs_per_pass=k,
        first_token_tail_s=float(tail[0]),
        server_segments=tuple(segments),
        client_s=[*compute_matrix.ravel().tolist(), float(computed[-1])],
    )
