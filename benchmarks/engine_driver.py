"""Sessions that submit their forwards straight to an in-process engine: no sockets, no clients'
Python on the way, so a step holds every session that is waiting (the engine's capacity).

Each session prefills its prompt, then decodes one token per forward; its next forward is queued
the moment its result is delivered (on the engine thread), so with N sessions every decode step
has N rows. A split placement's client units run on a client thread (pinned to another core
where there is one), as a client would run them, and only the server's units go to the engine.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from splitllm.runtime.engine import Engine, EngineConfig, Job, Outcome
from splitllm.runtime.metrics import ServerMetrics
from splitllm.runtime.protocol import DTYPE_NAMES, ForwardHeader, Sampling, tensor_bytes
from splitllm.runtime.session import ForwardResult, Limits, ServerSession
from splitllm.runtime.units import SegmentCache, UnitStack


@dataclass(frozen=True)
class DriverRun:
    """What one run of `sessions` concurrent generations took."""

    sessions: int
    tpot_s: tuple[float, ...]  # per session: time per output token after the first
    wall_s: float
    server_cpu_s: float  # the engine thread's CPU seconds
    steps: int
    rows: int  # rows over all steps
    generated_tokens: int


@dataclass(eq=False)
class _Generation:
    """One session's progress: the server's half and the client's cache."""

    server: ServerSession
    client_cache: SegmentCache | None
    deliver: Callable[[_Generation, Outcome], None]
    tokens: list[int] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)  # when each token arrived
    position: int = 0
    seq: int = 0


Inbox = queue.Queue[tuple[_Generation, list[int]] | None]


class InProcessDriver:
    """Drives concurrent generations of one placement on one engine, forwards queued directly."""

    def __init__(self, stack: UnitStack, *, config: EngineConfig, client_units: int,
                 client_core: int | None) -> None:
        self.stack, self.config, self.client_units = stack, config, client_units
        self.client_core = client_core
        self.placement = "C" * client_units + "S" * (stack.n_units - client_units)

    def run(self, prompt: list[int], sessions: int, new_tokens: int) -> DriverRun:
        """Generate `new_tokens` in each of `sessions` sessions at once; greedy, no EOS stop."""
        metrics = ServerMetrics(self.stack.names)
        engine = Engine(self.stack, metrics, self.config, threads=1)
        inbox: Inbox = queue.Queue()
        finished = threading.Semaphore(0)
        errors: list[BaseException] = []

        def deliver(gen: _Generation, outcome: Outcome) -> None:  # on the engine thread
            if not isinstance(outcome, ForwardResult) or outcome.token is None:
                errors.append(outcome if isinstance(outcome, BaseException)
                              else RuntimeError("a forward returned no token"))
                finished.release()
                return
            gen.tokens.append(outcome.token)
            gen.stamps.append(time.perf_counter())
            if len(gen.tokens) == new_tokens:
                finished.release()
            else:
                self._forward(engine, inbox, gen, [outcome.token])

        gens = [_Generation(ServerSession.open(f"s{k}", self.stack, self.placement,
                                               torch.float32, Sampling(), Limits(),
                                               owner=f"c{k}"),
                            self.stack.new_cache(0, self.client_units), deliver)
                for k in range(sessions)]
        client = threading.Thread(target=self._client, args=(engine, inbox), daemon=True)
        client.start()
        clock = time.perf_counter()
        with engine.held_back():  # every prompt is queued before the first step
            for gen in gens:
                self._forward(engine, inbox, gen, prompt)
        for _ in gens:
            finished.acquire()
        wall_s = time.perf_counter() - clock
        engine.stop()
        inbox.put(None)
        if errors:
            raise RuntimeError(f"a session failed: {errors[0]!r}")
        return DriverRun(sessions, tuple((g.stamps[-1] - g.stamps[0]) / (len(g.stamps) - 1)
                                         for g in gens), wall_s, metrics.cpu_s, metrics.steps,
                         int(metrics.step_rows.total), sum(len(g.tokens) for g in gens))

    def _forward(self, engine: Engine, inbox: Inbox, gen: _Generation, ids: list[int]) -> None:
        if self.client_units:
            inbox.put((gen, ids))  # the client runs its units first, on its own thread
        else:
            self._submit(engine, gen, torch.tensor([ids]), 0)

    def _client(self, engine: Engine, inbox: Inbox) -> None:
        if self.client_core is not None:
            os.sched_setaffinity(0, {self.client_core})  # this thread only
        torch.set_num_threads(1)
        while (item := inbox.get()) is not None:
            gen, ids = item
            positions = torch.arange(gen.position, gen.position + len(ids))[None]  # [1, t]
            hidden = self.stack.run(0, self.client_units, torch.tensor([ids]), positions,
                                    gen.client_cache)  # [1, t, D]
            self._submit(engine, gen, hidden, self.client_units)

    def _submit(self, engine: Engine, gen: _Generation, x: torch.Tensor, start: int) -> None:
        tokens = x.shape[1]
        gen.seq += 1
        header = ForwardHeader(type="forward", session=gen.server.session_id, seq=gen.seq,
                               units=(start, self.stack.n_units),
                               positions=(gen.position, gen.position + tokens),
                               dtype=DTYPE_NAMES[x.dtype], shape=list(x.shape))
        gen.position += tokens
        engine.put(Job(gen.server, header, tensor_bytes(x),
                       lambda outcome: gen.deliver(gen, outcome)))
