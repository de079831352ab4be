"""Per-unit FLOPs and bytes from a model config; device and link profiles; roofline times.

Placement units are `embed`, `block0` .. `block{n-1}`, `head` (final norm + LM head, or the
pooler / classifier of an encoder). FLOPs count a multiply-add as 2.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from splitllm.errors import UserError

Kind = Literal["decoder", "encoder"]

DTYPE_BYTES: dict[str, float] = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "q4": 0.5}


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers the cost model needs."""

    name: str
    kind: Kind
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    gated_mlp: bool  # Llama-style gate/up/down (3 matrices) vs GPT-2/BERT up/down (2)
    biases: bool  # linear layers carry biases (GPT-2, BERT, ViT)
    learned_positions: int = 0  # rows of a learned position table (GPT-2, BERT, ViT)
    tied_embeddings: bool = True
    head_out: int = 0  # encoder head output size (classes); 0 for decoders (head = vocab)
    input_patch_values: int = 0  # ViT: values per patch (channels * patch^2); 0 = token ids

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str | None = None) -> ModelConfig:
        """Read a Hugging Face `config.json` (llama-family, gpt2, bert or vit)."""
        model_type = str(d.get("model_type", ""))
        label = name or str(d.get("_name_or_path") or model_type or "model")
        try:
            if model_type == "gpt2":
                hidden = int(d["n_embd"])
                return cls(
                    label, "decoder", int(d["n_layer"]), hidden, int(d["n_head"]), int(d["n_head"]),
                    hidden // int(d["n_head"]), int(d.get("n_inner") or 4 * hidden),
                    int(d["vocab_size"]), False, True, int(d.get("n_positions", 1024)), True,
                )
            if model_type in ("bert", "vit"):
                hidden = int(d["hidden_size"])
                heads = int(d["num_attention_heads"])
                vit = model_type == "vit"
                patch_values = int(d.get("num_channels", 3)) * int(d.get("patch_size", 16)) ** 2
                positions = (
                    (int(d.get("image_size", 224)) // int(d.get("patch_size", 16))) ** 2 + 1
                    if vit
                    else int(d.get("max_position_embeddings", 512))
                )
                return cls(
                    label, "encoder", int(d["num_hidden_layers"]), hidden, heads, heads,
                    hidden // heads, int(d["intermediate_size"]),
                    0 if vit else int(d["vocab_size"]), False, True, positions, True,
                    head_out=int(d.get("num_labels", 1000 if vit else 2)),
                    input_patch_values=patch_values if vit else 0,
                )
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            return cls(
                label, "decoder", int(d["num_hidden_layers"]), hidden, heads,
                int(d.get("num_key_value_heads") or heads),
                int(d.get("head_dim") or hidden // heads), int(d["intermediate_size"]),
                int(d["vocab_size"]), True, bool(d.get("attention_bias", False)), 0,
                bool(d.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"model config {label!r}: missing or bad field {exc}") from None

    @property
    def n_units(self) -> int:
        return self.n_layers + 2

    @property
    def unit_names(self) -> tuple[str, ...]:
        return ("embed", *(f"block{i}" for i in range(self.n_layers)), "head")


# Published architecture numbers of each model (from its Hugging Face config.json / paper).
MODEL_CONFIGS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig("gpt2", "decoder", 12, 768, 12, 12, 64, 3072, 50257, False, True, 1024),
    "smollm2-135m": ModelConfig(
        "smollm2-135m", "decoder", 30, 576, 9, 3, 64, 1536, 49152, True, False, 0, True
    ),
    "llama-3-8b": ModelConfig(
        "llama-3-8b", "decoder", 32, 4096, 32, 8, 128, 14336, 128256, True, False, 0, False
    ),
    "llama-2-70b": ModelConfig(
        "llama-2-70b", "decoder", 80, 8192, 64, 8, 128, 28672, 32000, True, False, 0, False
    ),
    "bert-base": ModelConfig(
        "bert-base", "encoder", 12, 768, 12, 12, 64, 3072, 30522, False, True, 512, True, 2
    ),
    "vit-base": ModelConfig(
        "vit-base", "encoder", 12, 768, 12, 12, 64, 3072, 0, False, True, 197, True, 1000, 768
    ),
    # The base Transformer of Vaswani et al. (6 encoder + 6 decoder layers, d=512), run as one
    # forward pass of 12 blocks: the reference work treats it as a fixed-length encoder model.
    "transformer-base": ModelConfig(
        "transformer-base", "encoder", 12, 512, 8, 8, 64, 2048, 37000, False, True, 0, True, 37000
    ),
}


def load_model_config(name_or_path: str) -> ModelConfig:
    """A built-in config by name, or a Hugging Face `config.json` (file or model directory)."""
    if name_or_path in MODEL_CONFIGS:
        return MODEL_CONFIGS[name_or_path]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        known = ", ".join(MODEL_CONFIGS)
        raise UserError(f"unknown model {name_or_path!r}: use one of {known} or a config.json path")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"model config {path}: not valid JSON ({exc})") from None
    return ModelConfig.from_hf_dict(data, name=path.parent.name or str(path))


@dataclass(frozen=True)
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

    def prefill_flops(self, prompt_tokens: int, causal: bool = True) -> float:
        """FLOPs of a prefill of P tokens (causal: token i attends to i + 1 positions)."""
        p = prompt_tokens
        pairs = p * (p + 1) / 2 if causal else p * p
        return self.linear_flops_per_token * prompt_tokens + self.attn_flops_per_token_ctx * pairs

    def decode_flops(self, context_tokens: int) -> float:
        """FLOPs of one decode step attending to `context_tokens` positions."""
        return self.linear_flops_per_token + self.attn_flops_per_token_ctx * context_tokens

    def weight_read_bytes(self, tokens: int) -> float:
        """Weight bytes one pass over `tokens` tokens reads."""
        if self.lookup_bytes_per_token:
            return min(self.weight_bytes, tokens * self.lookup_bytes_per_token)
        return self.weight_bytes

    def prefill_bytes(self, prompt_tokens: int) -> float:
        """Memory traffic of a prefill: weights once, the new KV cache written."""
        return self.weight_read_bytes(prompt_tokens) + self.kv_bytes_per_token * prompt_tokens

    def decode_bytes(self, context_tokens: int) -> float:
        """Memory traffic of one decode step: weights and the whole KV cache read."""
        return self.weight_read_bytes(1) + self.kv_bytes_per_token * context_tokens


@dataclass(frozen=True)
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
    embed = UnitCost("embed", embed_params, embed_flops, 0.0, embed_params * weight_bytes, 0.0,
                     d * wire_bytes, 0.0 if cfg.input_patch_values else d * weight_bytes)
    if cfg.kind == "decoder":
        head_matrix = cfg.vocab * d
        head_params = norm + head_matrix
        output_bytes = 4.0  # the sampled token id
    else:  # pooler (d x d) + classifier, or ViT's final norm + classifier
        head_matrix = (d * d if cfg.vocab else 0) + d * cfg.head_out
        head_params = head_matrix + (d if cfg.vocab else norm) + cfg.head_out
        output_bytes = 4.0 * cfg.head_out  # fp32 logits
    head = UnitCost("head", head_params, 2.0 * head_matrix, 0.0, head_params * weight_bytes, 0.0,
                    output_bytes)
    blocks = tuple(_block_cost(cfg, i, weight_bytes, wire_bytes) for i in range(cfg.n_layers))
    return ModelCosts(cfg, (embed, *blocks, head), input_bytes, output_bytes)


@dataclass(frozen=True)
class DeviceProfile:
    """A device: roofline peaks, memory for a model, and the share of peak it reaches."""

    name: str
    peak_flops_per_s: float
    mem_bandwidth_bytes_per_s: float
    mem_capacity_bytes: float
    efficiency: float = 0.5

    def time_s(self, flops: float, mem_bytes: float) -> float:
        """Roofline: compute time or memory time, whichever is larger, over efficiency."""
        return max(flops / self.peak_flops_per_s, mem_bytes / self.mem_bandwidth_bytes_per_s) / (
            self.efficiency
        )


@dataclass(frozen=True)
class LinkProfile:
    """A network path between a client and the server."""

    name: str
    uplink_bytes_per_s: float
    downlink_bytes_per_s: float
    rtt_s: float


GB = 1e9
MBIT = 1e6 / 8

DEVICE_PRESETS: dict[str, DeviceProfile] = {
    # Snapdragon 8 Gen 2 class phone: Adreno 740 ~ 2 TFLOP/s fp16 usable, LPDDR5X 4x16-bit
    # @ 4.2 GHz = 67 GB/s; an app can hold ~3 GB of model on an 8-12 GB phone.
    "phone": DeviceProfile("phone", 2.0e12, 67 * GB, 3 * GB, 0.3),
    # Apple M2 laptop: GPU 3.6 TFLOP/s fp32 (Apple spec), 100 GB/s unified memory, 16 GB.
    "laptop": DeviceProfile("laptop", 3.6e12, 100 * GB, 12 * GB, 0.4),
    # NVIDIA Jetson Orin Nano 8 GB: 1024 CUDA cores @ 625 MHz ~ 2.6 TFLOP/s fp16, LPDDR5 68 GB/s.
    "edge-box": DeviceProfile("edge-box", 2.6e12, 68 * GB, 6 * GB, 0.4),
    # NVIDIA A100 80 GB SXM: 312 TFLOP/s bf16 dense, HBM2e 2.039 TB/s (NVIDIA datasheet).
    "datacenter-gpu": DeviceProfile("datacenter-gpu", 312e12, 2039 * GB, 80 * GB, 0.5),
}

LINK_PRESETS: dict[str, LinkProfile] = {
    # LTE medians (Opensignal mobile reports): ~25 Mbit/s down, ~8 Mbit/s up, ~50 ms RTT.
    "4g": LinkProfile("4g", 8 * MBIT, 25 * MBIT, 0.050),
    # 5G mid-band medians: ~150 Mbit/s down, ~20 Mbit/s up, ~25 ms RTT.
    "5g": LinkProfile("5g", 20 * MBIT, 150 * MBIT, 0.025),
    # Home Wi-Fi 5 to a nearby edge server: ~100 Mbit/s up, ~200 Mbit/s down, ~5 ms RTT.
    "wifi": LinkProfile("wifi", 100 * MBIT, 200 * MBIT, 0.005),
    # Gigabit Ethernet within a building: 1 Gbit/s each way, ~0.5 ms RTT.
    "lan": LinkProfile("lan", 1000 * MBIT, 1000 * MBIT, 0.0005),
}


def _preset(kind: str, table: dict[str, Any], name: str) -> Any:
    if name in table:
        return table[name]
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        return load_profile(path)
    raise UserError(f"unknown {kind} {name!r}: use one of {', '.join(table)} or a .json profile")


def device_preset(name: str) -> DeviceProfile:
    """A named device preset, or a device profile JSON file."""
    profile = _preset("device", DEVICE_PRESETS, name)
    if not isinstance(profile, DeviceProfile):
        raise UserError(f"{name}: not a device profile")
    return profile


def link_preset(name: str) -> LinkProfile:
    """A named link preset, or a link profile JSON file."""
    profile = _preset("link", LINK_PRESETS, name)
    if not isinstance(profile, LinkProfile):
        raise UserError(f"{name}: not a link profile")
    return profile


def save_profile(profile: DeviceProfile | LinkProfile, path: Path) -> None:
    """Write a device or link profile as JSON (`kind` tells which)."""
    kind = "device" if isinstance(profile, DeviceProfile) else "link"
    path.write_text(json.dumps({"kind": kind, **asdict(profile)}, indent=2) + "\n")


def load_profile(path: Path) -> DeviceProfile | LinkProfile:
    """Read a profile written by `save_profile` (or by hand, from measurements)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"profile {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"profile {path}: expected a JSON object")
    kind = data.pop("kind", None)
    cls: type[DeviceProfile] | type[LinkProfile]
    cls = {"device": DeviceProfile, "link": LinkProfile}.get(kind)  # type: ignore[assignment]
    if cls is None:
        raise UserError(f"profile {path}: field 'kind' must be 'device' or 'link'")
    data.setdefault("name", path.stem)
    fields = set(cls.__dataclass_fields__)
    for key in set(data) - fields:
        raise UserError(f"profile {path}: unknown field {key!r}")
    for key in fields - set(data) - {"efficiency"}:
        raise UserError(f"profile {path}: missing field {key!r}")
    for key, value in data.items():
        if key == "name":
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            raise UserError(f"profile {path}: field {key!r} must be a positive number")
    return cls(**data)
