"""Model configs: the architecture numbers the cost model needs (built in, or a config.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from splitllm.errors import UserError

Kind = Literal["decoder", "encoder"]


@dataclass(frozen=True, kw_only=True)
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
                hidden, heads = int(d["n_embd"]), int(d["n_head"])
                return cls(
                    name=label, kind="decoder", n_layers=int(d["n_layer"]), hidden=hidden,
                    n_heads=heads, n_kv_heads=heads, head_dim=hidden // heads,
                    ffn=int(d.get("n_inner") or 4 * hidden), vocab=int(d["vocab_size"]),
                    gated_mlp=False, biases=True,
                    learned_positions=int(d.get("n_positions", 1024)), tied_embeddings=True,
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
                    name=label, kind="encoder", n_layers=int(d["num_hidden_layers"]),
                    hidden=hidden, n_heads=heads, n_kv_heads=heads, head_dim=hidden // heads,
                    ffn=int(d["intermediate_size"]), vocab=0 if vit else int(d["vocab_size"]),
                    gated_mlp=False, biases=True, learned_positions=positions,
                    tied_embeddings=True, head_out=int(d.get("num_labels", 1000 if vit else 2)),
                    input_patch_values=patch_values if vit else 0,
                )
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            return cls(
                name=label, kind="decoder", n_layers=int(d["num_hidden_layers"]), hidden=hidden,
                n_heads=heads, n_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                ffn=int(d["intermediate_size"]), vocab=int(d["vocab_size"]), gated_mlp=True,
                biases=bool(d.get("attention_bias", False)), learned_positions=0,
                tied_embeddings=bool(d.get("tie_word_embeddings", False)),
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
MODEL_CONFIGS: dict[str, ModelConfig] = {c.name: c for c in (
    ModelConfig(name="gpt2", kind="decoder", n_layers=12, hidden=768, n_heads=12, n_kv_heads=12,
                head_dim=64, ffn=3072, vocab=50257, gated_mlp=False, biases=True,
                learned_positions=1024),
    ModelConfig(name="smollm2-135m", kind="decoder", n_layers=30, hidden=576, n_heads=9,
                n_kv_heads=3, head_dim=64, ffn=1536, vocab=49152, gated_mlp=True, biases=False),
    ModelConfig(name="llama-3-8b", kind="decoder", n_layers=32, hidden=4096, n_heads=32,
                n_kv_heads=8, head_dim=128, ffn=14336, vocab=128256, gated_mlp=True,
                biases=False, tied_embeddings=False),
    ModelConfig(name="llama-2-70b", kind="decoder", n_layers=80, hidden=8192, n_heads=64,
                n_kv_heads=8, head_dim=128, ffn=28672, vocab=32000, gated_mlp=True,
                biases=False, tied_embeddings=False),
    ModelConfig(name="bert-base", kind="encoder", n_layers=12, hidden=768, n_heads=12,
                n_kv_heads=12, head_dim=64, ffn=3072, vocab=30522, gated_mlp=False, biases=True,
                learned_positions=512, head_out=2),
    ModelConfig(name="vit-base", kind="encoder", n_layers=12, hidden=768, n_heads=12,
                n_kv_heads=12, head_dim=64, ffn=3072, vocab=0, gated_mlp=False, biases=True,
                learned_positions=197, head_out=1000, input_patch_values=768),
    # The base Transformer of Vaswani et al. (6 encoder + 6 decoder layers, d=512), run as one
    # forward pass of 12 blocks: the reference work treats it as a fixed-length encoder model.
    ModelConfig(name="transformer-base", kind="encoder", n_layers=12, hidden=512, n_heads=8,
                n_kv_heads=8, head_dim=64, ffn=2048, vocab=37000, gated_mlp=False, biases=True,
                head_out=37000),
)}


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
