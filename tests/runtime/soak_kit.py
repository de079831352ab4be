"""Soaking a server: many concurrent split sessions, and many open/close cycles.

Shared by tests/runtime/test_runtime_soak.py (which asserts errors and tokens) and
benchmarks/bench_soak.py (which also reports the per-token latencies).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import torch
from runtime_kit import TIMEOUT_S, RawClient, random_prompt

from splitllm.placement import Placement
from splitllm.runtime.decoding import LocalPipe, SplitPipe, generate_tokens
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.protocol import encode_tensor
from splitllm.runtime.remote import RemoteSession
from splitllm.runtime.transport import WebSocketTransport
from splitllm.runtime.units import UnitStack


@dataclass(frozen=True)
class SoakRun:
    """One session of a soak: what it generated, what it should have, and how fast."""

    tokens: tuple[int, ...]
    want: tuple[int, ...]
    token_s: tuple[float, ...]  # seconds between consecutive tokens (decode steps)
    error: str | None = None


def split_placement(n_units: int) -> Placement:
    """Embedding and head on the client, every block on the server: two crossings a pass."""
    return Placement("C" + "S" * (n_units - 2) + "C")


def soak_prompts(count: int, length: int, vocab: int, seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    return [random_prompt(rng, length, vocab) for _ in range(count)]


def unsplit_tokens(loaded: LoadedModel, prompts: list[list[int]], new_tokens: int
                   ) -> list[tuple[int, ...]]:
    """The unsplit model's greedy tokens for each prompt: what every session must get."""
    return [tuple(generate_tokens(LocalPipe(loaded.model), prompt, new_tokens))
            for prompt in prompts]


def one_session(loaded: LoadedModel, ws_url: str, prompt: list[int], want: tuple[int, ...],
                token: str | None = None) -> SoakRun:
    """A split generation on its own connection; any failure is recorded, not raised."""
    stack = UnitStack(loaded.model)
    placement = split_placement(stack.n_units)
    got: list[int] = []
    steps: list[float] = []
    try:
        transport = WebSocketTransport(ws_url, token=token)
        try:
            remote = RemoteSession(transport, placement, stack.n_units, timeout_s=TIMEOUT_S)
            clock = time.perf_counter()
            for next_token in generate_tokens(SplitPipe(stack, placement, remote), prompt,
                                              len(want)):
                now = time.perf_counter()
                got.append(next_token)
                steps.append(now - clock)
                clock = now
            remote.close()
        finally:
            transport.close()
    except Exception as exc:  # counted: a soak reports every error, it does not stop at one
        return SoakRun(tuple(got), want, tuple(steps[1:]), f"{type(exc).__name__}: {exc}")
    return SoakRun(tuple(got), want, tuple(steps[1:]))


def concurrent_sessions(loaded: LoadedModel, ws_url: str, prompts: list[list[int]],
                        wants: list[tuple[int, ...]], tokens: tuple[str | None, ...] = (None,)
                        ) -> list[SoakRun]:
    """One thread per session, all started together, the tokens taken in turn; their runs in
    prompt order."""
    runs: list[SoakRun | None] = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def run(k: int) -> None:
        torch.set_num_threads(1)
        start.wait()
        runs[k] = one_session(loaded, ws_url, prompts[k], wants[k], tokens[k % len(tokens)])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r if r is not None else SoakRun((), wants[k], (), "thread died")
            for k, r in enumerate(runs)]


def open_close_cycle(ws_url: str, n_units: int, prompt: list[int], token: str | None = None
                     ) -> int:
    """Connect, open an all-server session, run one prefill, close it, disconnect: its token."""
    client = RawClient(ws_url, token=token)
    try:
        session = client.open("S" * n_units)
        client.send(encode_tensor({"type": "forward", "session": session, "seq": 1,
                                   "units": [0, n_units], "positions": [0, len(prompt)]},
                                  torch.tensor([prompt], dtype=torch.long)))  # [1, T]
        reply = client.recv()[0]
        assert reply["type"] == "token", reply
        client.send_json({"type": "close", "session": session})
        closed = client.recv()[0]
        assert closed["type"] == "closed", closed
        return int(reply["token"])
    finally:
        client.close()


def cycles(ws_url: str, n_units: int, prompt: list[int], count: int,
           token: str | None = None) -> list[int]:
    """`count` open/close cycles, one after another: the token of each."""
    return [open_close_cycle(ws_url, n_units, prompt, token) for _ in range(count)]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
