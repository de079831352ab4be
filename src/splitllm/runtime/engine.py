"""The batched serving engine: one queue of forwards from every session, one step at a time.

Continuous batching at unit granularity, as vLLM's scheduler does it with chunked prefill: each
step takes queued forwards under a token budget (decode rows first, so a long prompt never
stalls decoding; prompts are cut into chunks that fit; a forward passed over for
`STARVE_STEPS` steps goes first), then walks the units once (runtime/step.py). Forwards join
and leave between steps. Every forward is checked before it joins a step, so a bad frame only
ever fails its own session. One engine thread runs the steps; the event loop only enqueues and
awaits futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from splitllm.runtime import fused_kernel
from splitllm.runtime.gemv import install_fast_linear, pack_weights
from splitllm.runtime.hugepages import move_to_huge_pages
from splitllm.runtime.lane import Lap
from splitllm.runtime.metrics import ServerMetrics
from splitllm.runtime.packing import install_packed_attention
from splitllm.runtime.protocol import ForwardHeader, ProtocolError
from splitllm.runtime.session import ForwardResult, Prepared, ServerSession
from splitllm.runtime.step import RowOutput, StepRow, run_step, unit_seconds
from splitllm.runtime.units import UnitStack
from splitllm.stepmodel import queue_wait_s

STARVE_STEPS = 8  # a forward passed over this many steps is scheduled before all others
HISTORY_STEPS = 1024  # steps whose composition the engine remembers (tests, diagnostics)

Outcome = ForwardResult | BaseException


@dataclass(frozen=True)
class EngineConfig:
    """How much one step may take."""

    max_batch_tokens: int = 512  # token positions through the blocks per step (head: rows)
    max_batch_rows: int = 64  # forwards per step; 1 = one session at a time


@dataclass(frozen=True)
class Scheduled:
    """One row of a step that ran: whose forward, and how many of its tokens."""

    session: str
    owner: str
    tokens: int


@dataclass(eq=False)
class Job:
    """One queued forward of a session segment, maybe run in several chunks."""

    session: ServerSession
    header: ForwardHeader
    payload: bytes | memoryview
    deliver: Callable[[Outcome], None]
    enqueued_at: float = field(default_factory=time.perf_counter)
    prepared: Prepared | None = None
    done_tokens: int = 0
    steps_waited: int = 0
    hidden_parts: list[torch.Tensor] = field(default_factory=list)
    logits_parts: list[torch.Tensor] = field(default_factory=list)  # verify: earlier chunks'
    laps: list[Lap] = field(default_factory=list)  # of the steps it ran in, its own units'
    busy_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def tokens(self) -> int:
        p0, p1 = self.header.positions
        return p1 - p0

    @property
    def owner(self) -> str:
        """Whose forward this is: prefill budget is shared fairly between owners."""
        return self.session.owner or self.session.session_id

    @property
    def key(self) -> tuple[str, int]:
        """The segment this forward addresses: its forwards run one after the other."""
        return self.session.session_id, self.header.units[0]


def schedule(jobs: Sequence[Job], config: EngineConfig, n_units: int) -> list[tuple[Job, int]]:
    """(job, tokens it runs now) for one step: starved first, then decode, then prefill shared
    max-min fairly between owners (connections), each owner's forwards in arrival order."""
    seen: set[tuple[str, int]] = set()
    ready = []
    for job in jobs:  # queue order = arrival order
        if job.key not in seen:
            seen.add(job.key)
            ready.append(job)
    ready.sort(key=lambda j: (j.steps_waited < STARVE_STEPS, j.tokens - j.done_tokens > 1))
    ready = ready[:config.max_batch_rows]
    takes: dict[int, int] = {}
    budget = config.max_batch_tokens
    prefill: list[Job] = []
    for job in ready:
        left = job.tokens - job.done_tokens
        if job.header.units[0] >= n_units - 1:  # the head alone reads only the last position
            takes[id(job)] = left
        elif job.steps_waited >= STARVE_STEPS or left <= 1:
            takes[id(job)] = min(left, budget)
            budget -= takes[id(job)]
        else:
            prefill.append(job)
    demand: dict[str, int] = {}
    for job in prefill:
        demand[job.owner] = demand.get(job.owner, 0) + job.tokens - job.done_tokens
    shares = fair_shares(demand, budget)  # one connection's long prompts cannot take the step
    for job in prefill:
        takes[id(job)] = min(job.tokens - job.done_tokens, shares[job.owner])
        shares[job.owner] -= takes[id(job)]
    return [(job, takes[id(job)]) for job in ready if takes.get(id(job), 0) > 0]


def fair_shares(demand: dict[str, int], budget: int) -> dict[str, int]:
    """Max-min fair split of `budget`: small demands get all they ask, the rest equal shares."""
    shares: dict[str, int] = {}
    owners = sorted(demand, key=lambda owner: demand[owner])
    for k, owner in enumerate(owners):
        shares[owner] = min(demand[owner], budget // (len(owners) - k))
        budget -= shares[owner]
    return shares


class Engine:
    """The queue and the thread that runs batched steps on one UnitStack."""

    # Hears each step's laps (units that ran together: their wall and CPU seconds, tokens),
    # whether their CPU was timed, the whole step's (wall, CPU) seconds and its rows: the
    # server's live step model (runtime/live_steps.py). Units are timed in CPU seconds only
    # for it.
    on_step: Callable[[Sequence[Lap], bool, tuple[float, float], int], None] | None = None

    def __init__(self, stack: UnitStack, metrics: ServerMetrics, config: EngineConfig,
                 threads: int, start: bool = True) -> None:
        if config.max_batch_tokens < 1 or config.max_batch_rows < 1:
            raise ValueError("max_batch_tokens and max_batch_rows must be positive")
        install_packed_attention(stack.model)
        install_fast_linear(stack.model)  # decode steps of few rows at the speed of memory
        move_to_huge_pages(stack.model)  # weights streamed without TLB stalls (hugepages.py)
        self.packed_bytes = pack_weights(stack.model)  # steps of many rows: oneDNN's GEMM
        fused_kernel.warm_up()
        self.stack = stack
        self.metrics = metrics
        self.config = config
        self.threads = threads
        self.device = next(stack.model.parameters()).device
        self.queue: list[Job] = []
        self.wakeup = threading.Condition()
        self.stopping = False
        self.held = False
        self.history: deque[tuple[Scheduled, ...]] = deque(maxlen=HISTORY_STEPS)
        self.thread = threading.Thread(target=self._loop, name="splitllm-engine", daemon=True)
        if start:  # without its thread, the owner calls step() itself (tests)
            self.thread.start()

    def submit(self, session: ServerSession, header: ForwardHeader,
               payload: bytes | memoryview) -> asyncio.Future[ForwardResult]:
        """Queue a forward; the future gets its result (or its error) from the engine thread."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ForwardResult] = loop.create_future()

        def deliver(outcome: Outcome) -> None:
            loop.call_soon_threadsafe(_settle, future, outcome)

        self.put(Job(session, header, payload, deliver))
        return future

    def put(self, job: Job) -> None:
        """Queue a job (from any thread)."""
        with self.wakeup:
            self.queue.append(job)
            self.wakeup.notify()

    def stop(self) -> None:
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()

    @contextlib.contextmanager
    def held_back(self) -> Iterator[None]:
        """Run no step inside the block: what arrives meanwhile goes into the next step."""
        with self.wakeup:
            self.held = True
        try:
            yield
        finally:
            with self.wakeup:
                self.held = False
                self.wakeup.notify()

    def queued(self) -> int:
        with self.wakeup:
            return len(self.queue)

    def _loop(self) -> None:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():  # once for the thread, not once per step (run_step)
            self._serve()

    def _serve(self) -> None:
        while True:
            with self.wakeup:
                while (self.held or not self.queue) and not self.stopping:
                    self.wakeup.wait()
                if self.stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # a bug outside any one row: fail what is queued, go on
                with self.wakeup:
                    failed, self.queue = self.queue, []
                for job in failed:
                    job.deliver(exc)

    def step(self) -> None:
        """Check what is ready, run one batched step, deliver what finished."""
        with self.wakeup:
            jobs = list(self.queue)
        for job in jobs:
            if job.prepared is None and not self._prepare(job, jobs):
                self._remove(job)
        with self.wakeup:
            queued = [j for j in self.queue if j.prepared is not None]
        picks = schedule(queued, self.config, self.stack.n_units)
        if not picks:
            return
        picked = {id(job) for job, _ in picks}
        for job in queued:
            job.steps_waited = 0 if id(job) in picked else job.steps_waited + 1
        self._run(picks)

    def _prepare(self, job: Job, jobs: list[Job]) -> bool:
        """Check a job once it is first of its segment; False (error delivered) if it is bad."""
        earlier = next(j for j in jobs if j.key == job.key)
        if earlier is not job:
            return True  # it waits for the forward before it on the same segment
        try:
            job.prepared = job.session.prepare(job.header, job.payload, self.device)
        except ProtocolError as err:
            job.deliver(err)
            return False
        job.payload = b""  # decoded: the frame's bytes can go
        return True

    def _remove(self, job: Job) -> None:
        with self.wakeup:
            self.queue.remove(job)

    def _run(self, picks: list[tuple[Job, int]]) -> None:
        n = self.stack.n_units
        rows = [self._row(job, take, n) for job, take in picks]
        tokens = sum(take for _, take in picks)
        clock, cpu_clock = time.perf_counter(), time.thread_time()
        try:
            outputs, times = run_step(self.stack, rows, unit_cpu=self.on_step is not None)
        except Exception as exc:  # the step as a whole failed (e.g. out of memory): all its rows
            for job, _ in picks:
                self._remove(job)
                job.deliver(exc)
            return
        wall_s, cpu_s = time.perf_counter() - clock, time.thread_time() - cpu_clock
        self.history.append(tuple(Scheduled(job.session.session_id, job.owner, take)
                                  for job, take in picks))
        now = time.perf_counter()
        waits = [queue_wait_s(job.enqueued_at, now - wall_s) for job, _ in picks
                 if job.done_tokens == 0]
        self.metrics.record_step(times.laps, rows=len(rows), tokens=tokens, wall_s=wall_s,
                                 cpu_s=cpu_s, queue_waits_s=waits)
        if self.on_step is not None:
            self.on_step(times.laps, times.cpu, (wall_s, cpu_s), len(rows))
        for (job, take), row, output in zip(picks, rows, outputs, strict=True):
            share = take / tokens
            job.busy_s += wall_s * share
            job.cpu_s += cpu_s * share
            # its own units' laps (a lap never straddles a row's edge: runtime/step.py)
            job.laps.extend(lap for lap in times.laps
                            if row.start <= lap.units.start and lap.units.stop <= row.stop)
            job.done_tokens += take
            if output.error is not None:
                self._remove(job)
                job.deliver(output.error)
            elif job.done_tokens == job.tokens:
                self._remove(job)
                job.deliver(self._outcome(job, output))
            elif job.header.return_hidden and job.header.units[1] < n:
                assert output.out is not None
                job.hidden_parts.append(output.out)
            elif job.header.verify:
                assert output.out is not None
                job.logits_parts.append(output.out)

    def _row(self, job: Job, take: int, n: int) -> StepRow:
        prepared = job.prepared
        assert prepared is not None
        start, stop = prepared.units
        last_chunk = job.done_tokens + take == job.tokens
        verify = job.header.verify  # every position needs the head
        if not last_chunk and stop == n and not verify:
            stop = n - 1  # only the last chunk's last position needs the head
        x = prepared.x if take == job.tokens else \
            prepared.x[:, job.done_tokens:job.done_tokens + take]
        return StepRow(start, stop, x, prepared.positions[0] + job.done_tokens, prepared.cache,
                       head_positions=take if verify else 1)

    def _outcome(self, job: Job, output: RowOutput) -> Outcome:
        """The job's result, or its own error: one row failing after the step (its sampler,
        say) fails that row alone, and still gets its reply."""
        try:
            return self._finish(job, output)
        except Exception as exc:
            return exc

    def _finish(self, job: Job, output: RowOutput) -> ForwardResult:
        prepared = job.prepared
        assert prepared is not None
        session, header = job.session, job.header
        start, stop = prepared.units
        hidden = logits = token = tokens = None
        if stop == self.stack.n_units and output.greedy is not None and \
                session.sampler.greedy and not header.verify and not header.return_logits:
            token = output.greedy  # the compiled head's argmax of the logits: no tensor made
        elif stop == self.stack.n_units:
            out = output.out
            assert out is not None
            p0, p1 = header.positions
            if header.verify:  # the token after every position
                logits_cpu = torch.cat([*job.logits_parts, out]).float().cpu()  # [T, V]
                tokens = session.sampler.each(logits_cpu, p0 + 1)
                token = tokens[-1]
            else:  # [1, V]: the sampler's generator is on the CPU
                logits_cpu = out if out.dtype == torch.float32 and out.is_cpu else \
                    out.float().cpu()
                token = session.sampler(logits_cpu, p1)
            logits = logits_cpu if header.return_logits else None
        elif header.return_hidden:
            out = output.out
            assert out is not None
            whole = torch.cat([*job.hidden_parts, out], dim=1) if job.hidden_parts else out
            hidden = whole.to(device="cpu", dtype=session.wire_dtype)  # [1, T, D]
        session.record(prepared, job.busy_s, job.cpu_s, sampled=token is not None)
        return ForwardResult(hidden, token, logits, unit_seconds(job.laps, start, stop),
                             (start, stop), job.cpu_s,
                             tokens, prepared.rolled_back)


def _settle(future: asyncio.Future[ForwardResult], outcome: Outcome) -> None:
    if future.done():  # the waiter went away (its connection closed)
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
