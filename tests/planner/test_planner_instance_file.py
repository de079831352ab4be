"""The explicit-cost instance file (JSON): round trips and validation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
from planner_kit import brute_force_case, with_field

from splitllm.errors import UserError
from splitllm.planner.configs import MODEL_CONFIGS
from splitllm.planner.costs import model_costs
from splitllm.planner.hardware import DEVICE_PRESETS, LINK_PRESETS
from splitllm.planner.instance import Instance, PhaseLimit, Request, build_instance
from splitllm.planner.instance_file import (
    instance_to_dict,
    load_instance,
    parse_instance,
    save_instance,
)


def model_instance() -> Instance:
    """llama-3-8b from a phone over 5G with TTFT and TPOT limits and the embedding pinned."""
    return build_instance(
        model_costs(MODEL_CONFIGS["llama-3-8b"], weight_bytes=0.5), DEVICE_PRESETS["phone"],
        DEVICE_PRESETS["datacenter-gpu"], LINK_PRESETS["5g"],
        Request(prompt_tokens=256, output_tokens=16, sla_s=10.0, ttft_s=2.0, tpot_s=0.5),
        keep_on_client=frozenset({"embed"}),
    )


@pytest.mark.parametrize("seed", range(0, 500, 10))
def test_dict_roundtrip_through_json_gives_the_same_instance(seed: int) -> None:
    instance = brute_force_case(seed)
    data = json.loads(json.dumps(instance_to_dict(instance)))
    assert parse_instance(data) == instance


def test_model_instance_with_phase_limits_roundtrips_through_a_file(tmp_path: Path) -> None:
    instance = model_instance()
    assert len(instance.phase_limits) == 2
    assert math.isfinite(instance.client_mem_limit_bytes)
    path = tmp_path / "instance.json"
    save_instance(instance, path)
    assert load_instance(path) == instance


def test_server_wait_and_passes_roundtrip() -> None:
    instance = dataclasses.replace(brute_force_case(3), server_wait_s=0.02, passes=7)
    assert parse_instance(instance_to_dict(instance)) == instance


def test_the_sessions_opening_roundtrips_and_an_older_file_reads_it_as_nothing() -> None:
    instance = dataclasses.replace(brute_force_case(3), session_open_s=0.0625)
    data = json.loads(json.dumps(instance_to_dict(instance)))
    assert data["session_open_s"] == 0.0625
    assert parse_instance(data) == instance
    assert model_instance().session_open_s == LINK_PRESETS["5g"].rtt_s  # built: the link's
    del data["session_open_s"]  # a file from before the field: plans as it did
    assert parse_instance(data) == dataclasses.replace(instance, session_open_s=0.0)


def minimal() -> dict[str, Any]:
    return {
        "layers": [{"name": "a", "client_s": 1.0, "server_s": 0.1, "server_work": 0.1,
                    "out_bytes": 100.0}],
        "input_bytes": 10.0, "output_bytes": 4.0, "uplink_bytes_per_s": 1e6,
        "downlink_bytes_per_s": 1e7, "rtt_s": 0.01, "sla_s": 2.0,
    }


def test_optional_fields_take_their_defaults() -> None:
    instance = parse_instance(minimal())
    assert instance.passes == 1
    assert instance.server_wait_s == 0.0
    assert instance.client_mem_limit_bytes == math.inf
    assert instance.phase_limits == ()
    assert instance.units[0].client_ok and instance.units[0].server_ok


def edit(path: str, value: Any) -> dict[str, Any]:
    """minimal() with one field set (value None: removed)."""
    return with_field(minimal(), path, value)


BAD_FIELDS = [
    ("sla_s", None), ("layers.0.server_s", None), ("bogus", 1), ("layers.0.bogus", 1),
    ("rtt_s", -0.1), ("layers.0.client_s", -1.0), ("sla_s", 0.0), ("uplink_bytes_per_s", 0.0),
    ("sla_s", math.nan), ("layers.0.server_work", math.inf), ("passes", 0),
    ("client_mem_bytes", 0.0), ("layers.0.out_bytes", "lots"), ("session_open_s", -0.01),
]


@pytest.mark.parametrize(("path", "value"), BAD_FIELDS)
def test_bad_field_is_a_user_error_naming_it(path: str, value: Any) -> None:
    field = path.split(".")[-1]
    with pytest.raises(UserError, match=field):
        parse_instance(edit(path, value))


PHASE = {"name": "ttft", "limit_s": 1.0, "client_s": [1.0], "server_s": [0.1], "out_bytes": [1.0],
         "input_bytes": 1.0, "output_bytes": 1.0}

# The layers and phase limits are the planner's own dataclasses, validated in place: their errors
# read like the top level's.
NESTED_MESSAGES = [
    (edit("layers.0.bogus", 1), "instance: unknown field layers.0.bogus"),
    (edit("layers.0.server_s", None), "instance: missing field layers.0.server_s"),
    (edit("layers.0.client_ok", "perhaps"), "instance: field layers.0.client_ok: "),
    (edit("phase_limits", [{**PHASE, "colour": "red"}]),
     "instance: unknown field phase_limits.0.colour"),
    (edit("phase_limits", [{**PHASE, "passes": 0}]),
     "instance: field phase_limits.0.passes: Input should be greater than or equal to 1 (got 0)"),
    (edit("phase_limits", [{**PHASE, "client_s": [-1.0]}]),
     "instance: field phase_limits.0.client_s.0: "),
]


@pytest.mark.parametrize(("data", "message"), NESTED_MESSAGES)
def test_bad_layer_or_phase_field_names_its_path(data: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError) as error:
        parse_instance(data)
    assert str(error.value).startswith(message), str(error.value)


def test_a_valid_phase_limit_is_read_into_tuples() -> None:
    instance = parse_instance(edit("phase_limits", [PHASE]))
    assert instance.phase_limits == (PhaseLimit(name="ttft", limit_s=1.0, client_s=(1.0,),
                                                server_s=(0.1,), out_bytes=(1.0,),
                                                input_bytes=1.0, output_bytes=1.0),)


def test_empty_layer_list_is_a_user_error() -> None:
    with pytest.raises(UserError, match="layers"):
        parse_instance(edit("layers", []))


def test_phase_limit_with_the_wrong_number_of_values_is_a_user_error() -> None:
    phase = {"name": "ttft", "limit_s": 1.0, "client_s": [1.0, 2.0], "server_s": [0.1],
             "out_bytes": [1.0], "input_bytes": 1.0, "output_bytes": 1.0}
    with pytest.raises(UserError, match=r"ttft\.client_s"):
        parse_instance(edit("phase_limits", [phase]))


def test_top_level_list_is_a_user_error() -> None:
    with pytest.raises(UserError, match="top level"):
        parse_instance([minimal()])


def test_malformed_json_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"layers": [')
    with pytest.raises(UserError, match="malformed JSON"):
        load_instance(path)


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"absent\.json"):
        load_instance(tmp_path / "absent.json")


def test_boolean_for_a_number_is_a_user_error() -> None:
    with pytest.raises(UserError, match="sla_s"):
        parse_instance(edit("sla_s", True))
