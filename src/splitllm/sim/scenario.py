"""Scenario files (YAML or JSON): pydantic models at the edge, resolved into a `World`.

Every mistake becomes one `UserError` line naming the field, e.g.
`scenario s.yaml: request_types[1].sla_s: Input should be greater than 0`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from splitllm.dtypes import bytes_per_element
from splitllm.errors import UserError
from splitllm.planner.configs import load_model_config
from splitllm.planner.costs import model_costs
from splitllm.planner.hardware import DeviceProfile, device_preset, link_preset
from splitllm.planner.network import Link
from splitllm.planner.speculation import Speculation
from splitllm.sim import traces
from splitllm.sim.dists import Dist
from splitllm.sim.measured import scenario_step_model
from splitllm.sim.policies import check_policy
from splitllm.sim.world import (
    DEFAULT_POLICIES,
    ClientClass,
    RequestType,
    ServerSpec,
    SweepSpec,
    Trace,
    World,
)

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _shorthand(key: str) -> Any:
    """Let a bare value stand for `{key: value}` (e.g. `device: phone`, `prompt_tokens: 128`)."""

    def convert(value: Any) -> Any:
        return value if isinstance(value, dict) else {key: value}

    return BeforeValidator(convert)


class DistIn(_In):
    """`{dist: fixed|uniform|choice|lognormal|exponential, ...}` or a bare number."""

    dist: Literal["fixed", "uniform", "choice", "lognormal", "exponential"] = "fixed"
    value: Positive | None = None
    low: NonNegative | None = None
    high: Positive | None = None
    values: list[Positive] | None = None
    weights: list[Positive] | None = None
    median: Positive | None = None
    sigma: NonNegative | None = None
    mean: Positive | None = None

    @model_validator(mode="after")
    def _complete(self) -> DistIn:
        needs = {"fixed": ("value",), "uniform": ("low", "high"), "choice": ("values",),
                 "lognormal": ("median", "sigma"), "exponential": ("mean",)}[self.dist]
        for name in needs:
            if getattr(self, name) is None:
                raise ValueError(f"a {self.dist} distribution needs field {name!r}")
        if self.dist == "uniform" and self.high < self.low:  # type: ignore[operator]
            raise ValueError("uniform: high must be >= low")
        if self.weights is not None and len(self.weights) != len(self.values or ()):
            raise ValueError("choice: weights must have one entry per value")
        return self

    def resolve(self, integer: bool) -> Dist:
        d = self
        if d.dist == "fixed":
            return Dist("fixed", (float(d.value),), integer=integer)  # type: ignore[arg-type]
        if d.dist == "choice":
            values = tuple(float(v) for v in d.values or ())
            return Dist("choice", values, tuple(d.weights or [1.0] * len(values)), integer=integer)
        if d.dist == "exponential":
            return Dist("exponential", mean_value=float(d.mean or 0), integer=integer)
        low = 1.0 if integer and d.low is None else float(d.low or 0.0)
        high = float(d.high) if d.high is not None else float("inf")
        return Dist(d.dist, low=low, high=high, median=float(d.median or 0),
                    sigma=float(d.sigma or 0), integer=integer)


DistField = Annotated[DistIn, _shorthand("value")]


class _PresetIn(_In):
    """A preset (or profile JSON) by name, with optional overrides, or all numbers."""

    preset: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _known(self) -> _PresetIn:
        self.resolve()  # a bad preset or a missing number fails here, naming its field
        return self

    def resolve(self) -> Any:
        """The value: the preset's fields (or `custom`'s) with the given ones over them."""
        raise NotImplementedError

    def _resolved(self, lookup: Callable[[str], Any], cls: Any, custom: dict[str, Any]) -> Any:
        fields = {k: v for k, v in self.model_dump().items() if k != "preset" and v is not None}
        if self.preset is None:
            return _build(cls, {**custom, **fields})
        try:
            base = lookup(self.preset)
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return _build(cls, {**base.__dict__, **fields})


class DeviceIn(_PresetIn):
    """A device preset (or profile JSON) by name, with optional overrides, or all numbers."""

    peak_flops_per_s: Positive | None = None
    mem_bandwidth_bytes_per_s: Positive | None = None
    mem_capacity_bytes: Positive | None = None
    efficiency: Annotated[float, Field(gt=0, le=1)] | None = None

    def resolve(self) -> DeviceProfile:
        return self._resolved(device_preset, DeviceProfile, {"name": "custom", "efficiency": 0.5})


class LinkIn(_PresetIn):
    """A link preset (or profile JSON) by name, with optional overrides, or all numbers."""

    uplink_bytes_per_s: Positive | None = None
    downlink_bytes_per_s: Positive | None = None
    rtt_s: NonNegative | None = None
    visit_s: NonNegative | None = None  # a visit's fixed cost per pass (default 0)

    def resolve(self) -> Link:
        return self._resolved(link_preset, Link, {"name": "custom", "visit_s": 0.0})


def _build(cls: Any, fields: dict[str, Any]) -> Any:
    missing = [k for k in cls.__dataclass_fields__ if k not in fields]
    if missing:
        raise ValueError(f"give a preset or field {missing[0]!r}")
    return cls(**fields)


class ServerIn(_In):
    device: Annotated[DeviceIn, _shorthand("preset")] = DeviceIn(preset="datacenter-gpu")
    scheduler: Literal["fcfs", "ps", "batched"] = "fcfs"
    workers: Annotated[int, Field(ge=1)] = 1
    max_batch: Annotated[int, Field(ge=1)] = 32
    step_model: str | None = None  # batched: a JSON file of the server's measured step model


class ClientIn(_In):
    name: str
    device: Annotated[DeviceIn, _shorthand("preset")]
    link: Annotated[LinkIn, _shorthand("preset")]
    share: Positive = 1.0


class RequestTypeIn(_In):
    name: str
    model: str | None = None
    service_s: DistField | None = None  # synthetic: one server job of this many seconds
    prompt_tokens: DistField = DistIn(value=128)
    output_tokens: DistField = DistIn(value=1)
    sla_s: Positive
    ttft_s: Positive | None = None
    tpot_s: Positive | None = None
    share: Positive = 1.0
    weight_dtype: Literal["fp32", "fp16", "bf16", "int8", "q4"] = "fp16"
    wire_dtype: Literal["fp32", "fp16", "bf16", "int8"] = "fp16"
    keep_on_client: list[str] = []
    keep_on_server: list[str] = []
    # Speculative decoding by its clients: drafts per pass and the measured per-draft hit rate.
    speculation: Speculation | None = None

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str | None) -> str | None:
        if model is not None:
            try:
                load_model_config(model)
            except UserError as exc:
                raise ValueError(str(exc)) from None
        return model

    @model_validator(mode="after")
    def _one_kind(self) -> RequestTypeIn:
        if (self.model is None) == (self.service_s is None):
            raise ValueError("give exactly one of 'model' or 'service_s' (synthetic)")
        if self.model is not None:
            cfg = load_model_config(self.model)
            for unit in [*self.keep_on_client, *self.keep_on_server]:
                if unit not in cfg.unit_names:
                    raise ValueError(f"unknown unit {unit!r} in keep_on_client/keep_on_server")
                if unit in self.keep_on_client and unit in self.keep_on_server:
                    raise ValueError(f"unit {unit!r} is in both keep_on_client and keep_on_server")
        return self


class ArrivalsIn(_In):
    process: Literal["poisson", "trace"] = "poisson"
    rate_per_s: Positive | None = None
    path: str | None = None
    format: Literal["splitllm", "azure"] = "splitllm"  # azure: TIMESTAMP,ContextTokens,...
    request_type: str | None = None  # azure: the type of every row (default: the first)
    rows: Annotated[int, Field(ge=1)] | None = None  # azure: the first this many rows
    max_prompt_tokens: Annotated[int, Field(ge=1)] | None = None  # azure: caps
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _complete(self) -> ArrivalsIn:
        if self.process == "poisson" and self.rate_per_s is None:
            raise ValueError("poisson arrivals need 'rate_per_s'")
        if self.process == "trace" and self.path is None:
            raise ValueError("trace arrivals need 'path' (a CSV file)")
        azure_only = (self.request_type, self.rows, self.max_prompt_tokens,
                      self.max_output_tokens)
        if self.format != "azure" and any(v is not None for v in azure_only):
            raise ValueError("request_type, rows and max_*_tokens apply to format: azure")
        return self


class SweepIn(_In):
    rates_per_s: list[Positive] = []
    target_attainment: Annotated[float, Field(gt=0, le=1)] = 0.9
    rel_tol: Annotated[float, Field(gt=0, lt=1)] = 0.03
    max_rate_per_s: Positive = 1e4
    capacity: bool = True
    min_requests: Annotated[int, Field(ge=1)] = 200


class ScenarioIn(_In):
    """The whole scenario file."""

    name: str = "scenario"
    seed: Annotated[int, Field(ge=0)] = 0
    duration_s: Positive
    warmup_s: NonNegative = 0.0
    server: ServerIn = ServerIn()
    clients: Annotated[list[ClientIn], Field(min_length=1)]
    request_types: Annotated[list[RequestTypeIn], Field(min_length=1)]
    arrivals: ArrivalsIn
    policies: list[str] = list(DEFAULT_POLICIES)
    wait_tau_s: Positive = 2.0
    wait_quantile: Annotated[float, Field(gt=0, lt=1)] = 0.9
    plan_headroom: Annotated[float, Field(ge=0, lt=1)] = 0.0
    headroom_target: Annotated[float, Field(gt=0, lt=1)] = 0.99
    sweep: SweepIn = SweepIn()

    @field_validator("policies")
    @classmethod
    def _known_policies(cls, policies: list[str]) -> list[str]:
        if not policies:
            raise ValueError("name at least one policy")
        for policy in policies:
            try:
                check_policy(policy)
            except UserError as exc:
                raise ValueError(str(exc)) from None
        return policies

    @field_validator("clients", "request_types")
    @classmethod
    def _unique_names(cls, items: list[Any]) -> list[Any]:
        names = [i.name for i in items]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"the name {name!r} is used twice")
        return items

    @model_validator(mode="after")
    def _consistent(self) -> ScenarioIn:
        if self.server.scheduler == "batched" and any(t.service_s for t in self.request_types):
            raise ValueError("synthetic request types (service_s) need scheduler fcfs or ps")
        if self.server.step_model is not None and self.server.scheduler != "batched":
            raise ValueError("server.step_model applies to scheduler batched")
        return self


def _where(error: Any) -> str:
    parts: list[str] = []
    for item in error["loc"]:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts)


def parse_scenario(data: Any, source: str) -> ScenarioIn:
    """Validate a loaded scenario document; errors name the field."""
    if not isinstance(data, dict):
        raise UserError(f"scenario {source}: expected a mapping at the top level")
    try:
        return ScenarioIn.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        msg = str(first["msg"]).removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        where = _where(first)
        raise UserError(f"scenario {source}: {where + ': ' if where else ''}{msg}{more}") from None


def read_document(path: Path) -> dict[str, Any]:
    """The mapping a YAML or JSON scenario file holds (not yet validated)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"scenario {path}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"scenario {path}: not valid JSON (line {exc.lineno}: {exc.msg})"
                        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise UserError(f"scenario {path}: not valid YAML ({where}{problem})") from None
    if not isinstance(data, dict):
        raise UserError(f"scenario {path}: expected a mapping at the top level")
    return data


def load_scenario(path: Path) -> World:
    """Read, validate and resolve a YAML or JSON scenario file."""
    return resolve(parse_scenario(read_document(path), str(path)), base_dir=path.parent)


def _request_type(t: RequestTypeIn) -> RequestType:
    model = None
    if t.model is not None:
        model = model_costs(load_model_config(t.model), bytes_per_element(t.weight_dtype),
                            bytes_per_element(t.wire_dtype))
    return RequestType(
        name=t.name, sla_s=t.sla_s, model=model,
        prompt_tokens=t.prompt_tokens.resolve(integer=True),
        output_tokens=t.output_tokens.resolve(integer=True),
        ttft_s=t.ttft_s, tpot_s=t.tpot_s, share=t.share,
        keep_on_client=frozenset(t.keep_on_client), keep_on_server=frozenset(t.keep_on_server),
        service_s=t.service_s.resolve(integer=False) if t.service_s is not None else None,
        speculation=t.speculation,
    )


def _load_trace(a: ArrivalsIn, path: Path, type_names: list[str],
                class_names: list[str]) -> Trace:
    if a.format == "splitllm":
        return traces.load_trace(path, type_names, class_names)
    name = a.request_type or type_names[0]
    if name not in type_names:
        raise UserError(f"scenario: arrivals.request_type: unknown request type {name!r}")
    return traces.load_azure_trace(path, type_names.index(name), a.rows, a.max_prompt_tokens,
                                   a.max_output_tokens)


def resolve(s: ScenarioIn, base_dir: Path = Path()) -> World:
    """The `World` a validated scenario describes (presets, models and traces loaded)."""
    clients = tuple(ClientClass(c.name, c.device.resolve(), c.link.resolve(), c.share)
                    for c in s.clients)
    types = tuple(_request_type(t) for t in s.request_types)
    trace = None
    rate = s.arrivals.rate_per_s
    if s.arrivals.process == "trace":
        path = Path(s.arrivals.path or "")
        trace = _load_trace(s.arrivals, path if path.is_absolute() else base_dir / path,
                            [t.name for t in types], [c.name for c in clients])
        rate = rate or trace.natural_rate_per_s
        if not math.isfinite(rate):
            raise UserError(f"scenario: arrivals.rate_per_s: the trace {path} spans no time; "
                            "give a rate")
    sw = s.sweep
    return World(
        name=s.name,
        server=ServerSpec(s.server.device.resolve(), s.server.scheduler, s.server.workers,
                          s.server.max_batch, scenario_step_model(
                              s.server.step_model, base_dir,
                              {len(t.model.units) - 2 for t in types if t.model is not None})),
        clients=clients, types=types, duration_s=s.duration_s, warmup_s=s.warmup_s,
        seed=s.seed, rate_per_s=float(rate or 1.0), trace=trace, policies=tuple(s.policies),
        wait_tau_s=s.wait_tau_s, wait_quantile=s.wait_quantile, plan_headroom=s.plan_headroom,
        headroom_target=s.headroom_target,
        sweep=SweepSpec(tuple(sw.rates_per_s), sw.target_attainment, sw.rel_tol,
                        sw.max_rate_per_s, sw.capacity, sw.min_requests),
    )
