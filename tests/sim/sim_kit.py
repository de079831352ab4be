"""Helpers of the simulator tests: small worlds built in code (synthetic jobs, a tiny model)."""

from __future__ import annotations

from splitllm.planner.configs import ModelConfig
from splitllm.planner.costs import ModelCosts, UnitCost
from splitllm.planner.hardware import DeviceProfile
from splitllm.planner.network import Link
from splitllm.sim.dists import Dist
from splitllm.sim.world import ClientClass, RequestType, ServerSpec, SweepSpec, Trace, World

NO_LINK = Link(name="none", uplink_bytes_per_s=1e15, downlink_bytes_per_s=1e15, rtt_s=0.0)
# 1000 FLOP/s, memory never binds
SERVER = DeviceProfile(name="server", peak_flops_per_s=1000.0, mem_bandwidth_bytes_per_s=1e15,
                       mem_capacity_bytes=1e15, efficiency=1.0)
CLIENT = DeviceProfile(name="client", peak_flops_per_s=100.0, mem_bandwidth_bytes_per_s=1e15,
                       mem_capacity_bytes=1e15, efficiency=1.0)


def synthetic_world(service: Dist, rate_per_s: float, duration_s: float, scheduler: str = "fcfs",
                    warmup_s: float = 0.0, trace: Trace | None = None,
                    link: Link = NO_LINK, seed: int = 0, workers: int = 1,
                    sla_s: float = 1e9) -> World:
    """Requests that are one server job each, with service times drawn from `service`."""
    return World(
        name="synthetic",
        server=ServerSpec(SERVER, scheduler, workers=workers),
        clients=(ClientClass("c", CLIENT, link),),
        types=(RequestType("job", sla_s=sla_s, service_s=service),),
        duration_s=duration_s, warmup_s=warmup_s, seed=seed, rate_per_s=rate_per_s,
        trace=trace, sweep=SweepSpec(min_requests=1),
    )


def tiny_model() -> ModelCosts:
    """embed (free), one block (100 FLOP/token, 10 B/token out), head (50 FLOP/token)."""
    cfg = ModelConfig(name="tiny", kind="decoder", n_layers=1, hidden=5, n_heads=1, n_kv_heads=1,
                      head_dim=5, ffn=5, vocab=10, gated_mlp=False, biases=False)
    units = (
        _unit("embed", flops_per_token=0.0, out_bytes_per_token=10.0),
        _unit("block0", flops_per_token=100.0, out_bytes_per_token=10.0),
        _unit("head", flops_per_token=50.0, out_bytes_per_token=4.0),
    )
    return ModelCosts(config=cfg, units=units, input_bytes_per_token=4.0,
                      output_bytes_per_token=4.0)


def _unit(name: str, flops_per_token: float, out_bytes_per_token: float) -> UnitCost:
    """A unit with no weights, KV cache or attention: only its FLOPs and what it sends."""
    return UnitCost(name=name, params=0, linear_flops_per_token=flops_per_token,
                    attn_flops_per_token_ctx=0.0, weight_bytes=0.0, kv_bytes_per_token=0.0,
                    out_bytes_per_token=out_bytes_per_token)


def tiny_world(arrivals_s: tuple[float, ...], prompt: int, output: int, scheduler: str = "fcfs",
               sla_s: float = 100.0) -> World:
    """Requests of the tiny model from one client over a 0.2 s RTT, 100 B/s link."""
    link = Link(name="slow", uplink_bytes_per_s=100.0, downlink_bytes_per_s=100.0, rtt_s=0.2)
    rtype = RequestType("tiny", sla_s=sla_s, model=tiny_model(),
                        prompt_tokens=Dist("fixed", (float(prompt),)),
                        output_tokens=Dist("fixed", (float(output),)))
    trace = Trace(arrivals_s, (0,) * len(arrivals_s))
    return World(  # one replay of the trace at its own speed: exactly these arrivals
        name="tiny", server=ServerSpec(SERVER, scheduler),
        clients=(ClientClass("c", CLIENT, link),), types=(rtype,),
        duration_s=trace.period_s or 1e-9,
        rate_per_s=trace.natural_rate_per_s if trace.period_s else 1.0,
        trace=trace, sweep=SweepSpec(min_requests=1),
    )
