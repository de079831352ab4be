"""One token's share of a server: its open sessions and its forwards in flight.

A server with several tokens gives each token one `TokenQuota`, and everything the token
authorizes counts against it: its WebSocket connections' sessions and forwards, and its
OpenAI API requests (each one a session with one forward in flight at a time). Opening more
connections, or calling the HTTP API instead, does not buy a token more than its share.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from splitllm.runtime import protocol as wire


class QuotaExceeded(wire.ProtocolError):
    """A token at its limit of sessions: `busy` on a WebSocket, HTTP 429 on the OpenAI API."""

    def __init__(self, message: str) -> None:
        super().__init__("busy", message)


class TokenQuota:
    """The sessions and forwards in flight of one token, all its clients together."""

    def __init__(self, max_sessions: int, max_in_flight: int) -> None:
        self.max_sessions = max_sessions
        self.max_in_flight = max_in_flight
        self.sessions: set[str] = set()  # ids of the token's open sessions
        self.in_flight = 0  # forwards holding one of the token's slots
        self.waiting = 0  # forwards waiting for one
        self._slots = asyncio.Semaphore(max_in_flight)

    def check_open(self) -> None:
        """Raise QuotaExceeded if the token may open no more sessions now."""
        if len(self.sessions) >= self.max_sessions:
            raise QuotaExceeded(f"this token holds {self.max_sessions} sessions already (all "
                                "its connections and API requests together)")

    async def acquire(self) -> None:
        """Take a forward slot, waiting while the token has its limit in flight."""
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.in_flight += 1

    def release(self) -> None:
        """Give back a slot taken with `acquire`."""
        self.in_flight -= 1
        self._slots.release()

    @contextlib.asynccontextmanager
    async def forward_slot(self) -> AsyncIterator[None]:
        """Hold a forward slot for the block (given back however the block ends)."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()
