"""`splitllm loadtest` on the real runtime: many concurrent split sessions against one server.

One probe replays the world's requests at one arrival rate: an asyncio loop releases each
request at its arrival time, its policy plans it (load-aware ones read the queue wait the
server reports on /metrics, read every `POLL_S` over one kept HTTP connection), and a worker
thread runs it as a real split
session (`Session.generate`, placement fixed by the plan) over its class's EMULATED link and
device (its units take what the class's device profile says: `loadtest_world.roofline_clock`).
Connections are pooled per client class and reused. A request still running when the probe
ends (its last arrival plus the longest SLA, or the time budget) is stopped and counts as a miss;
a probe that has certainly failed (more misses than the target and chance allow) stops early.
Each probe times the other work on this machine (its CPU less the load test's own processes',
`loadtest_host.foreign_cores`); after one that other work disturbed, the next waits for quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import httpx
import numpy as np

from splitllm.errors import UserError
from splitllm.runtime.client import Session
from splitllm.runtime.dialer import Dialer, http_url
from splitllm.runtime.loadtest import (
    BUSY,
    FOREIGN_CORES,
    POLL_S,
    PROCESS_CPU,
    QUEUE_WAIT,
    Outcome,
    Probe,
    ServerLoad,
    certainly_failed,
    counter_delta,
    run_record,
    server_job_s,
)
from splitllm.runtime.loadtest_host import Request, Together, foreign_cores, machine_busy_s
from splitllm.runtime.loadtest_idle import Alone
from splitllm.runtime.loadtest_world import EmulatedClass, first_requests, roofline_clock
from splitllm.runtime.metrics import parse_metrics
from splitllm.runtime.models import LoadedModel, freeze_heap, weights_fingerprint
from splitllm.runtime.transport import ServerError
from splitllm.sim.load import finished_met
from splitllm.sim.metrics import summarize
from splitllm.sim.policies import PlanPolicy
from splitllm.sim.workload import Workload, sample_workload
from splitllm.sim.world import World

QUIET_WAIT_S = 60.0  # after a disturbed probe, the longest the next one waits for other work
# on the machine to end (a second at a time)


class _Stopped(Exception):
    """The probe ended while this request still ran."""


@dataclass(frozen=True, kw_only=True)
class RunnerOptions:
    """Where the real load test runs and how wide."""

    server: str
    token: str | None = None
    max_in_flight: int = 64  # worker threads: requests beyond wait for one (it counts)
    server_here: bool = True  # the server runs on this machine: its CPU is the load test's own
    fleet: bool = False  # the clients' units only timed, not computed (`--clients fleet`)


def metrics_client(opts: RunnerOptions) -> httpx.Client:
    """The runner's one HTTP client for every /metrics read (thread-safe, its connection
    kept): 1.1 ms of the clients' process's CPU a read, where a fresh client per read (its
    connection pool and TLS context built anew), as before, took 28 ms, 11% of a core at one
    read every `POLL_S` (`benchmarks/loadtest_poll.py`)."""
    headers = {"Authorization": f"Bearer {opts.token}"} if opts.token else {}
    return httpx.Client(base_url=http_url(opts.server), headers=headers, timeout=10.0)


def read_metrics(http: httpx.Client) -> dict[str, float]:
    """The server's /metrics page, parsed."""
    try:
        response = http.get("/metrics")
    except httpx.HTTPError as exc:
        raise UserError(f"cannot read /metrics of {http.base_url}: {exc}") from None
    return parse_metrics(response.text)


def _steer(server_load: ServerLoad, world: World, load: Workload, r: int,
           future: asyncio.Future[Outcome]) -> None:
    """Request r's end, within its limits or not, steers the tuned headroom that load-reading
    policies plan with, as the simulator's meter does (a request stopped unfinished does not)."""
    if future.cancelled() or future.exception() is not None:
        return
    outcome = future.result()
    if not math.isnan(outcome.finished_s):
        server_load.request_done(finished_met(world.types[int(load.type_index[r])],
                                              outcome.first_token_s, outcome.finished_s,
                                              int(load.output_tokens[r])))


class RealRunner:
    """Probes on a real server: one LoadedModel, a connection pool per client class."""

    def __init__(self, loaded: LoadedModel, world: World, classes: tuple[EmulatedClass, ...],
                 opts: RunnerOptions, progress: Callable[[str], None] | None = None) -> None:
        self.loaded = loaded
        self.progress = progress
        self.disturbed = False  # other work took the machine during the last probe
        self.world = world
        self.classes = classes
        self.opts = opts
        self.http = metrics_client(opts)
        self.fingerprint = weights_fingerprint(loaded.model)
        self.pools: list[queue.SimpleQueue[Session]] = [queue.SimpleQueue() for _ in classes]
        self.opened = [0] * len(classes)
        self.pool = ThreadPoolExecutor(max_workers=opts.max_in_flight,
                                       thread_name_prefix="loadtest")
        self._start_workers()

    def _start_workers(self) -> None:
        """Start every worker thread now, before any clock: the pool starts them lazily, and
        on the clients' busy core one started mid-probe took its request up to 1.1 s late
        (the first probe's requests 44-156 ms late at the median against 3-12 ms once
        started)."""
        n = self.opts.max_in_flight
        everyone = threading.Barrier(n + 1)  # each thread waits here, so the next one starts
        for _ in range(n):
            self.pool.submit(everyone.wait)
        everyone.wait()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.http.close()
        for pool in self.pools:
            while not pool.empty():
                with contextlib.suppress(Exception):
                    pool.get_nowait().close()

    def metrics(self) -> dict[str, float]:
        """The server's /metrics page, parsed."""
        return read_metrics(self.http)

    def _session(self, class_index: int) -> Session:
        with contextlib.suppress(queue.Empty):
            return self.pools[class_index].get_nowait()
        return self._dial(class_index)

    def _dial(self, class_index: int) -> Session:
        self.opened[class_index] += 1
        emulated = self.classes[class_index]
        dialer = Dialer(servers=(self.opts.server,), fingerprint=self.fingerprint,
                        model_id=self.loaded.model_id, token=self.opts.token,
                        link=emulated.link)
        model = self.world.types[0].model
        assert model is not None  # the load test's request types all run the served model
        clock = roofline_clock(model, self.world.clients[class_index].device)
        return Session(self.loaded, dialer, client_clock=clock,
                       emulation=f"EMULATED {emulated.name}", compute_units=not self.opts.fleet)

    def _prompt(self, r: int, tokens: int) -> list[int]:
        vocab = int(self.loaded.model.config.vocab_size)
        return [(vocab // 3 + 7 * i + 13 * r) % vocab for i in range(tokens)]

    def _one(self, load: Workload, r: int, placement: str, planned: bool, start_s: float,
             stop: threading.Event) -> Outcome:
        """Run request r as a real split session (in a worker thread)."""
        arrived_s = start_s + float(load.arrived_at_s[r])
        late_s = time.perf_counter() - arrived_s
        first, last = [math.nan], [math.nan]

        def unfinished() -> Outcome:
            return Outcome(first_token_s=first[0], finished_s=math.nan, server_cpu_s=0.0,
                           placement=placement, planned=planned, started_late_s=late_s)

        if stop.is_set():
            return unfinished()

        def on_token(_: int) -> None:
            last[0] = time.perf_counter() - arrived_s
            if math.isnan(first[0]):
                first[0] = last[0]
            if stop.is_set():
                raise _Stopped

        c = int(load.class_index[r])
        session = self._session(c)
        try:
            generation = session.generate(
                self._prompt(r, int(load.prompt_tokens[r])), int(load.output_tokens[r]),
                placement=placement, chat=False, stop_at_eos=False, on_token=on_token)
        except (_Stopped, ServerError):
            self.pools[c].put(session)
            return unfinished()
        self.pools[c].put(session)
        # finished at its last token: closing the server's session after it (one more round
        # trip, for its stats) is not part of the answer's latency
        return Outcome(first_token_s=first[0], finished_s=last[0],
                       server_cpu_s=generation.server_cpu_s, placement=placement,
                       server_wall_s=generation.server_busy_s,
                       server_visits=generation.round_trips,
                       planned=planned, started_late_s=late_s)

    def alone(self, class_index: int, prompt_tokens: int, output_tokens: int, placement: str
              ) -> Alone:
        """One request of class `class_index` run by itself, its latency to its last token."""
        session = self._session(class_index)
        times: list[float] = []
        start_s, start_cpu_s = time.perf_counter(), time.process_time()
        try:
            generation = session.generate(
                self._prompt(0, prompt_tokens), output_tokens, placement=placement, chat=False,
                stop_at_eos=False, on_token=lambda _: times.append(time.perf_counter()))
        finally:
            self.pools[class_index].put(session)
        return Alone(latency_s=times[-1] - start_s, ttft_s=times[0] - start_s,
                     client_busy_s=generation.client_busy_s,
                     server_busy_s=generation.server_busy_s, round_trips=generation.round_trips,
                     client_cpu_s=time.process_time() - start_cpu_s)

    def together(self, requests: Sequence[Request]) -> Together:
        """Start `requests` (class, prompt, output tokens, placement) all at once through the
        probes' worker threads; the clients' process's CPU over them."""
        self._connect_ahead([c for c, *_ in requests])
        before = self.metrics()
        start_s, start_cpu_s = time.perf_counter(), time.process_time()
        futures = [self.pool.submit(self.alone, *request) for request in requests]
        runs = [future.result() for future in futures]
        wall_s, cpu_s = time.perf_counter() - start_s, time.process_time() - start_cpu_s
        busy_s = counter_delta(self.metrics(), before, BUSY)
        return Together(round_trips=tuple(run.round_trips for run in runs), cpu_s=cpu_s,
                        server_busy_share=busy_s / wall_s)

    @contextlib.contextmanager
    def computing(self, threads: int, segments: Sequence[tuple[int, int]]) -> Iterator[None]:
        """Within: `threads` threads of this process run the client unit ranges `segments`
        for real, one position a pass, without pause (the clients' cores busy with what the
        splits' clients compute)."""
        import torch

        from splitllm.runtime.units import UnitStack

        stack = UnitStack(self.loaded.model)
        stop = threading.Event()
        ids = torch.zeros((1, 1), dtype=torch.long)  # [1, 1]
        hidden = torch.zeros((1, 1, int(self.loaded.model.config.hidden_size)),
                             dtype=stack.dtype)  # [1, 1, D]

        def compute() -> None:
            with torch.inference_mode():
                while not stop.is_set():
                    for a, b in segments:
                        stack.run(a, b, ids if a == 0 else hidden, ids, stack.new_cache(a, b))

        workers = [threading.Thread(target=compute, daemon=True) for _ in range(threads)]
        for worker in workers:
            worker.start()
        try:
            yield
        finally:
            stop.set()
            for worker in workers:
                worker.join()

    def probe(self, policy: str, rate_per_s: float, time_left_s: float = math.inf) -> Probe:
        """Run `policy` at `rate_per_s` for real and measure it, ending within `time_left_s`
        (after a disturbed probe, first waiting for the machine to be quiet)."""
        if self.disturbed:
            time_left_s -= self._wait_quiet(min(QUIET_WAIT_S, time_left_s / 4))
        result = asyncio.run(self._probe(policy, rate_per_s, time_left_s))
        self.disturbed = result.disturbed
        return result

    def _wait_quiet(self, longest_s: float) -> float:
        """Wait, a second at a time and at most `longest_s`, until other work on the machine
        takes at most `FOREIGN_CORES` (the load test idle meanwhile); the seconds waited."""
        start_s = time.perf_counter()
        if self.progress is not None:
            self.progress(f"waiting up to {longest_s:.0f} s for other work on this machine to "
                          "end")
        while (left_s := longest_s - (time.perf_counter() - start_s)) > 0:
            machine_s, own_s, then_s = machine_busy_s(), time.process_time(), time.perf_counter()
            time.sleep(min(left_s, 1.0))
            if not foreign_cores(machine_busy_s() - machine_s, time.process_time() - own_s,
                                 time.perf_counter() - then_s) > FOREIGN_CORES:
                break
        return time.perf_counter() - start_s

    def _connect_ahead(self, class_index: Sequence[int] | np.ndarray) -> None:
        """Open the connections requests of these classes may need before a clock starts (a
        handshake over an emulated link is not part of a request)."""
        counts = np.bincount(np.asarray(class_index, dtype=np.int64),
                             minlength=len(self.classes))
        for c, count in enumerate(counts):
            while self.opened[c] < min(int(count), self.opts.max_in_flight):
                self.pools[c].put(self._dial(c))

    async def _probe(self, policy: str, rate_per_s: float, time_left_s: float) -> Probe:
        world = self.world.with_rate(rate_per_s)
        load = sample_workload(world)
        self._connect_ahead(load.class_index)
        n = len(load)
        plans = PlanPolicy(world, policy)
        kinds = [(int(load.type_index[r]), int(load.class_index[r]), int(load.prompt_tokens[r]),
                  int(load.output_tokens[r])) for r in range(n)]
        # planned before the clock (a fleet's clients plan each on its own device; here all
        # would plan in the arrival loop, on the clients' one core): at an arrival only a
        # load-reading policy's choice under the load it reads is left to compute
        for kind in kinds:
            plans.decide(*kind)
        freeze_heap()  # no collection of what lives across probes stalls every client in one
        server_load = ServerLoad(tau_s=world.wait_tau_s, quantile=world.wait_quantile,
                                 headroom=world.plan_headroom, target=world.headroom_target)
        before = self.metrics()
        server_load.update(time.perf_counter(), before)
        stop = threading.Event()
        start_s, start_cpu_s, start_machine_s = (time.perf_counter(), time.process_time(),
                                                 machine_busy_s())
        at_horizon = asyncio.create_task(self._metrics_at(start_s + world.horizon_s))
        futures: list[asyncio.Future[Outcome]] = []
        loop = asyncio.get_running_loop()
        watcher = asyncio.create_task(self._watch(world, load, futures, start_s, stop,
                                                  server_load if plans.sees_load else None))
        natural_end_s = start_s + world.horizon_s + world.max_sla_s
        end_s = min(natural_end_s, start_s + time_left_s)  # the time budget cuts it off
        for r in range(n):
            await asyncio.sleep(max(start_s + float(load.arrived_at_s[r]) - time.perf_counter(),
                                    0.0))
            if stop.is_set() or time.perf_counter() >= end_s:
                break
            decision = plans.decide(*kinds[r], server_load.load() if plans.sees_load else None)
            future = loop.run_in_executor(
                self.pool, self._one, load, r, decision.placement.sides, decision.planned,
                start_s, stop)
            if plans.sees_load:  # its end steers the tuned headroom (in this loop's thread)
                future.add_done_callback(partial(_steer, server_load, world, load, r))
            futures.append(future)
        pending = set(futures)  # wait (never cancelling) until all are done or the probe ends
        while pending and not stop.is_set() and time.perf_counter() < end_s:
            _, pending = await asyncio.wait(
                pending, timeout=min(POLL_S, max(end_s - time.perf_counter(), 0.0)))
        stopped_early = stop.is_set()
        cut_off = not stopped_early and end_s < natural_end_s and (len(futures) < n
                                                                    or bool(pending))
        stop.set()  # the requests still running end at their next token
        outcomes = [await future for future in futures]
        watcher.cancel()
        wall_s = time.perf_counter() - start_s
        client_cpu_s = time.process_time() - start_cpu_s
        machine_s = machine_busy_s() - start_machine_s
        after = self.metrics()
        own_s = client_cpu_s + (counter_delta(after, before, PROCESS_CPU)
                                if self.opts.server_here else 0.0)
        # busy within the arrivals' window, as the simulator counts it (the whole probe also
        # holds the drain of the last requests: a long request's work after the window)
        window = at_horizon.result() if at_horizon.done() else after
        at_horizon.cancel()
        kept = first_requests(load, len(outcomes))  # those released before any early stop
        waits = counter_delta(after, before, QUEUE_WAIT + "_count")
        record = run_record(policy, rate_per_s, kept, outcomes, horizon_s=world.horizon_s,
                            busy_s=counter_delta(window, before, BUSY),
                            busy_total_s=counter_delta(after, before, BUSY),
                            queue_wait_mean_s=counter_delta(after, before, QUEUE_WAIT + "_sum")
                            / waits if waits else 0.0)
        finished = [o for o in outcomes if not math.isnan(o.finished_s)]
        done = len(finished)
        late = [o.started_late_s for o in outcomes if not math.isnan(o.started_late_s)]
        cpu_s = counter_delta(after, before, PROCESS_CPU)
        return Probe(metrics=summarize(world, record), wall_s=wall_s,
                     process_cpu_s_per_request=cpu_s / done if done and PROCESS_CPU in after
                     else math.nan, stopped_early=stopped_early, cut_off=cut_off,
                     server_job_s=server_job_s(before, after) if done else math.nan,
                     client_cores_busy=client_cpu_s / wall_s,
                     server_wall_s_per_request=float(np.nanmean(
                         [o.server_wall_s for o in finished])) if finished else math.nan,
                     server_visits_per_request=float(np.mean(
                         [o.server_visits for o in finished])) if finished else math.nan,
                     foreign_cores=foreign_cores(machine_s, own_s, wall_s),
                     started_late_p90_s=float(np.percentile(late, 90)) if late else math.nan,
                     placements=tuple(o.placement for o in outcomes))

    async def _metrics_at(self, when_s: float) -> dict[str, float]:
        """The server's /metrics page at `when_s` (time.perf_counter)."""
        await asyncio.sleep(max(when_s - time.perf_counter(), 0.0))
        return await asyncio.to_thread(self.metrics)

    async def _watch(self, world: World, load: Workload, futures: list[asyncio.Future[Outcome]],
                     start_s: float, stop: threading.Event, server_load: ServerLoad | None
                     ) -> None:
        """Poll the server's load; stop the probe once so many requests missed that its
        attainment is below the target by more than chance (`noise_band`): a probe near the
        target runs to its end, to be judged with its repeats."""
        sla = np.array([world.types[k].sla_s for k in load.type_index])
        while not stop.is_set():
            await asyncio.sleep(POLL_S)
            if server_load is not None:
                page = await asyncio.to_thread(self.metrics)
                server_load.update(time.perf_counter(), page)
            now_s = time.perf_counter() - start_s
            late = np.asarray(load.arrived_at_s) + sla < now_s
            finished_late = sum(f.done() and f.exception() is None
                                and not f.result().finished_s <= sla[r]
                                for r, f in enumerate(futures))
            pending_late = sum(not f.done() and late[r] for r, f in enumerate(futures))
            if certainly_failed(finished_late + pending_late, len(load),
                                world.sweep.target_attainment):
                stop.set()
