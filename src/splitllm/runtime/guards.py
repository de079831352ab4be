"""Transport limits uvicorn lacks: a connection cap, header and send deadlines, pre-auth frames.

A peer that stops reading must not pin memory, and one that never finishes its request must
not pin a file descriptor: every send has a deadline (the peer must take the bytes, down to the
transport's low-water mark, in time, else the connection is aborted, not politely closed,
since a polite close waits for the peer to read); at most one frame is queued per connection.
Until the app says a connection is authorized, the WebSocket layer refuses any message larger
than a control message before buffering it (close code 1009).
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


def lift_frame_limit(ws: WebSocket) -> None:
    """Allow an authorized connection full-size frames (a no-op on servers without the guard)."""
    extension = (ws.scope.get("extensions") or {}).get(FRAME_LIMIT_EXTENSION)
    if extension is not None:
        extension["lift"]()


def guarded_protocols(limits: TransportLimits) -> tuple[type[GuardedHttp], type[GuardedWebSocket]]:
    """uvicorn.Config's `http` and `ws` protocol classes, bound to `limits`."""
    return (type("GuardedHttp", (GuardedHttp,), {"limits": limits}),
            type("GuardedWebSocket", (GuardedWebSocket,), {"limits": limits}))


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn.max_message_size = PRE_AUTH_FRAME_BYTES  # fragments count towards it too

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
