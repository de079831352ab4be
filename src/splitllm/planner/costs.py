"""Per-unit FLOPs and bytes from a model config.

Placement units are `embed`, `block0` .. `block{n-1}`, `head` (final norm + LM head, or the
pooler / classifier of an encoder). FLOPs count a multiply-add as 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from splitllm.planner.configs import ModelConfig


@dataclass(frozen=True, kw_only=True)
class UnitCost:
    """Size of one unit: FLOPs are per token; KV and hidden bytes are per token."""

    name: str
    params: int
    linear_flops_per_token: float  # 2 x matmul parameters
    attn_flops_per_token_ctx: float  # attention FLOPs per token per token of context
    weight_bytes: float
    kv_bytes_per_token: float
    out_bytes_per_token: float  # what crosses the network after this unit, per token
    # An embedding table: a pass reads one row per token, not all its weights (0: not a table).
    lookup_bytes_per_token: float = 0.0
    # Sliding-window attention: a token attends to (and the cache keeps) this many (0: all).
    window_tokens: int = 0

    def kv_tokens(self, context_tokens: Any) -> Any:
        """Positions the KV cache holds and a new token attends to at a context length."""
        return np.minimum(context_tokens, self.window_tokens) if self.window_tokens else (
            context_tokens)

    def kv_bytes(self, context_tokens: Any) -> Any:
        """Bytes of KV cache the unit holds at a context length."""
        return self.kv_bytes_per_token * self.kv_tokens(context_tokens)

    def prefill_flops(self, prompt_tokens: int, causal: bool = True) -> float:
        """FLOPs of a prefill of P tokens (causal: token i attends to i + 1 positions)."""
        p, w = prompt_tokens, self.window_tokens
        pairs = p * (p + 1) / 2 if causal else p * p
        if causal and 0 < w < p:  # the first w tokens see all before them, the rest w each
            pairs = w * (w + 1) / 2 + (p - w) * w
        return self.linear_flops_per_token * prompt_tokens + self.attn_flops_per_token_ctx * pairs

    def decode_flops(self, context_tokens: Any) -> Any:
        """FLOPs of one decode step at a context of `context_tokens` positions."""
        return self.linear_flops_per_token + self.attn_flops_per_token_ctx * self.kv_tokens(
            context_tokens)

    def weight_read_bytes(self, tokens: int) -> float:
        """Weight bytes one pass over `tokens` tokens reads."""
        if self.lookup_bytes_per_token:
            return min(self.weight_bytes, tokens * self.lookup_bytes_per_token)
        return self.weight_bytes

    def prefill_bytes(self, prompt_tokens: int) -> float:
        """Memory traffic of a prefill: weights once, the new KV cache written."""
        return self.weight_read_bytes(prompt_tokens) + self.kv_bytes_per_token * prompt_tokens

    def decode_bytes(self, context_tokens: Any) -> Any:
        """Memory traffic of one decode step: weights and the whole KV cache read."""
        return self.weight_read_bytes(1) + self.kv_bytes(context_tokens)


@dataclass(frozen=True, kw_only=True)
class ModelCosts:
    """Per-unit costs of one model at given weight and wire dtypes."""

    config: ModelConfig
    units: tuple[UnitCost, ...]
    input_bytes_per_token: float  # what the client sends if the embedding runs on the server
    output_bytes_per_token: float  # what comes back if the head runs on the server

    @property
    def params(self) -> int:
        """Total parameters (a tied head counted once)."""
        cfg = self.config
        shared = cfg.vocab * cfg.hidden if cfg.tied_embeddings and cfg.kind == "decoder" else 0
        return sum(u.params for u in self.units) - shared

    def forward_flops_per_token(self) -> float:
        """Matmul FLOPs of one token through all units, attention excluded (~2 x params)."""
        return sum(u.linear_flops_per_token for u in self.units)


def _block_cost(cfg: ModelConfig, index: int, weight_b: float, wire_b: float) -> UnitCost:
    d, kv = cfg.hidden, cfg.n_kv_heads * cfg.head_dim
    q = cfg.n_heads * cfg.head_dim
    attn = d * q + 2 * d * kv + q * d
    mlp = (3 if cfg.gated_mlp else 2) * d * cfg.ffn
    biases = (q + 2 * kv + d + cfg.ffn + d) if cfg.biases else 0
    norms = (4 if cfg.biases else 2) * d  # LayerNorm has weight + bias, RMSNorm weight only
    params = attn + mlp + biases + norms
    return UnitCost(
        name=f"block{index}",
        params=params,
        linear_flops_per_token=2.0 * (attn + mlp),
        attn_flops_per_token_ctx=4.0 * q,  # QK^T and AV, 2 FLOPs per multiply-add each
        weight_bytes=params * weight_b,
        kv_bytes_per_token=2 * kv * weight_b if cfg.kind == "decoder" else 0.0,
        out_bytes_per_token=d * wire_b,
        window_tokens=cfg.layer_windows[index] if cfg.layer_windows else 0,
    )


def model_costs(cfg: ModelConfig, weight_bytes: float = 2.0, wire_bytes: float = 2.0) -> ModelCosts:
    """Per-unit costs: weights at `weight_bytes` per parameter, hidden states at `wire_bytes`."""
    d = cfg.hidden
    norm = (2 if cfg.biases else 1) * d
    if cfg.input_patch_values:  # ViT: a linear patch projection, class token, position table
        embed_params = cfg.input_patch_values * d + d + d + cfg.learned_positions * d
        embed_flops = 2.0 * cfg.input_patch_values * d
        input_bytes = float(cfg.input_patch_values)  # uint8 pixels per patch token
    else:
        type_rows = 2 if cfg.kind == "encoder" else 0  # BERT token types
        embed_params = (cfg.vocab + cfg.learned_positions + type_rows) * d
        embed_params += norm if cfg.kind == "encoder" else 0
        embed_flops = 0.0  # a table lookup
        input_bytes = 4.0  # int32 token ids
    embed = UnitCost(name="embed", params=embed_params, linear_flops_per_token=embed_flops,
                     attn_flops_per_token_ctx=0.0, weight_bytes=embed_params * weight_bytes,
                     kv_bytes_per_token=0.0, out_bytes_per_token=d * wire_bytes,
                     lookup_bytes_per_token=0.0 if cfg.input_patch_values else d * weight_bytes)
    if cfg.kind == "decoder":
        head_matrix = cfg.vocab * d
        head_params = norm + head_matrix
        output_bytes = 4.0  # the sampled token id
    else:  # pooler (d x d) + classifier, or ViT's final norm + classifier
        head_matrix = (d * d if cfg.vocab else 0) + d * cfg.head_out
        head_params = head_matrix + (d if cfg.vocab else norm) + cfg.head_out
        output_bytes = 4.0 * cfg.head_out  # fp32 logits
    head = UnitCost(name="head", params=head_params, linear_flops_per_token=2.0 * head_matrix,
                    attn_flops_per_token_ctx=0.0, weight_bytes=head_params * weight_bytes,
                    kv_bytes_per_token=0.0, out_bytes_per_token=output_bytes)
    blocks = tuple(_block_cost(cfg, i, weight_bytes, wire_bytes) for i in range(cfg.n_layers))
    return ModelCosts(config=cfg, units=(embed, *blocks, head), input_bytes_per_token=input_bytes,
                      output_bytes_per_token=output_bytes)
