"""Per-unit costs of the model families users bring, against their published sizes.

Each family's config values are those of one real model's config.json (written here, no
downloads); its published parameter count is from the model card. transformers builds the same
model on the meta device for the exact count and the per-layer attention types.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from splitllm.planner.configs import MODEL_CONFIGS, ModelConfig
from splitllm.planner.costs import model_costs


def hf(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int,
       **extra: Any) -> dict[str, Any]:
    """config.json values of a decoder of the Llama layout."""
    return dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, **extra)


# model type -> (real model, published parameters, its config.json values)
REAL_MODELS: dict[str, tuple[str, float, dict[str, Any]]] = {
    "llama": ("Meta-Llama-3-8B", 8.03e9,
              hf(4096, 14336, 32, 32, 8, 128256, tie_word_embeddings=False)),
    "mistral": ("Mistral-7B-v0.1", 7.24e9,
                hf(4096, 14336, 32, 32, 8, 32000, sliding_window=4096, tie_word_embeddings=False)),
    "qwen2": ("Qwen2-0.5B", 0.49e9,
              hf(896, 4864, 24, 14, 2, 151936, tie_word_embeddings=True, use_sliding_window=False,
                 sliding_window=131072, max_window_layers=24)),
    "qwen3": ("Qwen3-0.6B", 0.6e9,
              hf(1024, 3072, 28, 16, 8, 151936, head_dim=128, tie_word_embeddings=True)),
    # Gemma's configs leave tie_word_embeddings out: Gemma ties its head by default.
    "gemma": ("gemma-2b", 2.51e9, hf(2048, 16384, 18, 8, 1, 256000, head_dim=256)),
    "gemma2": ("gemma-2-2b", 2.61e9,
               hf(2304, 9216, 26, 8, 4, 256000, head_dim=256, sliding_window=4096)),
    "gemma3_text": ("gemma-3-1b-pt", 1.0e9,
                    hf(1152, 6912, 26, 4, 1, 262144, head_dim=256, sliding_window=512,
                       sliding_window_pattern=6)),
    "phi3": ("Phi-3-mini-4k-instruct", 3.82e9,
             hf(3072, 8192, 32, 32, 32, 32064, sliding_window=2047, tie_word_embeddings=False)),
    "olmo2": ("OLMo-2-1124-7B", 7.30e9,
              hf(4096, 11008, 32, 32, 32, 100352, tie_word_embeddings=False)),
    "gpt2": ("gpt2", 124e6, dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257,
                                 n_positions=1024)),
}


# More families, in made-up sizes, against transformers alone (configs without layer_types and
# tie_word_embeddings: the planner must assume what transformers assumes).
OTHER_FAMILIES: dict[str, dict[str, Any]] = {
    "olmo3": hf(512, 1024, 8, 8, 4, 131072, sliding_window=256),
    "ministral": hf(512, 1024, 4, 8, 4, 131072, head_dim=64),
    "smollm3": hf(512, 1024, 4, 8, 4, 131072),
    "cohere": hf(512, 1024, 4, 8, 4, 131072),
    "granite": hf(512, 1024, 4, 8, 4, 131072),
}
ARCHITECTURES = {**{t: values for t, (_, _, values) in REAL_MODELS.items()}, **OTHER_FAMILIES}


def config_of(model_type: str) -> ModelConfig:
    return ModelConfig.from_hf_dict({"model_type": model_type, **ARCHITECTURES[model_type]})


def transformers_model(model_type: str) -> Any:
    """The real architecture, built by transformers on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        config = AutoConfig.for_model(model_type, **ARCHITECTURES[model_type])
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", REAL_MODELS)
def test_parameters_match_the_published_size(model_type: str) -> None:
    _, published, _ = REAL_MODELS[model_type]
    assert model_costs(config_of(model_type)).params == pytest.approx(published, rel=0.02)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_parameters_and_windows_match_the_architecture_transformers_builds(
        model_type: str) -> None:
    from splitllm.runtime.families import attention_layout

    model = transformers_model(model_type)
    cfg = config_of(model_type)
    # Only norms and biases are left out of the cost model: a few in 10^4 at these sizes.
    assert model_costs(cfg).params == pytest.approx(model.num_parameters(), rel=1e-3)
    windows = tuple(window or 0 for _, window in attention_layout(model.config))
    assert (cfg.layer_windows or (0,) * len(windows)) == windows


def test_a_silent_config_gets_transformers_defaults() -> None:
    mistral = {k: v for k, v in REAL_MODELS["mistral"][2].items() if k != "sliding_window"}
    assert ModelConfig.from_hf_dict({"model_type": "mistral", **mistral}).layer_windows == (
        (4096,) * 32)
    assert config_of("gemma").tied_embeddings and not config_of("olmo2").tied_embeddings


def test_sliding_window_kv_is_bounded_by_the_window() -> None:
    costs = model_costs(MODEL_CONFIGS["gemma-3-1b"])
    local, global_ = costs.units[1], costs.units[6]  # block0 is local, block5 global
    assert (local.window_tokens, global_.window_tokens) == (512, 0)
    assert local.kv_bytes(10_000) == local.kv_bytes(512) == 512 * local.kv_bytes_per_token
    assert global_.kv_bytes(10_000) == 10_000 * global_.kv_bytes_per_token
    assert local.decode_flops(10_000) == local.decode_flops(512) < global_.decode_flops(10_000)
    for prompt in (1, 300, 512, 513, 2000):
        pairs = sum(min(i + 1, 512) for i in range(prompt))
        expected = local.linear_flops_per_token * prompt + local.attn_flops_per_token_ctx * pairs
        assert local.prefill_flops(prompt) == pytest.approx(expected, rel=1e-12)


def test_builtin_configs_equal_their_config_json() -> None:
    for name, model_type in (("qwen3-0.6b", "qwen3"), ("gemma-3-1b", "gemma3_text")):
        assert MODEL_CONFIGS[name] == replace(config_of(model_type), name=name)


@pytest.mark.parametrize("model_type", ["gemma3_text", "olmo2"])
def test_the_head_unit_holds_the_vocabulary_tied_or_not(model_type: str) -> None:
    cfg = config_of(model_type)
    costs = model_costs(cfg)
    head = costs.units[-1]
    assert head.params == cfg.vocab * cfg.hidden + cfg.hidden  # LM head + final RMSNorm
    body = sum(u.params for u in costs.units)
    assert costs.params == body - (cfg.vocab * cfg.hidden if cfg.tied_embeddings else 0)


def test_plan_reads_a_gemma3_config_json(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gemma3_text", **REAL_MODELS["gemma3_text"][2]}))
    splitllm = str(Path(sys.executable).with_name("splitllm"))
    result = subprocess.run([splitllm, "plan", "--model", str(path), "--client", "laptop",
                             "--link", "wifi", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["placement"]) == 26 + 2
