"""Reaching a server: its /v1/info, the same-weights check, then a WebSocket; servers in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splitllm.errors import UserError
from splitllm.planner.network import Link
from splitllm.runtime import protocol as wire
from splitllm.runtime.transport import (
    CONNECT_TIMEOUT_S,
    EmulatedLink,
    Transport,
    WebSocketTransport,
)

DEFAULT_SERVER = "ws://127.0.0.1:8765"


def http_url(ws_url: str) -> str:
    """The HTTP base URL of a ws:// or wss:// server URL."""
    base = ws_url.rstrip("/").removesuffix(wire.SESSION_PATH)
    return "https://" + base[6:] if base.startswith("wss://") else "http://" + base[5:]


def fetch_info(server: str, token: str | None, timeout_s: float = CONNECT_TIMEOUT_S
               ) -> dict[str, Any]:
    """GET /v1/info of a server."""
    return dict(_get(server, token, "/v1/info", timeout_s).json())


def fetch_rows_per_step(server: str, token: str | None, timeout_s: float = CONNECT_TIMEOUT_S
                        ) -> float:
    """The rows (forwards) per engine step the server reports in /metrics (1 before any)."""
    from splitllm.runtime.metrics import parse_metrics

    values = parse_metrics(_get(server, token, "/metrics", timeout_s).text)
    steps = values.get("splitllm_engine_step_rows_count", 0.0)
    return values.get("splitllm_engine_step_rows_sum", 0.0) / steps if steps else 1.0


def _get(server: str, token: str | None, path: str, timeout_s: float) -> Any:
    """GET one page of a server (UserError if it cannot be had)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(http_url(server) + path, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach {server}: {exc or type(exc).__name__}") from None
    if response.status_code == 401:
        raise UserError(f"{server}: unauthorized (pass --token or set SPLITLLM_TOKEN)")
    if response.status_code != 200:
        raise UserError(f"{server}: {path} answered HTTP {response.status_code}")
    return response


@dataclass(frozen=True)
class Connection:
    """A live connection to one server and what the server said about itself."""

    server: str
    transport: Transport
    info: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Dialer:
    """How to reach the servers: their URLs in failover order, the token, the client's weights."""

    servers: tuple[str, ...]
    fingerprint: str  # the client's weights: a server with other weights is refused
    model_id: str
    token: str | None = None
    link: Link | None = None  # EMULATION: shape every connection like this link
    connect_timeout_s: float = CONNECT_TIMEOUT_S  # for /v1/info, then for the WebSocket

    def dial(self) -> Connection:
        """A connection to the first server, in order, that answers; UserError if none does."""
        reasons = []
        for server in self.servers:
            try:
                return self.dial_one(server)
            except UserError as exc:
                reasons.append(str(exc))
        if len(reasons) == 1:
            raise UserError(reasons[0])
        raise UserError("no server answered: " + "; ".join(reasons))

    def dial_one(self, server: str) -> Connection:
        """A connection to `server`, if it answers and runs the client's weights."""
        info = fetch_info(server, self.token, self.connect_timeout_s)
        if info.get("fingerprint") != self.fingerprint:
            raise UserError(f"the server {server} runs another model ({info.get('model')}, "
                            f"fingerprint {info.get('fingerprint')}) than this client "
                            f"({self.model_id}, {self.fingerprint})")
        limit = int(info.get("limits", {}).get("max_frame_bytes", 64 * 2**20))
        transport: Transport = WebSocketTransport(server, self.token,
                                                  limit + 2 * wire.MAX_HEADER_BYTES,
                                                  open_timeout_s=self.connect_timeout_s)
        if self.link is not None:
            transport = EmulatedLink(transport, self.link)
        return Connection(server, transport, info)
