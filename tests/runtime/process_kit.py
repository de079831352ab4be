"""`splitllm serve` in its own process, for tests that kill, freeze and restart the server."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Self

import httpx
from runtime_kit import TIMEOUT_S, wait_for

from splitllm.runtime.demo import free_port

SPLITLLM = str(Path(sys.executable).parent / "splitllm")
SERVER_START_S = 300.0  # a bound, not a speed check: a loaded 2-core machine imports torch slowly


class ServerProcess:
    """One `splitllm serve` on a fixed local port; start() again serves on the same port."""

    def __init__(self, model_dir: Path, log_dir: Path, port: int | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.model_dir = model_dir
        self.args = args  # more `serve` options
        self.port = port or free_port()
        self.log_path = log_dir / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Start the process; do not wait for it to serve."""
        with self.log_path.open("ab") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(
                [SPLITLLM, "serve", "--model", str(self.model_dir), "--port", str(self.port),
                 "--threads", "1", "--announce-device", "laptop", *self.args],
                stdout=subprocess.DEVNULL, stderr=log)
        return self

    def wait_serving(self) -> Self:
        """Wait until /health answers; fail with the server's log if it died."""
        assert self.proc is not None
        wait_for(lambda: self.healthy() or self.proc is None or self.proc.poll() is not None,
                 timeout_s=SERVER_START_S)
        assert self.proc.poll() is None, self.log_path.read_text()
        return self

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.http_url}/health", timeout=1.0).is_success
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL: the process dies at once, its connections are reset by the kernel."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=TIMEOUT_S)

    def freeze(self) -> None:
        """SIGSTOP: the process keeps its sockets open and never answers again."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=TIMEOUT_S)
