"""The one dtype table: aliases resolve, and torch agrees on every size the planner prices."""

from __future__ import annotations

import pytest
import torch

from splitllm import dtypes
from splitllm.runtime import protocol
from splitllm.runtime.models import torch_dtype


@pytest.mark.parametrize("name", [*dtypes.FLOATS, *dtypes.TOKEN_IDS])
def test_torch_sizes_match_the_table(name: str) -> None:
    assert protocol.ALL_DTYPES[name].itemsize == dtypes.bytes_per_element(name)


@pytest.mark.parametrize(("alias", "name"), [
    ("fp32", "float32"), ("F32", "float32"), ("bf16", "bfloat16"), ("BFloat16", "bfloat16"),
    ("fp16", "float16"), ("f16", "float16"),
])
def test_aliases_name_one_format_everywhere(alias: str, name: str) -> None:
    assert dtypes.canonical(alias, dtypes.FLOATS) == name
    assert protocol.wire_dtype_name(alias) == name
    assert torch_dtype(alias) == getattr(torch, name)


def test_formats_outside_a_set_are_refused() -> None:
    assert dtypes.canonical("q4", dtypes.FLOATS) is None  # priced by the planner, never sent
    assert dtypes.canonical("int64", dtypes.COST_MODEL) is None
    assert dtypes.canonical("fp8", dtypes.COST_MODEL) is None
    assert dtypes.bytes_per_element("q4") == 0.5
    with pytest.raises(protocol.ProtocolError, match="wire dtype 'q4'"):
        protocol.wire_dtype_name("q4")


def test_the_planner_lists_its_formats_by_short_name() -> None:
    assert dtypes.short_names(dtypes.COST_MODEL) == "fp32, fp16, bf16, int8, q4"
