"""Sessions that submit their forwards straight to an in-process engine: no sockets, no clients'
Python on the way, so a step holds every session that is waiting (the engine's capacity).

Each session prefills its prompt, then decodes one token per forward; its next forward is queued
the moment its result is delivered (on the engine thread), so with N sessions every decode step
has N rows. A split placement's client units run on a client thread (pinned to another core
where there is one), all waiting clients' in one packed step, and only the server's units go to
the engine.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from splitllm.runtime.engine import Engine, EngineConfig, Job, Outcome
from splitllm.runtime.metrics import ServerMetrics
from splitllm.runtime.protocol import DTYPE_NAMES, ForwardHeader, Sampling, tensor_bytes
from splitllm.runtime.session import ForwardResult, Limits, ServerSession
from splitllm.runtime.step import StepRow, run_step
from splitllm.runtime.units import SegmentCache, UnitStack


@dataclass(frozen=True)
class DriverRun:
    """What one run of `sessions` concurrent generations took."""

    sessions: int
    stamps: tuple[tuple[float, ...], ...]  # per session: when each of its tokens arrived
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
        self.in_engine = 0  # forwards queued in the engine or running there
        self.settled = threading.Condition()

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
        clock = time.perf_counter()
        with engine.held_back():  # every prompt is queued before the first step (or client)
            for gen in gens:
                self._forward(engine, inbox, gen, prompt)
        threading.Thread(target=self._client, args=(engine, inbox), daemon=True).start()
        for _ in gens:
            finished.acquire()
        wall_s = time.perf_counter() - clock
        engine.stop()
        inbox.put(None)
        if errors:
            raise RuntimeError(f"a session failed: {errors[0]!r}")
        return DriverRun(sessions, tuple(tuple(g.stamps) for g in gens), wall_s, metrics.cpu_s,
                         metrics.steps,
                         int(metrics.step_rows.total), sum(len(g.tokens) for g in gens))

    def _forward(self, engine: Engine, inbox: Inbox, gen: _Generation, ids: list[int]) -> None:
        if self.client_units:
            inbox.put((gen, ids))  # the client runs its units first, on its own thread
        else:
            self._submit(engine, gen, np.array([ids], dtype=np.int64), 0)  # [1, t]

    def _client(self, engine: Engine, inbox: Inbox) -> None:
        """The clients' units of every waiting session in one packed step (runtime/step.py), once
        the engine has handed back all it holds: on the one core that emulates them, sixteen
        clients one after the other would be the bottleneck, not the server."""
        if self.client_core is not None:
            os.sched_setaffinity(0, {self.client_core})  # this thread only
        torch.set_num_threads(1)
        while (item := inbox.get()) is not None:
            with self.settled:  # the rest of the step's results are on their way: wait for them
                self.settled.wait_for(lambda: self.in_engine == 0, timeout=1.0)
            waiting = [item]
            while not inbox.empty() and (item := inbox.get()) is not None:
                waiting.append(item)
            rows = [StepRow(0, self.client_units, torch.tensor([ids]), gen.position,
                            gen.client_cache) for gen, ids in waiting]  # [1, t] each
            outputs, _ = run_step(self.stack, rows)
            with engine.held_back():  # all of them into one step, as the prompts went
                for (gen, _), output in zip(waiting, outputs, strict=True):
                    assert output.out is not None, output.error
                    self._submit(engine, gen, output.out, self.client_units)  # [1, t, D]
            if item is None:
                return

    def _submit(self, engine: Engine, gen: _Generation, x: torch.Tensor | np.ndarray,
                start: int) -> None:
        """Queue the forward of x (token ids [1, t] or hidden states [1, t, D]), its header
        validated as a server's frame parser validates one (a server parses on its event loop's
        thread, on the engine's core: the verdict counts that cost)."""
        tokens = x.shape[1]
        gen.seq += 1
        header = ForwardHeader(
            type="forward", session=gen.server.session_id, seq=gen.seq,
            units=(start, self.stack.n_units), positions=(gen.position, gen.position + tokens),
            dtype=str(x.dtype) if isinstance(x, np.ndarray) else DTYPE_NAMES[x.dtype],
            shape=list(x.shape))
        gen.position += tokens
        with self.settled:
            self.in_engine += 1
        payload = x.tobytes() if isinstance(x, np.ndarray) else tensor_bytes(x)
        engine.put(Job(gen.server, header, payload, lambda outcome: self._settle(gen, outcome)))

    def _settle(self, gen: _Generation, outcome: Outcome) -> None:
        gen.deliver(gen, outcome)  # first: a split session's next forward is in the inbox now
        with self.settled:
            self.in_engine -= 1
            self.settled.notify_all()
