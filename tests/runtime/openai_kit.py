"""Helpers for the OpenAI API tests: a proxy on a local port, the reference run, a gated server."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import uvicorn
from runtime_kit import TIMEOUT_S
from typer.testing import CliRunner

from splitllm.cli import app
from splitllm.runtime.hosting import BackgroundApp, BackgroundServer
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.proxy import ProxyBackend, ProxyConfig, create_proxy_app

TOKEN = "openai-secret"


@dataclass(frozen=True)
class Target:
    """An OpenAI endpoint under test, and the splitllm server behind it."""

    name: str
    base_url: str  # ends in /v1
    server: BackgroundServer
    model: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=TOKEN, timeout=TIMEOUT_S,
                             max_retries=0)

    def post(self, path: str, body: Any, token: str | None = TOKEN, raw: bytes | None = None
             ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        content = raw if raw is not None else json.dumps(body).encode()
        return httpx.post(self.base_url + path, content=content, timeout=TIMEOUT_S,
                          headers={**headers, "Content-Type": "application/json"})


@contextmanager
def running_proxy(loaded: LoadedModel, server: BackgroundServer, **config: Any
                  ) -> Iterator[BackgroundApp]:
    """A real proxy (ProxyBackend + its app under uvicorn) on a free local port."""
    backend = ProxyBackend(loaded, ProxyConfig(server=server.ws_url, token=TOKEN, **config))
    proxy_app = create_proxy_app(backend)
    try:
        with BackgroundApp(lambda port: uvicorn.Config(
                proxy_app, host="127.0.0.1", port=port, log_level="warning")) as proxy:
            yield proxy
    finally:
        backend.close()


def reference(model_dir: Path, prompt: str, max_tokens: int, raw: bool) -> dict[str, Any]:
    """What `splitllm generate --local` gives for a prompt (greedy)."""
    args = ["generate", "--local", "--json", "--model", str(model_dir), "--prompt", prompt,
            "--max-new-tokens", str(max_tokens), "--threads", "1", *(["--raw"] if raw else [])]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


class Gate:
    """Holds every server forward until the test lets it through, one at a time."""

    def __init__(self, server: BackgroundServer) -> None:
        self.state = server.state
        self.original = server.state.run_forward
        self.permits = threading.Semaphore(0)
        self.passed = 0

    async def run_forward(self, *args: Any) -> Any:
        await asyncio.get_running_loop().run_in_executor(None, self.permits.acquire)
        self.passed += 1
        return await self.original(*args)

    def __enter__(self) -> Gate:
        self.state.run_forward = self.run_forward  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.state.run_forward = self.original  # type: ignore[method-assign]
        self.permits.release(1000)  # whatever still waits goes through

    def let_through(self, forwards: int = 1) -> None:
        self.permits.release(forwards)
