"""The explicit-cost instance file (JSON): validated reading and writing.

Format (see README): {"layers": [{"name", "client_s", "server_s", "server_work", "out_bytes",
"client_mem_bytes"?, "client_ok"?, "server_ok"?}, ...], "input_bytes", "output_bytes",
"uplink_bytes_per_s", "downlink_bytes_per_s", "rtt_s", "visit_s"?, "sla_s", "client_mem_bytes"?,
"passes"?, "server_wait_s"?, "job_s"?, "job_work_s"?, "session_open_s"?, "phase_limits"?}
(an absent `session_open_s` is 0 and a phase's absent `pays_session_open` false: files from
before them plan as they did).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from splitllm.errors import UserError
from splitllm.planner.instance import AtLeastOne, Instance, NonNegative, PhaseLimit, Positive, Unit
from splitllm.planner.network import Link


class InstanceModel(BaseModel):
    """The file: the planner's own `Unit` and `PhaseLimit` (their fields carry the checks)."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)

    layers: Annotated[list[Unit], Field(min_length=1)]
    input_bytes: NonNegative
    output_bytes: NonNegative
    uplink_bytes_per_s: Positive
    downlink_bytes_per_s: Positive
    rtt_s: NonNegative
    visit_s: NonNegative = 0.0
    sla_s: Positive
    client_mem_bytes: Positive | None = None
    passes: AtLeastOne = 1
    server_wait_s: NonNegative = 0.0
    job_s: NonNegative = 0.0
    job_work_s: NonNegative = 0.0
    session_open_s: NonNegative = 0.0
    phase_limits: list[PhaseLimit] = []

    def to_instance(self) -> Instance:
        n = len(self.layers)
        for p in self.phase_limits:
            for key in ("client_s", "server_s", "out_bytes"):
                if len(getattr(p, key)) != n:
                    raise UserError(f"phase_limits.{p.name}.{key}: expected {n} values")
        return Instance(
            units=tuple(self.layers),
            link=Link(uplink_bytes_per_s=self.uplink_bytes_per_s,
                      downlink_bytes_per_s=self.downlink_bytes_per_s, rtt_s=self.rtt_s,
                      visit_s=self.visit_s),
            sla_s=self.sla_s,
            input_bytes=self.input_bytes,
            output_bytes=self.output_bytes,
            passes=self.passes,
            client_mem_limit_bytes=math.inf if self.client_mem_bytes is None
            else self.client_mem_bytes,
            phase_limits=tuple(self.phase_limits),
            server_wait_s=self.server_wait_s,
            job_s=self.job_s,
            job_work_s=self.job_work_s,
            session_open_s=self.session_open_s,
        )


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "(top level)"
    if err["type"] == "missing":
        return f"missing field {where}"
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # model, dataclass
        return f"unknown field {where}"
    return f"field {where}: {err['msg']} (got {err.get('input')!r})"


def parse_instance(data: Any, source: str = "instance") -> Instance:
    """An Instance from parsed JSON, or a UserError naming the bad field."""
    try:
        return InstanceModel.model_validate(data).to_instance()
    except ValidationError as exc:
        raise UserError(f"{source}: {_first_error(exc)}") from None


def load_instance(path: Path) -> Instance:
    """Read and validate an instance file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON ({exc})") from None
    return parse_instance(data, str(path))


def instance_to_dict(instance: Instance) -> dict[str, Any]:
    """The instance in the file format (round-trips through `parse_instance`)."""
    out: dict[str, Any] = {
        "layers": [asdict(u) for u in instance.units],
        "input_bytes": instance.input_bytes,
        "output_bytes": instance.output_bytes,
        "uplink_bytes_per_s": instance.link.uplink_bytes_per_s,
        "downlink_bytes_per_s": instance.link.downlink_bytes_per_s,
        "rtt_s": instance.link.rtt_s,
        **({"visit_s": instance.link.visit_s} if instance.link.visit_s else {}),
        "sla_s": instance.sla_s,
        "passes": instance.passes,
    }
    if math.isfinite(instance.client_mem_limit_bytes):
        out["client_mem_bytes"] = instance.client_mem_limit_bytes
    for key in ("server_wait_s", "job_s", "job_work_s", "session_open_s"):
        if getattr(instance, key):
            out[key] = getattr(instance, key)
    if instance.phase_limits:
        out["phase_limits"] = [
            {"name": p.name, "limit_s": p.limit_s, "client_s": list(p.client_s),
             "server_s": list(p.server_s), "out_bytes": list(p.out_bytes),
             "input_bytes": p.input_bytes, "output_bytes": p.output_bytes, "passes": p.passes,
             **({"pays_session_open": True} if p.pays_session_open else {})}
            for p in instance.phase_limits
        ]
    return out


def save_instance(instance: Instance, path: Path) -> None:
    """Write an instance file."""
    path.write_text(json.dumps(instance_to_dict(instance), indent=1) + "\n")
