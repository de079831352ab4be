"""Arrival traces: a CSV of arrival times and request types (client class and tokens optional).

Header `arrived_at_s,request_type[,client_class][,prompt_tokens][,output_tokens]`; one row per
request, times in seconds (any origin, any order). Empty optional cells are sampled. A run
replays the trace in a loop until its horizon, its time axis scaled to the run's arrival rate.

The Azure LLM inference traces (`TIMESTAMP,ContextTokens,GeneratedTokens`, Patel et al.,
ISCA 2024, CC-BY 4.0) load with `load_azure_trace`: every row is one request type, token
counts capped (a model's context is shorter than some prompts), client classes sampled.
"""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path

from splitllm.errors import UserError
from splitllm.sim.world import Trace

REQUIRED = ("arrived_at_s", "request_type")
OPTIONAL = ("client_class", "prompt_tokens", "output_tokens")


def _index(value: str, names: list[str], what: str, where: str) -> int:
    if value not in names:
        raise UserError(f"{where}: unknown {what} {value!r}: the scenario has {', '.join(names)}")
    return names.index(value)


def _count(value: str, column: str, where: str) -> int:
    if not value.strip():
        return -1
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"{where}: {column} must be an integer, got {value!r}") from None
    if n < (1 if column == "prompt_tokens" else 0):
        raise UserError(f"{where}: {column} out of range: {n}")
    return n


def _time(value: str, where: str) -> float:
    try:
        t = float(value)
    except ValueError:
        raise UserError(f"{where}: arrived_at_s must be a number, got {value!r}") from None
    if t != t or t in (float("inf"), float("-inf")):
        raise UserError(f"{where}: arrived_at_s must be finite")
    return t


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except OSError as exc:
        raise UserError(f"trace {path}: cannot read ({exc.strerror})") from None
    if not rows:
        raise UserError(f"trace {path}: no rows (expected a header and one row per request)")
    return header, rows


def _trace(records: list[tuple[float, int, int, int, int]]) -> Trace:
    """Records (time, type, class, prompt, output) sorted, times shifted to start at 0."""
    records.sort(key=lambda r: r[0])
    start = records[0][0]
    return Trace(
        arrived_at_s=tuple(r[0] - start for r in records),
        type_index=tuple(r[1] for r in records),
        class_index=tuple(r[2] for r in records),
        prompt_tokens=tuple(r[3] for r in records),
        output_tokens=tuple(r[4] for r in records),
    )


AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def load_azure_trace(path: Path, type_index: int, rows: int | None = None,
                     max_prompt_tokens: int | None = None,
                     max_output_tokens: int | None = None) -> Trace:
    """Read the first `rows` requests of an Azure trace as requests of one type, tokens capped."""
    header, table = _read(path)
    for column in AZURE_COLUMNS:
        if column not in header:
            raise UserError(f"trace {path}: missing column {column!r} (an Azure trace has "
                            f"{','.join(AZURE_COLUMNS)})")
    records = []
    for line, row in enumerate(table[:rows], start=2):
        where = f"trace {path} line {line}"
        try:
            at_s = datetime.fromisoformat(row["TIMESTAMP"] or "").timestamp()
        except ValueError:
            raise UserError(f"{where}: TIMESTAMP must be a date and time, got "
                            f"{row['TIMESTAMP']!r}") from None
        prompt = _count(row["ContextTokens"] or "", "prompt_tokens", where)
        output = _count(row["GeneratedTokens"] or "", "output_tokens", where)
        records.append((at_s, type_index, -1, min(prompt, max_prompt_tokens or prompt),
                        min(output, max_output_tokens or output)))
    return _trace(records)


def load_trace(path: Path, type_names: list[str], class_names: list[str]) -> Trace:
    """Read a trace CSV; times are shifted to start at 0 and sorted."""
    header, rows = _read(path)
    for column in REQUIRED:
        if column not in header:
            raise UserError(f"trace {path}: missing column {column!r}")
    for column in header:
        if column not in REQUIRED + OPTIONAL:
            raise UserError(f"trace {path}: unknown column {column!r}")
    records = []
    for line, row in enumerate(rows, start=2):
        where = f"trace {path} line {line}"
        cls = row.get("client_class") or ""
        records.append((
            _time(row["arrived_at_s"] or "", where),
            _index(row["request_type"] or "", type_names, "request type", where),
            _index(cls, class_names, "client class", where) if cls.strip() else -1,
            _count(row.get("prompt_tokens") or "", "prompt_tokens", where),
            _count(row.get("output_tokens") or "", "output_tokens", where),
        ))
    return _trace(records)
