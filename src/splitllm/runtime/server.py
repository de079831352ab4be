"""The splitllm server: FastAPI + uvicorn, one WebSocket per client connection.

The app (/health, /v1/info, /metrics, the session WebSocket) over one `ServerState`
(runtime/server_state.py); each WebSocket is a `Connection` (runtime/connection.py); an idle
sweeper closes sessions left silent. The event loop only parses, checks and routes messages;
model compute runs in the batched engine's thread (runtime/engine.py), so /health, /metrics and
other sessions stay responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from splitllm.runtime import protocol as wire
from splitllm.runtime.connection import serve_connection
from splitllm.runtime.metrics import CONTENT_TYPE
from splitllm.runtime.server_state import ServerState

FRAME_SLACK_BYTES = wire.MAX_HEADER_BYTES + 1024  # the transport limit sits above ours


async def _sweep_idle(state: ServerState) -> None:
    """Close sessions idle for longer than the timeout (a client that went silent)."""
    interval_s = max(0.05, min(5.0, state.config.idle_timeout_s / 4))
    while True:
        await asyncio.sleep(interval_s)
        now = time.monotonic()
        for session_id, (session, owner) in list(state.sessions.items()):
            idle_s = now - session.last_active
            if idle_s > state.config.idle_timeout_s and not session.in_flight:
                state.close_session(session_id, "idle_timeout")
                err = wire.ProtocolError("idle_timeout", f"session closed after {idle_s:.0f} s "
                                         "without messages")
                owner.notify(wire.error_message(err, session_id))


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
        await serve_connection(ws, state)

    return app
