"""Running the server: in the foreground (`splitllm serve`) or on a local port in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import torch
from fastapi import FastAPI

from splitllm.runtime.guards import guarded_protocols
from splitllm.runtime.models import LoadedModel, freeze_heap
from splitllm.runtime.openai_api import server_router
from splitllm.runtime.server import FRAME_SLACK_BYTES, create_app
from splitllm.runtime.server_state import ServerConfig, ServerState


def uvicorn_config(app: FastAPI, host: str, port: int, config: ServerConfig) -> Any:
    """uvicorn settings: explicit WebSocket frame limit, no compression (hidden states), and
    the guarded protocols (connection cap, header and send deadlines, small pre-auth frames)."""
    import uvicorn

    http, ws = guarded_protocols(config.transport)
    return uvicorn.Config(
        app, host=host, port=port, log_level="warning", http=http, ws=ws,
        ws_max_size=config.max_frame_bytes + FRAME_SLACK_BYTES, ws_per_message_deflate=False,
        ws_ping_interval=20.0, ws_ping_timeout=20.0, lifespan="on",
    )


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) (0: any free port), for uvicorn to serve on: bound
    before the server's start-up work, so a port in use fails at once. The explicit
    IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on sockets whose proto says TCP, and
    without it Nagle + delayed ACKs hold back a reply's second frame ~40 ms."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def server_app(state: ServerState) -> FastAPI:
    """The whole server: the split-session app plus the OpenAI-compatible API."""
    app = create_app(state)
    app.include_router(server_router(state))
    return app


def serve_forever(loaded: LoadedModel, listener: socket.socket, config: ServerConfig) -> None:
    """Run the server on `listener` (`listening_socket`) in the foreground until
    interrupted."""
    import uvicorn

    if config.threads:
        torch.set_num_threads(config.threads)
    state = ServerState(loaded, config)
    freeze_heap()  # the model loaded, its units and steps timed: no pause walks them again
    host, port = listener.getsockname()[:2]
    uvicorn.Server(uvicorn_config(server_app(state), host, port, config)).run(
        sockets=[listener])


class BackgroundApp:
    """An app on a local port, served by uvicorn in a daemon thread (tests, demo, benchmark)."""

    def __init__(self, make_config: Callable[[int], Any], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        import uvicorn

        # Bind first so the port is known and free before uvicorn starts serving on it.
        self.socket = listening_socket(host, port)
        self.host, self.port = self.socket.getsockname()[:2]
        self.server = uvicorn.Server(make_config(self.port))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> Self:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.socket.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BackgroundServer(BackgroundApp):
    """A real splitllm server on a local port in a daemon thread."""

    def __init__(self, loaded: LoadedModel, config: ServerConfig | None = None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or ServerConfig()
        self.state = ServerState(loaded, self.config)
        app = server_app(self.state)
        super().__init__(lambda bound: uvicorn_config(app, host, bound, self.config), host, port)

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"
