"""Number formats: one table of names, aliases and bytes per element (torch-free).

The planner prices weights and hidden states by their bytes per element; the runtime maps the
canonical names (torch's own, e.g. `bfloat16`) to torch dtypes for weights, the wire and token ids.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class DType:
    """A number format: canonical name, the short name the planner's options use, aliases."""

    name: str
    short: str
    bytes_per_element: float
    aliases: tuple[str, ...] = ()


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType(name="float32", short="fp32", bytes_per_element=4, aliases=("f32",)),
    DType(name="float16", short="fp16", bytes_per_element=2, aliases=("f16",)),
    DType(name="bfloat16", short="bf16", bytes_per_element=2),
    DType(name="int8", short="int8", bytes_per_element=1),
    DType(name="q4", short="q4", bytes_per_element=0.5),  # 4-bit quantised weights (GGUF Q4)
    DType(name="int64", short="int64", bytes_per_element=8),
    DType(name="int32", short="int32", bytes_per_element=4),
)}
FLOATS = ("float32", "bfloat16", "float16")  # what torch computes in and the wire carries
TOKEN_IDS = ("int64", "int32")
COST_MODEL = ("float32", "float16", "bfloat16", "int8", "q4")  # weights / wire in the planner

_BY_ALIAS = {alias: d.name for d in DTYPES.values() for alias in (d.name, d.short, *d.aliases)}


def canonical(name: str, among: Collection[str]) -> str | None:
    """The canonical name of `name` (any alias, any case) if it is one of `among`, else None."""
    found = _BY_ALIAS.get(name.lower())
    return found if found in among else None


def short_names(among: Collection[str]) -> str:
    """The short names of some formats, for help texts and errors: 'fp32, bf16, fp16'."""
    return ", ".join(DTYPES[name].short for name in among)


def bytes_per_element(name: str) -> float:
    """Bytes per element of a format named by any alias (KeyError if unknown)."""
    return DTYPES[_BY_ALIAS[name.lower()]].bytes_per_element
