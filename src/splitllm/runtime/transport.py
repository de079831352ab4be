"""The client's byte pipe to the server: a WebSocket, optionally behind an emulated link.

Emulation is for testbeds: `EmulatedLink` delays every frame by the planner's crossing time
(half the RTT plus its size over the link's bandwidth in its direction), so one machine can
stand for a phone on 4G.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Protocol

from splitllm.errors import UserError
from splitllm.planner.network import Link, crossing_s
from splitllm.runtime.protocol import SESSION_PATH

CONNECT_TIMEOUT_S = 10.0


class ServerError(RuntimeError):
    """The server rejected a message, or the connection failed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Transport(Protocol):
    """Frames to and from the server."""

    @property
    def bytes_sent(self) -> int: ...

    @property
    def bytes_received(self) -> int: ...

    def send(self, data: str | bytes) -> None: ...

    def recv(self, timeout_s: float) -> str | bytes: ...

    def close(self) -> None: ...


class WebSocketTransport:
    """A blocking WebSocket client (websockets' sync client, its I/O in a background thread)."""

    def __init__(self, url: str, token: str | None = None, max_frame_bytes: int = 80 * 2**20,
                 open_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        from websockets.exceptions import InvalidHandshake, InvalidURI
        from websockets.sync.client import connect

        if not url.startswith(("ws://", "wss://")):
            raise UserError(f"server {url!r}: expected ws://HOST:PORT or wss://HOST:PORT")
        uri = url.rstrip("/") + (SESSION_PATH if not url.rstrip("/").endswith(SESSION_PATH)
                                 else "")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._exit = contextlib.ExitStack()
        try:
            # Hidden states are incompressible floats: compression off; frames over 1 MiB allowed.
            self.ws = self._exit.enter_context(connect(
                uri, additional_headers=headers, max_size=max_frame_bytes, compression=None,
                open_timeout=open_timeout_s, close_timeout=2.0))
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            raise UserError(f"cannot connect to {uri}: {exc}") from None
        self.bytes_sent = 0
        self.bytes_received = 0
        self._dropped: str | None = None  # why the client closed the connection itself

    def send(self, data: str | bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        self._check_usable()
        try:
            self.ws.send(data)
        except ConnectionClosed as exc:
            raise _closed_error(exc) from None
        self.bytes_sent += len(data)

    def recv(self, timeout_s: float) -> str | bytes:
        from websockets.exceptions import ConnectionClosed

        self._check_usable()
        try:
            data = self.ws.recv(timeout=timeout_s)
        except TimeoutError:
            # The reply may still come and would then be read as the answer to the next
            # request: drop the connection (the server frees its sessions when it closes).
            self._dropped = f"a reply timed out after {timeout_s} s"
            self.close()
            raise ServerError("timeout", f"no reply from the server within {timeout_s} s; "
                              "closed the connection") from None
        except ConnectionClosed as exc:
            raise _closed_error(exc) from None
        self.bytes_received += len(data)
        return data

    def close(self) -> None:
        self._exit.close()

    def _check_usable(self) -> None:
        if self._dropped is not None:
            raise ServerError("closed", f"the connection was closed because {self._dropped}; "
                              "connect again")


def _closed_error(exc: Exception) -> ServerError:
    rcvd = getattr(exc, "rcvd", None)
    reason = f"code {rcvd.code} {rcvd.reason}".strip() if rcvd is not None else "no close frame"
    return ServerError("closed", f"the server closed the connection ({reason})")


class EmulatedLink:
    """EMULATION: shapes a transport like a real link (delay + bandwidth per frame)."""

    def __init__(self, inner: Transport, link: Link,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.inner = inner
        self.link = link
        self.sleep = sleep  # tests pass a virtual clock's sleep
        self.delay_s = 0.0  # total emulated delay added, for reports

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.inner.bytes_received

    def _wait(self, nbytes: int, up: bool) -> None:
        delay_s = crossing_s(self.link, up, float(nbytes))
        self.delay_s += delay_s
        self.sleep(delay_s)

    def send(self, data: str | bytes) -> None:
        self._wait(len(data), up=True)
        self.inner.send(data)

    def recv(self, timeout_s: float) -> str | bytes:
        data = self.inner.recv(timeout_s)
        self._wait(len(data), up=False)
        return data

    def close(self) -> None:
        self.inner.close()
