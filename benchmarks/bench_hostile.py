"""What hostile clients cost a healthy split session, side by side in one run on loopback.

Each round runs the same healthy split generation beside one attack and reports its time per
output token (median and p99 over the decode steps), whether its tokens equal the unsplit
model's, the most bytes the server queued for its clients, and the connections it held:

- none: the healthy session alone;
- stuck readers: N clients that open a session, ask for two 60 MiB and eight 1 MiB probe
  replies, and never read;
- pre-auth frames: N clients without the token that each send a 60 MiB frame;
- silent sockets: 10 x N TCP connections that never send a request.

The raw-socket attackers are the test suite's (tests/runtime/hostile_kit.py).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_hostile.py [--model smollm2] [--tokens 32]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "runtime"))
from hostile_kit import SocketClient

from splitllm.placement import Placement
from splitllm.runtime import protocol as wire
from splitllm.runtime.decoding import LocalPipe, SplitPipe, generate_tokens
from splitllm.runtime.hosting import BackgroundServer
from splitllm.runtime.models import LoadedModel, encode_prompt, load_model
from splitllm.runtime.remote import RemoteSession
from splitllm.runtime.server_state import ServerConfig
from splitllm.runtime.transport import WebSocketTransport
from splitllm.runtime.units import UnitStack

TOKEN = "bench-token"
PROMPT = "Write a short story about a robot who learns to paint."
BIG = 60 * 2**20


def stuck_readers(server: BackgroundServer, n: int) -> list[SocketClient]:
    clients = []
    for _ in range(n):
        client = SocketClient(server, authorization=f"Bearer {TOKEN}", receive_buffer_bytes=4096)
        client.send_json({"type": "open", "placement": "S" * server.state.stack.n_units})
        for reply_bytes in [BIG] * 2 + [2**20] * 8:
            client.send_binary(wire.encode_frame({"type": "probe", "reply_bytes": reply_bytes}))
        clients.append(client)
    return clients


def pre_auth_frames(server: BackgroundServer, n: int) -> list[SocketClient]:
    clients = []
    for _ in range(n):
        client = SocketClient(server)
        with contextlib.suppress(OSError):  # a guarded server closes it after the length
            client.send_binary(bytes(BIG))
        clients.append(client)
    return clients


def silent_sockets(server: BackgroundServer, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(10 * n):
        with contextlib.suppress(OSError):
            socks.append(socket.create_connection((server.host, server.port), timeout=5))
    return socks


def queued_bytes(server: BackgroundServer) -> int:
    return sum(c.transport.get_write_buffer_size()
               for c in list(server.server.server_state.connections) if c.transport)


@contextlib.contextmanager
def peak(server: BackgroundServer) -> Iterator[dict[str, int]]:
    """Sample the server's queued bytes and connections while the body runs."""
    seen = {"queued": 0, "connections": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            seen["queued"] = max(seen["queued"], queued_bytes(server))
            seen["connections"] = max(seen["connections"],
                                      len(server.server.server_state.connections))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()


def healthy_run(loaded: LoadedModel, server: BackgroundServer, prompt: list[int],
                tokens: int) -> tuple[list[int], list[float]]:
    """A split generation (half the units on the server): its tokens and per-token seconds."""
    stack = UnitStack(loaded.model)
    half = stack.n_units // 2
    placement = Placement("C" * (stack.n_units - half) + "S" * half)
    transport = WebSocketTransport(server.ws_url, token=TOKEN)
    try:
        remote = RemoteSession(transport, placement, stack.n_units, timeout_s=600.0)
        got, steps = [], []
        clock = time.perf_counter()
        for token in generate_tokens(SplitPipe(stack, placement, remote), prompt, tokens):
            now = time.perf_counter()
            got.append(token)
            steps.append(now - clock)
            clock = now
        remote.close()
        return got, steps[1:]  # decode steps only
    finally:
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--attackers", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    prompt = encode_prompt(loaded, PROMPT)
    want = list(generate_tokens(LocalPipe(loaded.model), prompt, args.tokens))
    attacks: dict[str, Callable[[BackgroundServer, int], list[Any]]] = {
        "none": lambda server, n: [], "stuck readers": stuck_readers,
        "pre-auth frames": pre_auth_frames, "silent sockets": silent_sockets,
    }
    table = Table(title=f"healthy split session beside an attack ({args.attackers} attackers, "
                        f"{args.tokens} tokens, {loaded.model_id})")
    for column in ("attack", "same tokens", "tpot p50 ms", "tpot p99 ms", "peak queued MiB",
                   "peak connections"):
        table.add_column(column)
    for name, attack in attacks.items():
        config = ServerConfig(tokens=(TOKEN,), threads=1, profile=False)
        with BackgroundServer(loaded, config) as server:
            with peak(server) as seen:
                attackers = attack(server, args.attackers)
                got, steps = healthy_run(loaded, server, prompt, args.tokens)
            for attacker in attackers:
                attacker.close()
        steps_ms = sorted(s * 1000 for s in steps)
        table.add_row(name, "yes" if got == want else "NO", f"{statistics.median(steps_ms):.1f}",
                      f"{steps_ms[int(0.99 * (len(steps_ms) - 1))]:.1f}",
                      f"{seen['queued'] / 2**20:.1f}", str(seen["connections"]))
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
