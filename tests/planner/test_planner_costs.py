"""The cost model: parameter counts, FLOPs, KV bytes, HF configs, roofline, profiles."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest

from splitllm.errors import UserError
from splitllm.planner.configs import MODEL_CONFIGS, ModelConfig, load_model_config
from splitllm.planner.costs import model_costs
from splitllm.planner.hardware import (
    DEVICE_PRESETS,
    LINK_PRESETS,
    DeviceProfile,
    Link,
    load_profile,
    save_profile,
)

# Published totals (model cards / papers).
KNOWN_PARAMS = {
    "gpt2": 124e6,
    "smollm2-135m": 135e6,
    "bert-base": 110e6,
    "vit-base": 86e6,
    "llama-3-8b": 8.03e9,
    "llama-2-70b": 69e9,
}


@pytest.mark.parametrize(("name", "known"), KNOWN_PARAMS.items())
def test_parameter_count_is_within_2_percent_of_the_published_total(
    name: str, known: float
) -> None:
    assert model_costs(MODEL_CONFIGS[name]).params == pytest.approx(known, rel=0.02)


@pytest.mark.parametrize(("name", "params"), [("gpt2", 124e6), ("smollm2-135m", 135e6)])
def test_decoder_forward_flops_per_token_are_twice_the_parameters(
    name: str, params: float
) -> None:
    # The embedding is a lookup (no FLOPs) but the tied head is a full vocab x hidden matmul.
    assert model_costs(MODEL_CONFIGS[name]).forward_flops_per_token() == pytest.approx(
        2 * params, rel=0.02)


def test_prefill_attention_flops_grow_with_the_square_of_the_prompt() -> None:
    block = model_costs(MODEL_CONFIGS["smollm2-135m"]).units[1]
    for p in (16, 128, 1024):
        # f(P) = a P + b P (P + 1) / 2 (causal)  =>  f(2P) - 2 f(P) = b P^2
        second_difference = block.prefill_flops(2 * p) - 2 * block.prefill_flops(p)
        assert second_difference == pytest.approx(block.attn_flops_per_token_ctx * p * p)
        assert block.attn_flops_per_token_ctx > 0


def test_encoder_prefill_attends_to_every_position() -> None:
    block = model_costs(MODEL_CONFIGS["bert-base"]).units[1]
    p = 128
    attention = block.prefill_flops(p, causal=False) - block.linear_flops_per_token * p
    assert attention == pytest.approx(block.attn_flops_per_token_ctx * p * p)


def test_decode_step_flops_and_bytes_grow_linearly_with_the_context() -> None:
    block = model_costs(MODEL_CONFIGS["llama-3-8b"]).units[1]
    contexts = [100, 1100, 2100, 3100]
    flops = [block.decode_flops(c) for c in contexts]
    nbytes = [block.decode_bytes(c) for c in contexts]
    assert [b - a for a, b in itertools.pairwise(flops)] == pytest.approx(
        [1000 * block.attn_flops_per_token_ctx] * 3)
    assert [b - a for a, b in itertools.pairwise(nbytes)] == pytest.approx(
        [1000 * block.kv_bytes_per_token] * 3)
    assert block.kv_bytes_per_token > 0


@pytest.mark.parametrize("weight_bytes", [1.0, 2.0, 4.0])
def test_smollm2_kv_bytes_per_token_are_k_and_v_of_3_heads_of_64(weight_bytes: float) -> None:
    costs = model_costs(MODEL_CONFIGS["smollm2-135m"], weight_bytes=weight_bytes)
    blocks = [u for u in costs.units if u.name.startswith("block")]
    assert len(blocks) == 30
    assert {u.kv_bytes_per_token for u in blocks} == {2 * 3 * 64 * weight_bytes}


def test_encoders_keep_no_kv_cache() -> None:
    assert all(u.kv_bytes_per_token == 0 for u in model_costs(MODEL_CONFIGS["bert-base"]).units)


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


# SmolLM2-135M's config.json (Hugging Face), trimmed to what a loader may look at.
SMOLLM2_HF = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
    "num_hidden_layers": 30, "vocab_size": 49152, "tie_word_embeddings": True,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "hidden_act": "silu",
}
GPT2_HF = {
    "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 768, "n_head": 12,
    "n_layer": 12, "n_positions": 1024, "n_ctx": 1024, "n_inner": None, "vocab_size": 50257,
}


@pytest.mark.parametrize(("hf", "builtin"), [(SMOLLM2_HF, "smollm2-135m"), (GPT2_HF, "gpt2")])
def test_hf_config_json_reads_as_the_builtin_config(
    tmp_path: Path, hf: dict[str, Any], builtin: str
) -> None:
    path = write_json(tmp_path / "config.json", hf)
    loaded = load_model_config(str(path))
    assert {**loaded.__dict__, "name": builtin} == MODEL_CONFIGS[builtin].__dict__


def test_model_directory_with_a_config_json_loads(tmp_path: Path) -> None:
    write_json(tmp_path / "config.json", SMOLLM2_HF)
    assert load_model_config(str(tmp_path)).n_layers == 30


def test_hf_config_missing_a_field_is_a_user_error() -> None:
    broken = {k: v for k, v in SMOLLM2_HF.items() if k != "hidden_size"}
    with pytest.raises(UserError, match="hidden_size"):
        ModelConfig.from_hf_dict(broken)


def test_unknown_model_name_is_a_user_error() -> None:
    with pytest.raises(UserError, match="nosuch"):
        load_model_config("nosuch")


def test_roofline_is_compute_bound_when_flops_dominate() -> None:
    device = DeviceProfile(name="d", peak_flops_per_s=1e12, mem_bandwidth_bytes_per_s=1e11,
                           mem_capacity_bytes=1e9, efficiency=0.5)
    assert device.time_s(flops=1e12, mem_bytes=1e10) == pytest.approx(1.0 / 0.5)


def test_roofline_is_memory_bound_when_bytes_dominate() -> None:
    device = DeviceProfile(name="d", peak_flops_per_s=1e12, mem_bandwidth_bytes_per_s=1e11,
                           mem_capacity_bytes=1e9, efficiency=0.5)
    assert device.time_s(flops=1e9, mem_bytes=1e11) == pytest.approx(1.0 / 0.5)


@pytest.mark.parametrize("profile", [*DEVICE_PRESETS.values(), *LINK_PRESETS.values()])
def test_profile_json_roundtrips(tmp_path: Path, profile: DeviceProfile | Link) -> None:
    path = tmp_path / f"{profile.name}.json"
    save_profile(profile, path)
    assert load_profile(path) == profile


BAD_PROFILES: dict[str, tuple[str, str]] = {  # file text, what the message names
    "not json": ("{kind: device", "JSON"),
    "not an object": ("[1, 2]", "object"),
    "unknown kind": ('{"kind": "toaster", "name": "t"}', "kind"),
    "no kind": ('{"name": "t", "rtt_s": 0.1}', "kind"),
    "unknown field": ('{"kind": "link", "uplink_bytes_per_s": 1, "downlink_bytes_per_s": 1, '
                      '"rtt_s": 0.1, "jitter_s": 0.01}', "jitter_s"),
    "missing field": ('{"kind": "link", "uplink_bytes_per_s": 1, "rtt_s": 0.1}',
                      "downlink_bytes_per_s"),
    "negative": ('{"kind": "link", "uplink_bytes_per_s": -1, "downlink_bytes_per_s": 1, '
                 '"rtt_s": 0.1}', "uplink_bytes_per_s"),
    "zero": ('{"kind": "device", "peak_flops_per_s": 0, "mem_bandwidth_bytes_per_s": 1, '
             '"mem_capacity_bytes": 1}', "peak_flops_per_s"),
    "nan": ('{"kind": "device", "peak_flops_per_s": NaN, "mem_bandwidth_bytes_per_s": 1, '
            '"mem_capacity_bytes": 1}', "peak_flops_per_s"),
    "string": ('{"kind": "link", "uplink_bytes_per_s": "fast", "downlink_bytes_per_s": 1, '
               '"rtt_s": 0.1}', "uplink_bytes_per_s"),
}


@pytest.mark.parametrize("case", BAD_PROFILES)
def test_bad_profile_file_is_a_user_error_naming_the_problem(tmp_path: Path, case: str) -> None:
    text, named = BAD_PROFILES[case]
    path = tmp_path / "profile.json"
    path.write_text(text)
    with pytest.raises(UserError, match=named):
        load_profile(path)


def test_missing_profile_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        load_profile(tmp_path / "absent.json")


def test_profile_without_efficiency_gets_the_default(tmp_path: Path) -> None:
    path = write_json(tmp_path / "box.json", {
        "kind": "device", "peak_flops_per_s": 1e12, "mem_bandwidth_bytes_per_s": 5e10,
        "mem_capacity_bytes": 4e9})
    profile = load_profile(path)
    assert isinstance(profile, DeviceProfile)
    assert profile.name == "box"
    assert math.isclose(profile.efficiency, DeviceProfile(
        name="x", peak_flops_per_s=1, mem_bandwidth_bytes_per_s=1, mem_capacity_bytes=1).efficiency)


def test_boolean_for_a_profile_number_is_a_user_error(tmp_path: Path) -> None:
    path = write_json(tmp_path / "link.json", {
        "kind": "link", "uplink_bytes_per_s": 1e6, "downlink_bytes_per_s": 1e6, "rtt_s": True})
    with pytest.raises(UserError, match="rtt_s"):
        load_profile(path)
