"""Transport limits uvicorn lacks: a connection cap, header, send and message deadlines.

A peer that stops reading must not pin memory, and one that never finishes its request must
not pin a file descriptor: every send has a deadline (the peer must take the bytes, down to the
transport's low-water mark, in time, else the connection is aborted, not politely closed,
since a polite close waits for the peer to read); at most one frame is queued per connection.
Until the app says a connection is authorized, the WebSocket layer refuses any message larger
than a control message before buffering it (close code 1009). Nor may a peer that never
finishes a message pin what it sent so far: a message must be complete within a deadline of
its first byte (else close code 1008), and the unfinished messages of all connections share
one byte budget (a connection that would pass it is closed with code 1013).
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import h11
from starlette.websockets import WebSocket
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import CloseCode

from splitllm.runtime import protocol as wire

PRE_AUTH_FRAME_BYTES = wire.HEADER_LEN.size + wire.MAX_HEADER_BYTES
FRAME_LIMIT_EXTENSION = "splitllm.frame_limit"  # ASGI scope extension: {"lift": callable}


def default_max_connections() -> int:
    """Half the process's open-file limit (the rest: model files, the listener), at most 1024."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1024 if soft < 0 else max(8, min(1024, soft // 2))


@dataclass(frozen=True)
class TransportLimits:
    """Limits on the server's TCP connections: how many, and how long each may dawdle."""

    # HTTP and WebSocket together: past the open-file limit, accept() fails for everyone.
    max_connections: int = field(default_factory=default_max_connections)
    header_timeout_s: float = 10.0  # a request's headers must arrive within this
    send_timeout_s: float = 30.0  # a peer must take each reply within this
    message_timeout_s: float = 60.0  # a message must be complete this long after its first byte
    # The bytes of begun, unfinished messages, all connections together (max_frame_bytes each
    # at most): a few peers that never finish cannot pin max_frame_bytes apiece.
    max_unfinished_bytes: int = 256 * 2**20


def lift_frame_limit(ws: WebSocket) -> None:
    """Allow an authorized connection full-size frames (a no-op on servers without the guard)."""
    extension = (ws.scope.get("extensions") or {}).get(FRAME_LIMIT_EXTENSION)
    if extension is not None:
        extension["lift"]()


def guarded_protocols(limits: TransportLimits) -> tuple[type[GuardedHttp], type[GuardedWebSocket]]:
    """uvicorn.Config's `http` and `ws` protocol classes, bound to `limits` (and one budget)."""
    budget = UnfinishedBudget(limits.max_unfinished_bytes)
    return (type("GuardedHttp", (GuardedHttp,), {"limits": limits}),
            type("GuardedWebSocket", (GuardedWebSocket,), {"limits": limits, "budget": budget}))


class UnfinishedBudget:
    """Bytes held in unfinished messages, per connection and in total, against one limit.

    The connection whose message would take the total past the limit is closed (code 1013, try
    again later), not paused: a paused transport would not even notice its peer leave. Those
    that hold the budget let go of it by their message deadline at the latest.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.held_bytes = 0
        self.held: dict[GuardedWebSocket, int] = {}

    def hold(self, conn: GuardedWebSocket, nbytes: int) -> bool:
        """Record what `conn` holds now; False (and nothing held): it would pass the limit."""
        over = nbytes > 0 and self.held_bytes - self.held.get(conn, 0) + nbytes > self.limit_bytes
        self.held_bytes -= self.held.pop(conn, 0)
        if nbytes and not over:
            self.held[conn] = nbytes
            self.held_bytes += nbytes
        return not over


class GuardedHttp(H11Protocol):
    """h11 with a cap on open connections and a deadline for each request's headers."""

    limits: ClassVar[TransportLimits]
    header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            transport.abort()  # refused at once: no file descriptor is held for it
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # uvicorn's keep-alive timer stops at the first byte received

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self.header_timer = self.loop.call_later(self.limits.header_timeout_s,
                                                 self._on_header_timeout)

    def _disarm_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _on_header_timeout(self) -> None:
        self.header_timer = None
        upgraded = self.transport.get_protocol() is not self
        waiting = self.conn.their_state in (h11.IDLE, h11.DONE)  # no request being received
        if not upgraded and waiting and (self.cycle is None or self.cycle.response_complete):
            self.transport.abort()


class GuardedWebSocket(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol with send deadlines and a small frame limit before auth."""

    limits: ClassVar[TransportLimits]
    budget: ClassVar[UnfinishedBudget]
    message_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn.max_message_size = PRE_AUTH_FRAME_BYTES  # fragments count towards it too

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Bytes of a message not yet complete: a partial frame, and the fragments before it.
        unfinished = len(self.conn.reader.buffer) + (self.conn.current_size or 0)
        if self.transport.is_closing():
            unfinished = 0  # failed or closed: nothing more is read, the buffers go with it
        if not unfinished:
            self._disarm_message_timer()
        elif self.message_timer is None:
            self._arm_message_timer()
        if not self.budget.hold(self, unfinished):
            self._fail(CloseCode.TRY_AGAIN_LATER, "unfinished messages over the server's budget")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_message_timer()
        self.budget.hold(self, 0)
        super().connection_lost(exc)

    def _arm_message_timer(self) -> None:
        self.message_timer = self.loop.call_later(self.limits.message_timeout_s,
                                                  self._on_message_timeout)

    def _disarm_message_timer(self) -> None:
        if self.message_timer is not None:
            self.message_timer.cancel()
            self.message_timer = None

    def _on_message_timeout(self) -> None:
        self.message_timer = None
        if self.read_paused:  # the app has not taken the last message: our wait, not the peer's
            self._arm_message_timer()
            return
        self.budget.hold(self, 0)
        self._fail(CloseCode.POLICY_VIOLATION, "message not finished in time")

    def _fail(self, code: CloseCode, reason: str) -> None:
        """Close with `code`: the app is told, the rest of the message is never read."""
        self._disarm_message_timer()
        if self.conn.close_sent is None and not self.transport.is_closing():
            self.conn.fail(code, reason)
            self.handle_parser_exception()  # tells the app, sends the close frame, closes

    def lift_frame_limit(self) -> None:
        self.conn.max_message_size = self.config.ws_max_size

    async def run_asgi(self) -> None:
        lift: Callable[[], None] = self.lift_frame_limit
        self.scope["extensions"][FRAME_LIMIT_EXTENSION] = {"lift": lift}
        await super().run_asgi()

    async def send(self, message: Any) -> None:
        try:
            async with asyncio.timeout(self.limits.send_timeout_s):
                await super().send(message)
                await self.writable.wait()  # the peer took it: one frame queued at most
        except TimeoutError:
            self.transport.abort()
            raise ClientDisconnected("the peer did not read a reply in time") from None
        if message["type"] == "websocket.close" and self.close_timer is not None:
            self.close_timer.cancel()  # uvicorn closes politely, which waits for a reader
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        self.transport.abort()  # the peer stopped answering pings: drop what it did not read
