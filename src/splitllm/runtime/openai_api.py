"""The OpenAI-compatible endpoints (/v1/models, /v1/chat/completions, /v1/completions).

One router serves them over any `Backend`, a source of generated token ids: the server's own
(`server_router`: requests run wholly on the server, through `ServerState.run_forward` like
every split session, so they batch, count in /metrics and take session slots, and with several
tokens count against the token's quota, alike) or the
proxy's (runtime/proxy.py: each request a split session against a remote server). The router
does what both share: auth, body limits, the chat template, text, stop sequences, usage, SSE.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from splitllm.runtime import protocol as wire
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.openai_schema import (
    MAX_BODY_BYTES,
    ApiError,
    FinishReason,
    Job,
    Kind,
    Outcome,
    Responder,
    make_job,
    parse_body,
    unauthorized,
)
from splitllm.runtime.quota import QuotaExceeded, TokenQuota
from splitllm.runtime.session import ServerSession
from splitllm.runtime.textstream import TextStream

if TYPE_CHECKING:
    from splitllm.runtime.server_state import ServerState


class TokenRun(Protocol):
    """One generation in progress: its token ids as they come, then what it cost."""

    def __aiter__(self) -> AsyncIterator[int]: ...

    async def aclose(self) -> None:
        """Stop producing and free the session (also after the last token); idempotent."""

    def report(self) -> dict[str, Any] | None:
        """The response's `splitllm` object, if the backend has one."""


class Backend(Protocol):
    """Where tokens come from."""

    loaded: LoadedModel
    max_context: int

    def authorized(self, header_value: str | None) -> bool: ...

    async def start(self, job: Job, authorization: str | None) -> TokenRun:
        """Begin a generation for an authorized request; ApiError (429 over the token's quota,
        503 at capacity) if it cannot start."""


class StopText:
    """Holds back text that may begin a stop sequence; cuts the text where the first one to
    end begins."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0  # characters of self.text already released
        self.stopped = False

    def add(self, delta: str) -> str:
        """Text that is safe to release after appending delta."""
        if self.stopped:
            return ""
        self.text += delta
        # A stop cannot start before `sent`: its beginning would have been held back. The
        # stop that ends first wins (as when generation stops at it, however the text is cut
        # into deltas); of two ending together, the longer.
        found = [(i + len(s), i) for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        if found:
            self.text = self.text[:min(found)[1]]
            self.stopped = True
            return self._release(len(self.text))
        held = max((k for s in self.stops for k in range(1, len(s))
                    if self.text.endswith(s[:k])), default=0)
        return self._release(max(len(self.text) - held, self.sent))

    def flush(self) -> str:
        """The rest, once no more text comes."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], end
        return out


class Assembler:
    """Token ids -> released text deltas: detokenizing, stop sequences, finish reason."""

    def __init__(self, loaded: LoadedModel, job: Job) -> None:
        self.pieces: list[str] = []
        self.stream = TextStream(loaded, self.pieces.append)
        self.stop = StopText(job.stop)
        self.eos = set(loaded.eos_token_ids)
        self.tokens = 0
        self.last: int | None = None

    def push(self, token: int) -> str:
        self.tokens += 1
        self.last = token
        self.stream.push(token)
        return self._drain()

    def finish(self) -> str:
        if not self.stop.stopped:
            self.stream.finish()
        return self._drain() + self.stop.flush()

    @property
    def finish_reason(self) -> FinishReason:
        return "stop" if self.stop.stopped or self.last in self.eos else "length"

    def _drain(self) -> str:
        text = "".join(self.pieces)
        self.pieces.clear()
        return self.stop.add(text) if text else ""


async def _deltas(run: TokenRun, tokens: AsyncIterator[int], assembler: Assembler
                  ) -> AsyncGenerator[str, None]:
    """Released text deltas of a run; frees the run however the iteration ends."""
    try:
        async for token in tokens:
            delta = assembler.push(token)
            if delta:
                yield delta
            if assembler.stop.stopped:
                break
        tail = assembler.finish()
        if tail:
            yield tail
    finally:
        await run.aclose()


async def _chain(first: int | None, rest: AsyncIterator[int]) -> AsyncIterator[int]:
    if first is None:
        return
    yield first
    async for token in rest:
        yield token


async def read_body(request: Request) -> bytes:
    """The body, read no further than MAX_BODY_BYTES."""
    declared = request.headers.get("content-length", "")
    size, chunks = int(declared) if declared.isdigit() else 0, []
    if size <= MAX_BODY_BYTES:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                break
            chunks.append(chunk)
    if size > MAX_BODY_BYTES:
        raise ApiError(400, f"the request body is over the limit of {MAX_BODY_BYTES} bytes",
                       "request_too_large")
    return b"".join(chunks)


class _EventStream(StreamingResponse):
    """An SSE response that always closes its events, so that a client gone mid-stream frees
    its session now (Starlette stops at the failed send and leaves the iterator to the GC)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await cast("AsyncGenerator[str, None]", self.body_iterator).aclose()


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


async def _sse(responder: Responder, deltas: AsyncGenerator[str, None], assembler: Assembler,
               run: TokenRun) -> AsyncIterator[str]:
    """The server-sent events of a stream, ending with `data: [DONE]`."""
    first = responder.first_chunk()
    if first is not None:
        yield _event(first)
    try:
        async for delta in deltas:
            yield _event(responder.chunk(delta))
    except ApiError as err:  # the status is sent already: the error goes in the stream
        yield _event(err.body())
        return
    finally:
        await deltas.aclose()  # closed here, not by the GC, when the client is gone
    outcome = _outcome(responder.job, assembler, run)
    last = responder.chunk(None, outcome.finish_reason)
    if outcome.splitllm is not None:
        last["splitllm"] = outcome.splitllm
    yield _event(last)
    if responder.job.include_usage:
        yield _event(responder.usage_chunk(outcome))
    yield "data: [DONE]\n\n"


def _outcome(job: Job, assembler: Assembler, run: TokenRun) -> Outcome:
    return Outcome(assembler.finish_reason, len(job.prompt_ids), assembler.tokens, run.report())


async def _complete(backend: Backend, kind: Kind, request: Request) -> Response:
    if not backend.authorized(request.headers.get("authorization")):
        raise unauthorized()  # before the body is read
    job = make_job(kind, parse_body(kind, await read_body(request)), backend.loaded,
                   backend.max_context)
    run = await backend.start(job, request.headers.get("authorization"))
    tokens = aiter(run)
    try:  # the first token before any reply: an upstream failure still gets its status
        first = await anext(tokens, None)
    except BaseException:
        await run.aclose()
        raise
    assembler, responder = Assembler(backend.loaded, job), Responder(job)
    deltas = _deltas(run, _chain(first, tokens), assembler)
    if job.stream:
        return _EventStream(_sse(responder, deltas, assembler, run),
                            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text = "".join([delta async for delta in deltas])
    return JSONResponse(responder.complete(text, _outcome(job, assembler, run)))


def openai_router(backend: Backend) -> APIRouter:
    """The OpenAI-compatible routes over a backend."""
    router = APIRouter()

    def model_card() -> dict[str, Any]:
        return {"id": backend.loaded.model_id, "object": "model", "created": 0,
                "owned_by": "splitllm"}

    async def answer(kind: Kind, request: Request) -> Response:
        # Bodies are parsed here rather than as FastAPI parameters: auth and the size limit
        # come before any parsing, and every refusal takes OpenAI's error shape.
        try:
            return await _complete(backend, kind, request)
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)

    @router.get("/v1/models", response_model=None)
    async def models(request: Request) -> Response | dict[str, Any]:
        if not backend.authorized(request.headers.get("authorization")):
            return JSONResponse(unauthorized().body(), status_code=401)
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{model_id:path}", response_model=None)
    async def model(model_id: str, request: Request) -> Response | dict[str, Any]:
        if not backend.authorized(request.headers.get("authorization")):
            return JSONResponse(unauthorized().body(), status_code=401)
        if model_id != backend.loaded.model_id:
            err = ApiError(404, f"the model {model_id!r} does not exist here", "model_not_found")
            return JSONResponse(err.body(), status_code=404)
        return model_card()

    @router.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        return await answer("chat", request)

    @router.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        return await answer("text", request)

    return router


# -- the server's own backend: requests run wholly on the server ---------------------------------


class _HttpOwner:
    """Stands where a WebSocket connection owns a session: the server closes it through this."""

    def __init__(self, quota: TokenQuota | None) -> None:
        self.sessions: dict[str, ServerSession] = {}
        self.quota = quota  # that of the request's token: its session and forwards count there

    def notify(self, data: str) -> None:
        """Nothing to tell: the request sees its session closed at its next forward."""


class ServerRun:
    """One request as an all-server session driven through `ServerState.run_forward`."""

    def __init__(self, state: ServerState, job: Job, quota: TokenQuota | None) -> None:
        try:  # the same admission as a WebSocket `open`
            state.admit(quota)
        except wire.ProtocolError as exc:
            raise api_error(exc) from None
        self.state, self.job, self.quota = state, job, quota
        self.n_units = state.stack.n_units
        self.session = ServerSession.open(f"http-{secrets.token_hex(6)}", state.stack,
                                          "S" * self.n_units, torch.float32, job.sampling,
                                          state.limits, kv_budget=state.kv_budget)
        state.add_session(self.session, _HttpOwner(quota))
        self.seq = 0
        self.tokens = self._generate()

    def __aiter__(self) -> AsyncIterator[int]:
        return self.tokens

    async def aclose(self) -> None:
        await self.tokens.aclose()
        self.state.close_session(self.session.session_id, "close")

    def report(self) -> dict[str, Any] | None:
        return None

    async def _generate(self) -> AsyncGenerator[int, None]:
        """Prefill in chunks (all but the last skip the head), then one token per forward."""
        ids, n = self.job.prompt_ids, self.n_units
        chunk = self.state.limits.max_tokens_per_message
        token: int | None = None
        for begin in range(0, len(ids), chunk):
            end = min(begin + chunk, len(ids))
            token = await self._forward(ids[begin:end], begin, n if end == len(ids) else n - 1)
        eos = set(self.state.loaded.eos_token_ids)
        for produced in range(1, self.job.max_tokens + 1):
            assert token is not None
            yield token
            if token in eos or produced == self.job.max_tokens:
                return
            token = await self._forward((token,), len(ids) + produced - 1, n)

    async def _forward(self, ids: tuple[int, ...], start: int, stop_unit: int) -> int | None:
        self.seq += 1
        header = wire.ForwardHeader(
            type="forward", session=self.session.session_id, seq=self.seq, units=(0, stop_unit),
            positions=(start, start + len(ids)), dtype="int64", shape=[1, len(ids)],
            return_hidden=False)
        payload = wire.tensor_bytes(torch.tensor([ids], dtype=torch.long))  # [1, T]
        # The token's forward slot, as a WebSocket forward takes it: waits while it has its
        # limit in flight, and is given back on completion, error or cancellation alike.
        slot = self.quota.forward_slot() if self.quota else contextlib.nullcontext()
        try:
            async with slot:
                result = await self.state.run_forward(self.session, header, payload)
        except wire.ProtocolError as exc:
            raise api_error(exc, "generation failed: ") from None
        return result.token


def api_error(exc: wire.ProtocolError, prefix: str = "") -> ApiError:
    """The API's error for a refusal of the server: 429 over the token's quota, 503 at the
    server's capacity (sessions or KV memory) or for a session gone, 500 otherwise."""
    if isinstance(exc, QuotaExceeded):
        return ApiError(429, prefix + exc.message, "rate_limit_exceeded")
    if exc.code in ("unknown_session", "busy", "over_capacity"):
        code = "server_busy" if exc.code == "busy" else exc.code
        return ApiError(503, prefix + exc.message, code)
    return ApiError(500, prefix + exc.message, exc.code)


class ServerBackend:
    """The server's model, all of it run here."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.loaded = state.loaded
        self.max_context = state.limits.max_context

    def authorized(self, header_value: str | None) -> bool:
        return self.state.authorized(header_value)

    async def start(self, job: Job, authorization: str | None) -> TokenRun:
        return ServerRun(self.state, job, self.state.quota(authorization))


def server_router(state: ServerState) -> APIRouter:
    """The OpenAI-compatible routes of `splitllm serve`."""
    return openai_router(ServerBackend(state))
