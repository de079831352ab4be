"""A server's measured step model for a scenario: `server.step_model: FILE` (JSON).

The file holds what a running server announces in its /v1/info under `step_model`: either that
whole /v1/info response (or any JSON object with a `step_model` entry, as a profile output
holds it) or the step model object alone, `{"n_blocks", "embed", "block", "head"}` with
`{"points": [[tokens, seconds], ...]}` (the measured curve) or a line `{"fixed_s",
"per_token_s"}` for each kind of unit, and optionally `job_s` (the server's seconds per job
outside the units). The batched server then takes each step's time from it instead of the
roofline (`sim.batching.BatchCost`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from splitllm.errors import UserError
from splitllm.stepmodel import StepModel, UnitFit

FIELD = "server.step_model"
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _FitIn(BaseModel):
    """A unit's curve (`points`) or a line (`fixed_s`, `per_token_s`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    points: Annotated[list[tuple[Seconds, Seconds]], Field(min_length=1)] | None = None
    fixed_s: Seconds | None = None
    per_token_s: Seconds | None = None

    @model_validator(mode="after")
    def _one_form(self) -> _FitIn:
        line = (self.fixed_s is not None, self.per_token_s is not None)
        if line not in ((False, False), (True, True)) or (self.points is None) != all(line):
            raise ValueError("give either points or both fixed_s and per_token_s")
        return self


class _StepModelIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    n_blocks: Annotated[int, Field(ge=1)]
    job_s: Seconds = 0.0
    embed: _FitIn
    block: _FitIn
    head: _FitIn


def _fit(fit: _FitIn) -> UnitFit:
    if fit.points is None:
        assert fit.fixed_s is not None and fit.per_token_s is not None
        return UnitFit.line(fit.fixed_s, fit.per_token_s)
    return UnitFit(tuple(fit.points))


def read_step_model(path: Path) -> StepModel:
    """The step model in a JSON file; any mistake is one UserError line naming the field."""
    where = f"scenario: {FIELD}: {path}"
    try:
        data: Any = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"{where}: cannot read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if isinstance(data, dict) and "step_model" in data:
        data = data["step_model"]
        where += ": step_model"
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a step model object (n_blocks, embed, block, head)")
    try:
        parsed = _StepModelIn.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        raise UserError(f"{where}: {loc + ': ' if loc else ''}{first['msg']}") from None
    try:
        return StepModel(embed=_fit(parsed.embed), block=_fit(parsed.block),
                         head=_fit(parsed.head), n_blocks=parsed.n_blocks, job_s=parsed.job_s)
    except ValueError as exc:  # the points' order
        raise UserError(f"{where}: {exc}") from None


def scenario_step_model(path_text: str | None, base_dir: Path,
                        block_counts: set[int]) -> StepModel | None:
    """The step model a scenario names (relative to its file), for a model of one of
    `block_counts` blocks; None when it names none."""
    if path_text is None:
        return None
    path = Path(path_text)
    step_model = read_step_model(path if path.is_absolute() else base_dir / path)
    if step_model.n_blocks not in block_counts:
        raise UserError(f"scenario: {FIELD}: {path_text} was measured on a model of "
                        f"{step_model.n_blocks} blocks; no request type's model has as many")
    return step_model
