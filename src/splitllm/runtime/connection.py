"""One client's WebSocket on the server: authentication, its sessions, its forwards.

The event loop only parses, checks and routes messages; model compute runs in the batched
engine's thread (runtime/engine.py) through `ServerState.run_forward`, so other connections stay
responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketDisconnected

from splitllm.runtime import protocol as wire
from splitllm.runtime.guards import lift_frame_limit
from splitllm.runtime.quota import TokenQuota
from splitllm.runtime.server_state import ServerState, bearer
from splitllm.runtime.session import ServerSession

GONE = (WebSocketDisconnect, WebSocketDisconnected, OSError)  # the peer went away mid-send


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


async def serve_connection(ws: WebSocket, state: ServerState) -> None:
    """Serve one WebSocket until it closes; its sessions end with it."""
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
