"""The splitllm server: FastAPI + uvicorn, one WebSocket per client connection.

The event loop only parses, checks and routes messages; model compute runs in the batched engine's
thread (runtime/engine.py), so /health, /metrics and other sessions stay responsive while a step
runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.websockets import WebSocketDisconnected

from splitllm.runtime import protocol as wire
from splitllm.runtime.engine import Engine, EngineConfig
from splitllm.runtime.guards import TransportLimits, lift_frame_limit
from splitllm.runtime.metrics import CONTENT_TYPE, ServerMetrics, gauge
from splitllm.runtime.models import LoadedModel, weights_fingerprint
from splitllm.runtime.profile import UnitProfile, measure_step_models, profile_units
from splitllm.runtime.quota import TokenQuota
from splitllm.runtime.session import (
    ForwardResult,
    KvBudget,
    Limits,
    ServerSession,
    default_max_kv_bytes,
)
from splitllm.runtime.units import UnitStack
from splitllm.stepmodel import StepModel

FRAME_SLACK_BYTES = wire.MAX_HEADER_BYTES + 1024  # the transport limit sits above ours
GONE = (WebSocketDisconnect, WebSocketDisconnected, OSError)  # the peer went away mid-send


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs and what it allows."""

    tokens: tuple[str, ...] = ()  # any one of them authorizes a client (none: no auth)
    max_sessions: int = 64
    # A connection's share of the sessions and of the engine: with 64 sessions and 8 per
    # connection, a few greedy connections still leave slots for others.
    max_sessions_per_connection: int = 8
    max_in_flight_per_connection: int = 8  # forwards a connection may have queued or running
    # The same two limits over all connections of one token (None: max_sessions shared
    # equally between the tokens, and that many forwards): one token's clients cannot crowd
    # out another token's, however many connections they open.
    max_sessions_per_token: int | None = None
    max_in_flight_per_token: int | None = None
    max_kv_bytes: int | None = None  # the KV cache of all sessions (None: half the device)
    idle_timeout_s: float = 300.0
    max_frame_bytes: int = 64 * 1024 * 1024
    auth_timeout_s: float = 10.0  # a connection without the token must authenticate within this
    transport: TransportLimits = field(default_factory=TransportLimits)
    limits: Limits = field(default_factory=Limits)
    threads: int | None = None  # torch intra-op threads for model compute
    engine: EngineConfig = field(default_factory=EngineConfig)
    profile: bool = True  # measure per-unit times and the step model at start
    announce_device: str = "measured"  # or a device preset name clients' auto placement assumes


class ServerState:
    """Everything the app serves: the model's units, sessions, counters, the engine."""

    def __init__(self, loaded: LoadedModel, config: ServerConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.stack = UnitStack(loaded.model)
        self.limits = replace(config.limits, max_context=min(config.limits.max_context,
                                                             self.stack.max_positions))
        self.metrics = ServerMetrics(self.stack.names)
        self.sessions: dict[str, tuple[ServerSession, Connection]] = {}
        fair_share = math.ceil(config.max_sessions / max(1, len(config.tokens)))
        self.sessions_per_token = config.max_sessions_per_token or fair_share
        self.in_flight_per_token = config.max_in_flight_per_token or self.sessions_per_token
        # One quota per token (by the token's index), shared by its connections and requests.
        self.quotas = tuple(TokenQuota(self.sessions_per_token, self.in_flight_per_token)
                            for _ in config.tokens)
        self.fingerprint = weights_fingerprint(loaded.model)
        # The engine thread gets this many intra-op threads; the caller's own setting is left
        # alone (a test or the demo may run a client in the same process).
        self.threads = config.threads or torch.get_num_threads()
        self.engine = Engine(self.stack, self.metrics, config.engine, self.threads)
        self.kv_budget = KvBudget(config.max_kv_bytes or default_max_kv_bytes(self.engine.device))
        self.profile: UnitProfile | None = profile_units(self.stack) if config.profile else None
        # The engine's step in wall seconds (latency) and in CPU seconds (the server's work).
        models = measure_step_models(self.stack) if config.profile else None
        self.step_model: StepModel | None = models[0] if models else None
        self.step_model_cpu: StepModel | None = models[1] if models else None
        self.started_at = time.time()

    def info(self) -> dict[str, Any]:
        """The /v1/info document."""
        cfg = self.config
        return {
            "protocol": wire.PROTOCOL_VERSION,
            "session_path": wire.SESSION_PATH,
            "model": self.loaded.model_id,
            "family": self.stack.family,
            "fingerprint": self.fingerprint,
            "dtype": self.loaded.dtype,
            "units": list(self.stack.names),
            "n_units": self.stack.n_units,
            "hidden_size": self.stack.hidden_size,
            "vocab_size": self.stack.vocab_size,
            "eos_token_ids": list(self.loaded.eos_token_ids),
            "wire_dtypes": list(wire.WIRE_DTYPES),
            "device": cfg.announce_device,  # what clients' auto placement assumes of this server
            "compute": str(self.engine.device),
            "threads": self.threads,
            "profile": self.profile.to_json() if self.profile else None,
            "step_model": self.step_model.to_json() if self.step_model else None,
            "step_model_cpu": self.step_model_cpu.to_json() if self.step_model_cpu else None,
            "engine": {"max_batch_tokens": cfg.engine.max_batch_tokens,
                       "max_batch_rows": cfg.engine.max_batch_rows},
            "limits": {
                "max_frame_bytes": cfg.max_frame_bytes,
                "max_header_bytes": wire.MAX_HEADER_BYTES,
                "max_probe_reply_bytes": wire.MAX_PROBE_REPLY_BYTES,
                "max_tokens_per_message": cfg.limits.max_tokens_per_message,
                "max_context": self.limits.max_context,
                "max_sessions": cfg.max_sessions,
                "max_sessions_per_connection": cfg.max_sessions_per_connection,
                "max_in_flight_per_connection": cfg.max_in_flight_per_connection,
                "max_sessions_per_token": self.sessions_per_token if cfg.tokens else None,
                "max_in_flight_per_token": self.in_flight_per_token if cfg.tokens else None,
                "max_kv_bytes": self.kv_budget.limit_bytes,
                "idle_timeout_s": cfg.idle_timeout_s,
            },
        }

    async def run_forward(self, session: ServerSession, header: wire.ForwardHeader,
                          payload: bytes | memoryview) -> ForwardResult:
        """Run one forward of a session in the engine's next steps: the one way compute runs.

        Only a forward that succeeds refreshes the session's idle timer (ServerSession.record):
        a client sending rejected forwards cannot hold its slot forever.
        """
        session.in_flight += 1  # the idle sweeper leaves a session alone while it computes
        try:
            result = await self.engine.submit(session, header, payload)
        except wire.ProtocolError:
            raise
        except Exception as exc:  # a bug or an out-of-memory: this session's state is suspect
            self.close_session(session.session_id, "error")
            raise wire.ProtocolError("internal", f"forward failed ({type(exc).__name__}: {exc}); "
                                     "the session was closed") from exc
        finally:
            session.in_flight -= 1
        p0, p1 = header.positions
        self.metrics.record_forward(p1 - p0, result.token is not None)
        if header.verify or result.rolled_back:
            self.metrics.record_speculation(verified=p1 - p0 if header.verify else 0,
                                            rolled_back=result.rolled_back)
        return result

    def authorized(self, header_value: str | None) -> bool:
        """Whether an `Authorization` header value (`Bearer <token>`, nothing else) is good."""
        return not self.config.tokens or self.token_index(bearer(header_value)) is not None

    def token_index(self, given: str | None) -> int | None:
        """Which of the server's tokens `given` is (None: none of them)."""
        if given is None:
            return None
        found = None
        for index, token in enumerate(self.config.tokens):  # all compared: no timing hint
            if hmac.compare_digest(given.encode(), token.encode()):
                found = index
        return found

    def quota(self, header_value: str | None) -> TokenQuota | None:
        """The quota of the token in an `Authorization` header value (None: no such token)."""
        index = self.token_index(bearer(header_value))
        return None if index is None else self.quotas[index]

    def admit(self, quota: TokenQuota | None) -> None:
        """Raise `busy` if no session may open now: the server is full, or the token's quota."""
        if len(self.sessions) >= self.config.max_sessions:
            raise wire.ProtocolError("busy", f"the server holds {self.config.max_sessions} "
                                     "sessions already; retry later")
        if quota is not None:
            quota.check_open()

    def add_session(self, session: ServerSession, owner: Connection) -> None:
        """Count a session opened for `owner` (a connection or an API request) as open."""
        self.sessions[session.session_id] = (session, owner)
        owner.sessions[session.session_id] = session
        if owner.quota is not None:
            owner.quota.sessions.add(session.session_id)
        self.metrics.record_open()

    def close_session(self, session_id: str, reason: str) -> ServerSession | None:
        """Forget a session and free its caches."""
        entry = self.sessions.pop(session_id, None)
        if entry is None:
            return None
        session, conn = entry
        session.close()
        conn.sessions.pop(session_id, None)
        if conn.quota is not None:
            conn.quota.sessions.discard(session_id)
        self.metrics.record_close(reason)
        return session

    def render_metrics(self) -> str:
        sessions = [s for s, _ in list(self.sessions.values())]
        return self.metrics.render(len(sessions), sum(s.cache_bytes() for s in sessions),
                                   extra=self._quota_metrics)

    def _quota_metrics(self) -> list[str]:
        # By the token's index: /metrics never shows a token itself.
        return [*gauge("splitllm_token_sessions", "Open sessions of each token (connections "
                       "and API requests).",
                       [(f'token="{i}"', len(q.sessions)) for i, q in enumerate(self.quotas)]),
                *gauge("splitllm_token_in_flight", "Forwards in flight of each token.",
                       [(f'token="{i}"', q.in_flight) for i, q in enumerate(self.quotas)])]


def bearer(header_value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value (None: none, or another
    scheme)."""
    scheme, _, given = (header_value or "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else None


def unauthorized(why: str) -> wire.ProtocolError:
    """The fatal error for a connection that has not authenticated."""
    return wire.ProtocolError("unauthorized", f"{why} (send 'Authorization: Bearer <token>', or "
                              "an 'open' message with 'token' first)", fatal=True)


class Connection:
    """One WebSocket: its sessions, its auth state, and a lock so that sends never interleave.

    The transport (runtime/guards.py) gives every send a deadline; until the connection has
    authenticated it also refuses frames larger than a control message. Its sessions and
    forwards count against its own limits and, on a server with tokens, its token's.
    """

    _ids = itertools.count(1)
    quota: TokenQuota | None = None  # that of the token that authorized it

    def __init__(self, ws: WebSocket, state: ServerState) -> None:
        self.ws = ws
        self.state = state
        self.sessions: dict[str, ServerSession] = {}
        self.authorized = False
        self.send_lock = asyncio.Lock()
        self.number = next(self._ids)
        self.notices: set[asyncio.Task[None]] = set()
        self.forwards: set[asyncio.Task[None]] = set()
        self.forward_slots = asyncio.Semaphore(state.config.max_in_flight_per_connection)
        if not state.config.tokens:
            self.authorize(None)
        elif (token := state.token_index(bearer(ws.headers.get("authorization")))) is not None:
            self.authorize(token)

    def authorize(self, token: int | None) -> None:
        """Trust this connection from now on: full-size frames, no auth deadline, and the
        quotas of its token (if the server has tokens)."""
        self.authorized = True
        if token is not None:
            self.quota = self.state.quotas[token]
        lift_frame_limit(self.ws)

    async def send(self, data: str | bytes) -> None:
        async with self.send_lock:
            if isinstance(data, bytes):
                await self.ws.send_bytes(data)
            else:
                await self.ws.send_text(data)
        self.state.metrics.record_bytes(sent=len(data))

    def notify(self, data: str) -> None:
        """Send in the background: shared housekeeping never waits on one connection."""
        task = asyncio.create_task(self._send_quietly(data))
        self.notices.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.notices.discard)

    async def _send_quietly(self, data: str) -> None:
        with contextlib.suppress(Exception):  # the connection is gone or stuck: nothing to tell
            await self.send(data)

    async def receive(self, data: str | bytes) -> bool:
        """Handle one frame, answering a rejected one with an `error`; False: close now."""
        header: dict[str, Any] = {}
        try:
            limit = self.state.config.max_frame_bytes
            if len(data) > limit:
                raise wire.ProtocolError("too_large", f"frame of {len(data)} bytes is over the "
                                         f"limit of {limit} bytes")
            header, payload = wire.frame_header(data)
            await self.handle(wire.parse_message(
                header, payload if isinstance(data, bytes) else None), payload)
        except wire.ProtocolError as err:
            return await self.reject(err if self.authorized or err.fatal
                                     else unauthorized(f"{err.code} before authentication"),
                                     header)
        return True

    async def reject(self, err: wire.ProtocolError, header: dict[str, Any] | None = None) -> bool:
        """Send the error for a rejected frame (and close on a fatal one); False: closed."""
        self.state.metrics.record_error(err.code)
        await self.send(wire.error_message(err, *wire.reply_ids(header or {})))
        if err.fatal:
            await self.ws.close(code=1008, reason=err.code)
        return not err.fatal

    async def handle(self, message: wire.Message, payload: memoryview) -> None:
        """Route one validated message; ProtocolError for anything wrong with it."""
        if not self.authorized:
            given = message.token if isinstance(message, wire.OpenMessage) else None
            token = self.state.token_index(given)
            if token is None:
                raise unauthorized("missing or wrong bearer token")
            self.authorize(token)
        if isinstance(message, wire.ForwardHeader):
            await self._start_forward(message, payload)
        elif isinstance(message, wire.OpenMessage):
            await self._open(message)
        elif isinstance(message, wire.CloseMessage):
            await self._close(message)
        elif isinstance(message, wire.PingMessage):
            await self.send(wire.text({"type": "pong", "t": message.t, "server_time": time.time()}))
        elif isinstance(message, wire.ProbeHeader):
            await self._probe(message)

    async def _open(self, message: wire.OpenMessage) -> None:
        state = self.state
        if message.protocol != wire.PROTOCOL_VERSION:
            raise wire.ProtocolError("bad_message", f"protocol {message.protocol} is not "
                                     f"supported (server speaks {wire.PROTOCOL_VERSION})")
        if len(self.sessions) >= state.config.max_sessions_per_connection:
            raise wire.ProtocolError("busy", "too many sessions on this connection")
        state.admit(self.quota)
        dtype = wire.WIRE_DTYPES[wire.wire_dtype_name(message.wire_dtype)]
        session_id = f"s{self.number}-{secrets.token_hex(6)}"
        session = ServerSession.open(session_id, state.stack, message.placement, dtype,
                                     message.sampling, state.limits, kv_budget=state.kv_budget,
                                     owner=f"c{self.number}")
        state.add_session(session, self)
        await self.send(wire.text({
            "type": "opened", "session": session_id, "placement": str(session.placement),
            "server_segments": session.server_segments, "units": list(state.stack.names),
            "wire_dtype": wire.DTYPE_NAMES[dtype],
        }))

    def _session(self, session_id: str) -> ServerSession:
        session = self.sessions.get(session_id)
        if session is None or session.closed:
            raise wire.ProtocolError("unknown_session", f"no open session {session_id!r} on "
                                     "this connection (closed, timed out, or never opened)")
        return session

    async def _start_forward(self, header: wire.ForwardHeader, payload: memoryview) -> None:
        """Start a forward and read on: a connection's sessions batch with each other. Waits
        (reading nothing more) while the connection, or its token, has its limit of forwards in
        flight."""
        session = self._session(header.session)
        await self.forward_slots.acquire()
        if self.quota is not None:
            try:
                await self.quota.acquire()
            except BaseException:  # cancelled while waiting: the connection is going away
                self.forward_slots.release()
                raise
        task = asyncio.create_task(self._forward(session, header, payload))
        self.forwards.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._forward_done)

    def _forward_done(self, task: asyncio.Task[None]) -> None:
        self.forwards.discard(task)
        self.forward_slots.release()
        if self.quota is not None:
            self.quota.release()

    async def _forward(self, session: ServerSession, header: wire.ForwardHeader,
                       payload: memoryview) -> None:
        try:
            await self._run_forward(session, header, payload)
        except wire.ProtocolError as err:
            with contextlib.suppress(*GONE):
                await self.reject(err, {"session": header.session, "seq": header.seq})
        except GONE:
            pass  # the client went away: the read loop ends the connection

    async def _run_forward(self, session: ServerSession, header: wire.ForwardHeader,
                           payload: memoryview) -> None:
        result = await self.state.run_forward(session, header, payload)
        p0, p1 = header.positions
        base = {"session": header.session, "seq": header.seq}
        if result.token is None:
            reply = {"type": "hidden", **base, "units": list(result.units), "positions": [p0, p1]}
            if result.hidden is None:  # the client asked for no output
                await self.send(wire.text({**reply, "type": "done"}))
            else:
                await self.send(wire.encode_tensor(reply, result.hidden))
            return
        if result.logits is not None:
            await self.send(wire.encode_tensor(
                {"type": "logits", **base, "positions": [p1 - result.logits.shape[0], p1]},
                result.logits))
        verified = {} if result.tokens is None else {"tokens": list(result.tokens)}
        await self.send(wire.text({"type": "token", **base, "position": p1,
                                   "token": result.token, **verified}))

    async def _close(self, message: wire.CloseMessage) -> None:
        session = self._session(message.session)
        self.state.close_session(session.session_id, "close")
        await self.send(wire.text({
            "type": "closed", "session": session.session_id,
            "stats": {"busy_s": session.busy_s, "cpu_s": session.cpu_s,
                      "tokens_processed": session.tokens_processed,
                      "tokens_sampled": session.tokens_sampled},
        }))

    async def _probe(self, message: wire.ProbeHeader) -> None:
        if message.reply_bytes > wire.MAX_PROBE_REPLY_BYTES:  # a tiny request, a bounded reply
            raise wire.ProtocolError("too_large", f"reply_bytes is over the limit of "
                                     f"{wire.MAX_PROBE_REPLY_BYTES}")
        await self.send(wire.encode_frame({"type": "probe_reply"}, bytes(message.reply_bytes)))

    def close_all(self, reason: str) -> None:
        for task in self.forwards:
            task.cancel()
        for session_id in list(self.sessions):
            self.state.close_session(session_id, reason)


async def _serve_connection(ws: WebSocket, state: ServerState) -> None:
    conn = Connection(ws, state)  # before accept: an authorized client's big frames fit at once
    await ws.accept()
    try:
        while True:
            deadline_s = None if conn.authorized else state.config.auth_timeout_s
            try:
                async with asyncio.timeout(deadline_s):
                    frame = await ws.receive()
            except TimeoutError:
                await conn.reject(unauthorized(f"no authentication within {deadline_s} s"))
                break
            if frame["type"] == "websocket.disconnect":
                break
            data: str | bytes | None = frame.get("bytes")
            if data is None:
                data = frame.get("text") or ""
            state.metrics.record_bytes(received=len(data))
            if not await conn.receive(data):
                break
    except GONE:
        pass  # the client went away, maybe while we were sending it a reply
    finally:
        # Disconnect (or a fatal error) ends every session of this connection: free caches now.
        conn.close_all("disconnect")


async def _sweep_idle(state: ServerState) -> None:
    """Close sessions idle for longer than the timeout (a client that went silent)."""
    interval_s = max(0.05, min(5.0, state.config.idle_timeout_s / 4))
    while True:
        await asyncio.sleep(interval_s)
        now = time.monotonic()
        for session_id, (session, conn) in list(state.sessions.items()):
            idle_s = now - session.last_active
            if idle_s > state.config.idle_timeout_s and not session.in_flight:
                state.close_session(session_id, "idle_timeout")
                err = wire.ProtocolError("idle_timeout", f"session closed after {idle_s:.0f} s "
                                         "without messages")
                conn.notify(wire.error_message(err, session_id))


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app: /health, /v1/info, /metrics and the session WebSocket."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep_idle(state))
        try:
            yield
        finally:
            sweeper.cancel()
            state.engine.stop()

    # No /docs, /redoc or /openapi.json: docs/protocol.md is the API's description, and an
    # unauthenticated schema of a token-protected server would tell strangers its routes.
    app = FastAPI(title="splitllm", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    def denied(request: Request) -> Response | None:
        if state.authorized(request.headers.get("authorization")):
            return None
        return JSONResponse({"error": "unauthorized",
                             "message": "missing or wrong bearer token"}, status_code=401)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "sessions": len(state.sessions)}

    @app.get("/v1/info", response_model=None)
    async def info(request: Request) -> Response | dict[str, Any]:
        return denied(request) or state.info()

    @app.get("/metrics", response_model=None)
    async def metrics(request: Request) -> Response:
        return denied(request) or PlainTextResponse(state.render_metrics(),
                                                    media_type=CONTENT_TYPE)


    @app.websocket(wire.SESSION_PATH)
    async def session_socket(ws: WebSocket) -> None:
        await _serve_connection(ws, state)

    return app
