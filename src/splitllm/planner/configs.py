"""Model configs: the architecture numbers the cost model needs (built in, or a config.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from splitllm.errors import UserError

Kind = Literal["decoder", "encoder"]



# What transformers' config classes (5.24) assume where a config.json is silent: which families
# tie their head to the embedding, and their default attention window.
TIED_BY_DEFAULT = frozenset({"gemma", "gemma2", "gemma3_text", "cohere", "smollm3"})
DEFAULT_WINDOW = {"mistral": 4096, "ministral": 4096, "gemma2": 4096, "gemma3_text": 4096,
                  "olmo3": 4096}
# Which layers use the window when the config has no `layer_types`: all of them, ...
SLIDING_EVERY_LAYER = frozenset({"mistral", "ministral", "phi3"})
# ... all but one global layer in every N (N: `sliding_window_pattern` or this default), ...
GLOBAL_EVERY = {"gemma2": 2, "gemma3_text": 6, "olmo3": 4}
# ... or, in Qwen, those above max_window_layers, and only with use_sliding_window.
QWEN = frozenset({"qwen2", "qwen3"})


def _sliding(model_type: str, d: dict[str, Any], layer: int) -> bool:
    """Whether a layer without an explicit `layer_types` entry uses the sliding window."""
    if model_type in SLIDING_EVERY_LAYER:
        return True
    if model_type in QWEN:
        return layer >= int(d.get("max_window_layers", 28))
    if model_type in GLOBAL_EVERY:
        return bool((layer + 1) % int(d.get("sliding_window_pattern", GLOBAL_EVERY[model_type])))
    return False


def _layer_windows(d: dict[str, Any], model_type: str, layers: int) -> tuple[int, ...]:
    """Attention window of each layer in tokens (0: full), () if no layer has one."""
    window = int(d.get("sliding_window", DEFAULT_WINDOW.get(model_type)) or 0)
    if model_type in QWEN and not d.get("use_sliding_window", False):
        window = 0
    types = d.get("layer_types")
    sliding = ([kind == "sliding_attention" for kind in types] if types
               else [_sliding(model_type, d, i) for i in range(layers)])
    windows = tuple(window if is_sliding else 0 for is_sliding in sliding[:layers])
    return windows if any(windows) else ()


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
    # Attention window of each block in tokens (0: full attention); () when every block is full.
    layer_windows: tuple[int, ...] = ()

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str | None = None) -> ModelConfig:
        """Read a Hugging Face `config.json`: a decoder of the Llama layout (Llama, Mistral,
        Qwen2/3, Gemma 1-3, Phi-3, OLMo 2/3, ...), GPT-2, BERT or ViT."""
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
            layers = int(d["num_hidden_layers"])
            return cls(
                name=label, kind="decoder", n_layers=layers, hidden=hidden,
                n_heads=heads, n_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                ffn=int(d["intermediate_size"]), vocab=int(d["vocab_size"]), gated_mlp=True,
                biases=bool(d.get("attention_bias", False)), learned_positions=0,
                tied_embeddings=bool(d.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT)),
                layer_windows=_layer_windows(d, model_type, layers),
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
    ModelConfig(name="qwen3-0.6b", kind="decoder", n_layers=28, hidden=1024, n_heads=16,
                n_kv_heads=8, head_dim=128, ffn=3072, vocab=151936, gated_mlp=True,
                biases=False, tied_embeddings=True),
    # Gemma 3 1B (text): 5 local layers (512-token window) for every global one.
    ModelConfig(name="gemma-3-1b", kind="decoder", n_layers=26, hidden=1152, n_heads=4,
                n_kv_heads=1, head_dim=256, ffn=6912, vocab=262144, gated_mlp=True,
                biases=False, tied_embeddings=True,
                layer_windows=_layer_windows({"sliding_window": 512}, "gemma3_text", 26)),
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
