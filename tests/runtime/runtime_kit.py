"""Helpers for the runtime tests: tiny random models and tokenizers built offline."""

from __future__ import annotations

import json
import random
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Split inference runs some layers on the client and the rest on the server.",
    "Hidden states cross the network at every switch between client and server.",
]
VOCAB = 320
TIMEOUT_S = 60.0  # every network wait in these tests is bounded, generously: the CPU is shared


def save_tokenizer(path: Path) -> None:
    """A small byte-level BPE tokenizer with a chat template, trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   bos_token="<|im_start|>", eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def save_tiny_model(path: Path, config: PretrainedConfig, seed: int = 0) -> Path:
    """Random-init weights from a config, saved with a tokenizer as a Hugging Face directory."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    save_tokenizer(path)
    return path


def llama_config(layers: int = 4, **overrides: Any) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **overrides,
    )


def gpt2_config(layers: int = 4) -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=256,
        bos_token_id=1, eos_token_id=2,
    )


WINDOW = 6  # sliding window of the tiny sliding-window models: prompts of the tests are longer


def family_config(family: str, layers: int = 4) -> PretrainedConfig:
    """A tiny config of one family, its local/global and sliding-window features switched on."""
    from transformers import AutoConfig

    common: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    gemma = dict(head_dim=16, query_pre_attn_scalar=16)
    extra: dict[str, dict[str, Any]] = {
        "llama": {}, "olmo2": {}, "qwen3": dict(head_dim=32), "gemma": dict(head_dim=16),
        "mistral": dict(sliding_window=WINDOW), "phi3": dict(sliding_window=WINDOW),
        # Qwen2: full attention in the first half, sliding window above max_window_layers.
        "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW,
                      max_window_layers=layers // 2),
        # Gemma 2/3: sliding and full layers alternate; Gemma 3 has one rotary table per kind
        # and, like the real Gemma 3 models, no logit soft-capping.
        "gemma2": dict(gemma, sliding_window=WINDOW, attn_logit_softcapping=5.0,
                       final_logit_softcapping=3.0),
        "gemma3_text": dict(gemma, sliding_window=WINDOW, sliding_window_pattern=2,
                            final_logit_softcapping=None),
        "olmo3": dict(sliding_window=WINDOW),  # one full layer in every four
        "ministral": dict(sliding_window=WINDOW, head_dim=16), "helium": dict(head_dim=16),
        "smollm3": dict(no_rope_layer_interval=2),  # every other layer without rotary
        "granite": dict(embedding_multiplier=3.0, logits_scaling=4.0, residual_multiplier=0.5,
                        attention_multiplier=0.2),
        "cohere": dict(logit_scale=0.5),
    }
    if family == "gpt2":
        return gpt2_config(layers)
    return AutoConfig.for_model(family, **common, **extra[family])


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
            "olmo2", "gpt2", "olmo3", "ministral", "helium", "smollm3", "granite", "cohere")


def random_prompt(rng: random.Random, length: int, vocab: int = VOCAB) -> list[int]:
    """Token ids of a random prompt (special tokens 0..2 excluded)."""
    return [rng.randrange(3, vocab) for _ in range(length)]


class RawClient:
    """A bare WebSocket client for sending hand-made (and broken) frames to a server."""

    def __init__(self, ws_url: str, token: str | None = None, max_size: int = 2**24) -> None:
        from websockets.sync.client import connect

        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._cm = connect(ws_url + "/v1/session", additional_headers=headers,
                           max_size=max_size, compression=None, open_timeout=TIMEOUT_S,
                           close_timeout=2.0)
        self.ws = self._cm.__enter__()

    def send(self, data: str | bytes) -> None:
        self.ws.send(data)

    def send_json(self, message: dict[str, Any]) -> None:
        self.ws.send(json.dumps(message))

    def recv(self) -> tuple[dict[str, Any], bytes]:
        """The next message: (JSON header, payload) for binary, (JSON, b"") for text."""
        data = self.ws.recv(timeout=TIMEOUT_S)
        if isinstance(data, str):
            return json.loads(data), b""
        (length,) = struct.unpack_from("<I", data)
        return json.loads(data[4:4 + length]), data[4 + length:]

    def open(self, placement: str, **fields: Any) -> str:
        self.send_json({"type": "open", "placement": placement, **fields})
        reply, _ = self.recv()
        assert reply["type"] == "opened", reply
        return str(reply["session"])

    def forward(self, session: str, units: tuple[int, int], positions: tuple[int, int],
                tensor: torch.Tensor, seq: int = 1) -> None:
        from splitllm.runtime.protocol import encode_tensor

        self.send(encode_tensor({"type": "forward", "session": session, "seq": seq,
                                 "units": list(units), "positions": list(positions)}, tensor))

    def expect_error(self, code: str) -> dict[str, Any]:
        reply, _ = self.recv()
        assert reply["type"] == "error", reply
        assert reply["code"] == code, reply
        return reply

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def metrics(http_url: str, token: str | None = None) -> dict[str, float]:
    """The server's /metrics as {sample: value}."""
    import httpx

    from splitllm.runtime.metrics import parse_metrics

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(http_url + "/metrics", headers=headers, timeout=TIMEOUT_S)
    response.raise_for_status()
    return parse_metrics(response.text)


def wait_for(condition: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    """Poll until condition() holds; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def whole_decode_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The streamed pieces of the whole-sequence decode: the reference TextStream must match."""
    pieces, done = [], ""
    for end in range(1, len(ids) + 1):
        text = str(tokenizer.decode(ids[:end], skip_special_tokens=True))
        if not text.endswith("\ufffd"):
            pieces.append(text[len(done):])
            done = text
    pieces.append(str(tokenizer.decode(ids, skip_special_tokens=True))[len(done):])
    return [piece for piece in pieces if piece]


def stream_pieces(loaded: Any, ids: list[int]) -> tuple[list[str], str, int]:
    """TextStream's pieces for ids, its final text and the most tokens one push decoded."""
    from dataclasses import replace
    from types import SimpleNamespace

    from splitllm.runtime.textstream import TextStream

    longest = 0

    def decode(tokens: list[int], **options: Any) -> str:
        nonlocal longest
        longest = max(longest, len(tokens))
        return str(loaded.tokenizer.decode(tokens, **options))

    pieces: list[str] = []
    stream = TextStream(replace(loaded, tokenizer=SimpleNamespace(decode=decode)), pieces.append)
    for token in ids:
        stream.push(token)
    pushed_longest = longest
    stream.finish()
    return pieces, stream.text, pushed_longest
