"""The OpenAI API's request bodies, errors and response shapes, shared by the server and the proxy.

Request bodies are pydantic models; `make_job` turns one into a checked `Job` (prompt token ids,
limits, sampling), or raises `ApiError`, which the routes send in OpenAI's error shape. Fields of
the API we cannot honour (n > 1, logprobs, tools, penalties) are refused with a 400 rather than
silently ignored; other unknown fields (user, metadata, ...) are accepted and ignored.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from splitllm.runtime.models import LoadedModel
from splitllm.runtime.protocol import Sampling

MAX_BODY_BYTES = 4 * 2**20  # a request body is read no further than this
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
Kind = Literal["chat", "text"]
FinishReason = Literal["stop", "length"]


class ApiError(Exception):
    """A request the API refuses: sent as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 429:
            return "requests"  # what OpenAI sends with rate_limit_exceeded on a request limit
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def unauthorized() -> ApiError:
    return ApiError(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                    "invalid_api_key")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StreamOptions(_Body):
    include_usage: bool = False


class SplitOptions(_Body):
    """The `splitllm` extension field: what the proxy's planner should aim for."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sla_s: float | None = Field(default=None, gt=0, le=86400)


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class _Request(_Body):
    """Fields shared by both endpoints."""

    model: str = Field(max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    splitllm: SplitOptions | None = None


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


@dataclass(frozen=True)
class Job:
    """One checked request: what to generate and how."""

    kind: Kind
    model: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    sla_s: float | None


def parse_body(kind: Kind, raw: bytes) -> ChatRequest | CompletionRequest:
    """The request model of a JSON body; ApiError 400 naming the first bad field."""
    cls: type[ChatRequest | CompletionRequest] = ChatRequest if kind == "chat" \
        else CompletionRequest
    try:
        return cls.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid(exc) from None


def invalid(exc: ValidationError) -> ApiError:
    """The 400 that names the first bad field of a failed validation."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    if first["type"].startswith("json"):
        return ApiError(400, f"the body is not valid JSON: {first['msg']}")
    return ApiError(400, f"{where}: {first['msg']}", "invalid_value", where)


def _refuse_unsupported(request: ChatRequest | CompletionRequest) -> None:
    unsupported = {
        "n": request.n != 1,
        "logprobs": bool(request.logprobs),
        "presence_penalty": request.presence_penalty != 0,
        "frequency_penalty": request.frequency_penalty != 0,
        "tools": isinstance(request, ChatRequest) and bool(request.tools),
        "echo": isinstance(request, CompletionRequest) and request.echo,
        "best_of": isinstance(request, CompletionRequest) and request.best_of not in (None, 1),
        "suffix": isinstance(request, CompletionRequest) and bool(request.suffix),
    }
    for field_name, refused in unsupported.items():
        if refused:
            raise ApiError(400, f"{field_name}: only the default is supported here "
                           "(n=1, no logprobs, tools, echo, suffix or penalties)",
                           "unsupported_value", field_name)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOP_SEQUENCES} non-empty sequences of at most "
                       f"{MAX_STOP_CHARS} characters", "invalid_value", "stop")
    return tuple(stops)


def chat_prompt_ids(loaded: LoadedModel, messages: list[ChatMessage]) -> list[int]:
    """Token ids of a conversation in the model's own chat template (as `encode_prompt` does)."""
    tokenizer = loaded.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"model {loaded.model_id} has no chat template: use /v1/completions",
                       "unsupported_model")
    turns = []
    for i, message in enumerate(messages):
        role = ROLES.get(message.role)
        if role is None:
            raise ApiError(400, f"messages.{i}.role: {message.role!r} is not one of "
                           f"{', '.join(ROLES)}", "invalid_value", f"messages.{i}.role")
        turns.append({"role": role, "content": _message_text(message, i)})
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])


def _message_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    if any(part.type != "text" or part.text is None for part in message.content):
        raise ApiError(400, f"messages.{index}.content: only text parts are supported",
                       "unsupported_value", f"messages.{index}.content")
    return "".join(part.text or "" for part in message.content)


def text_prompt_ids(loaded: LoadedModel, prompt: str | list[int] | list[str]) -> list[int]:
    """Token ids of a /v1/completions prompt: one string or one list of token ids."""
    vocab = loaded.model.config.vocab_size
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if loaded.tokenizer is None:
            raise ApiError(400, f"model {loaded.model_id} has no tokenizer: send token ids",
                           "unsupported_model", "prompt")
        return list(loaded.tokenizer(prompt)["input_ids"])
    if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
        raise ApiError(400, f"prompt: one string or one list of token ids in [0, {vocab}) "
                       "(batches of prompts are not supported)", "invalid_value", "prompt")
    return [int(t) for t in prompt]


def make_job(kind: Kind, request: ChatRequest | CompletionRequest, loaded: LoadedModel,
             max_context: int) -> Job:
    """The checked Job of a request for the served model; ApiError for what is wrong with it."""
    if request.model != loaded.model_id:
        raise ApiError(404, f"the model {request.model!r} does not exist here; this server has "
                       f"{loaded.model_id!r} (GET /v1/models)", "model_not_found", "model")
    _refuse_unsupported(request)
    stops = _stops(request.stop)
    if isinstance(request, ChatRequest):
        ids = chat_prompt_ids(loaded, request.messages)
        asked = request.max_completion_tokens or request.max_tokens
    else:
        ids = text_prompt_ids(loaded, request.prompt)
        asked = request.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
    if not ids:
        raise ApiError(400, "the prompt has no tokens", "invalid_value", "prompt")
    room = max_context - len(ids)
    max_tokens = asked if asked is not None else room
    if max_tokens > room:
        raise ApiError(400, f"this model's context is {max_context} tokens; the prompt has "
                       f"{len(ids)} and max_tokens asks for {max_tokens} more",
                       "context_length_exceeded", "max_tokens")
    options = request.stream_options
    try:
        sampling = Sampling(temperature=request.temperature, top_p=request.top_p,
                            seed=request.seed)
    except ValidationError as exc:  # e.g. a temperature too small to divide by
        raise invalid(exc) from None
    return Job(kind, loaded.model_id, tuple(ids), max_tokens, sampling, stops, request.stream,
               bool(options and options.include_usage),
               request.splitllm.sla_s if request.splitllm else None)


@dataclass(frozen=True)
class Outcome:
    """How a generation ended and what it cost."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    splitllm: dict[str, Any] | None = None

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Responder:
    """Builds the response objects and stream chunks of one request."""

    def __init__(self, job: Job) -> None:
        self.job = job
        prefix = "chatcmpl" if job.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.object = "chat.completion" if job.kind == "chat" else "text_completion"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.job.model,
                "choices": choices}

    def _choice(self, text: str | None, finish: str | None, chunk: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.job.kind == "text":
            choice["text"] = text or ""
        elif chunk:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return choice

    def complete(self, text: str, outcome: Outcome) -> dict[str, Any]:
        """The whole (non-streaming) response."""
        body = self._envelope(self.object, [self._choice(text, outcome.finish_reason, False)])
        body["usage"] = outcome.usage()
        if outcome.splitllm is not None:
            body["splitllm"] = outcome.splitllm
        return body

    def chunk(self, text: str | None, finish: str | None = None) -> dict[str, Any]:
        """One stream chunk carrying a text delta (or the final finish_reason)."""
        obj = "chat.completion.chunk" if self.job.kind == "chat" else "text_completion"
        body = self._envelope(obj, [self._choice(text, finish, True)])
        if self.job.include_usage:
            body["usage"] = None
        return body

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role."""
        if self.job.kind != "chat":
            return None
        body = self.chunk("")
        body["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return body

    def usage_chunk(self, outcome: Outcome) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage is set: no choices, the usage."""
        obj = "chat.completion.chunk" if self.job.kind == "chat" else "text_completion"
        body = self._envelope(obj, [])
        body["usage"] = outcome.usage()
        if outcome.splitllm is not None:
            body["splitllm"] = outcome.splitllm
        return body
