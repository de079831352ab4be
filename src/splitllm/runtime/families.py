"""The model families UnitStack splits: what each one's forward does around its decoder layers.

Every family here has the standard layout (token embedding, a list of decoder layers, final
norm, LM head). What differs between their forwards (transformers 5.24, `modeling_<type>.py`)
is one row of FAMILIES; everything else is done by calling the model's own modules. Gemma's
embedding scaling (x sqrt(hidden)) lives inside its embedding module, so calling it is enough;
per-layer attention types (full or sliding window) come from the config, as transformers'
own caches and masks read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splitllm.errors import UserError

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class Family:
    """Where a family keeps its modules and what its forward adds around them.

    Scales name config fields; the head applies them in the order the family's forward does.
    """

    body: str = "model"  # attribute of the *ForCausalLM holding the decoder
    embed: str = "embed_tokens"
    position_table: str | None = None  # learned absolute positions added to the embedding
    embed_multiplier: str | None = None  # hidden = embedding * config.<field>
    layers: str = "layers"
    norm: str = "norm"
    rotary: str | None = "rotary_emb"  # rotary tables computed once per forward
    rotary_per_layer_type: bool = False  # one rotary table per attention type (local/global)
    logit_multiplier: str | None = None  # logits * config.<field>
    logit_divisor: str | None = None  # logits / config.<field>
    logit_softcap: str | None = None  # logits = cap * tanh(logits / cap)


ROTARY_DECODER = Family()
FAMILIES: dict[str, Family] = {
    **dict.fromkeys(("llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "phi3",
                     "olmo2", "smollm3", "helium"), ROTARY_DECODER),
    "gemma2": Family(logit_softcap="final_logit_softcapping"),
    "gemma3_text": Family(rotary_per_layer_type=True, logit_softcap="final_logit_softcapping"),
    "olmo3": Family(rotary_per_layer_type=True),
    "granite": Family(embed_multiplier="embedding_multiplier", logit_divisor="logits_scaling"),
    "cohere": Family(logit_multiplier="logit_scale"),
    "gpt2": Family(body="transformer", embed="wte", position_table="wpe", layers="h",
                   norm="ln_f", rotary=None),
}

# Config flags that change the forward in ways the units do not reproduce: refused by name.
UNSUPPORTED_FLAGS = {
    "use_bidirectional_attention": "bidirectional attention",
    "add_cross_attention": "cross-attention",
}


def attention_layout(config: Any) -> tuple[tuple[str, int | None], ...]:
    """(attention type, window or None) of each decoder layer, as transformers' caches see it."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    pairs = zip(types, kwargs, strict=True)
    return tuple((kind, extra.get("sliding_window")) for kind, extra in pairs)


def splittable_family(config: Any) -> Family:
    """The family row of a config, or a one-line UserError naming what cannot be split."""
    model_type = str(getattr(config, "model_type", ""))
    family = FAMILIES.get(model_type)
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise UserError(f"model type {model_type!r} is not supported: splitllm knows the "
                        f"forward of {known}")
    for flag, what in UNSUPPORTED_FLAGS.items():
        if getattr(config, flag, False):
            raise UserError(f"model type {model_type!r} with {what} ({flag}) cannot be split")
    other = sorted({kind for kind, _ in attention_layout(config)} - {FULL, SLIDING})
    if other:
        raise UserError(f"model type {model_type!r} has layer type {other[0]!r}: only full and "
                        "sliding-window attention layers can be split")
    return family


def config_scale(config: Any, field: str | None) -> float | None:
    """The value of a family's scale field in a config (None: the family has no such scale)."""
    value = getattr(config, field, None) if field else None
    return None if value is None else float(value)


def module(root: Any, name: str, model_type: str) -> Any:
    """root.<name>, or a one-line UserError if this model lacks it."""
    found = getattr(root, name, None)
    if found is None:
        raise UserError(f"model type {model_type!r} has no module {name!r}: cannot be split")
    return found
