"""`splitllm proxy`: the OpenAI API on the client's machine, each request a split session.

Any OpenAI client pointed at the proxy gets split inference without code changes: the proxy
holds the client's copy of the model and one connection to the server, plans each request
(placement auto: measured link, this machine's measured profile, the SLA of the request's
`splitllm.sla_s` extension field or the default) and runs it with `Session.generate`. One
connection runs one generation at a time, so requests queue (a bounded queue: 503 beyond it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from splitllm.errors import UserError
from splitllm.placement import Placement
from splitllm.planner.instance import evaluate
from splitllm.runtime.autoplace import default_sla_s, with_sla
from splitllm.runtime.client import AutoPlan, Generation, Session, connect
from splitllm.runtime.models import LoadedModel, freeze_heap
from splitllm.runtime.openai_api import TokenRun, openai_router
from splitllm.runtime.openai_schema import ApiError, Job
from splitllm.runtime.transport import ServerError

AUTO = "auto"
MAX_QUEUED = 16  # requests waiting or running; more get 503
LOST_CONNECTION = frozenset({"closed", "timeout"})  # server errors after which we reconnect


@dataclass(frozen=True)
class ProxyConfig:
    """Where the server is and how to reach it."""

    server: str
    token: str | None = None
    wire_dtype: str = "float32"
    placement: str = "auto"  # or one fixed placement (C/S per unit) for every request
    max_queued: int = MAX_QUEUED
    emulate_link: str | None = None
    emulate_client_slowdown: float = 1.0


class _Cancelled(Exception):
    """Raised in the worker to end a generation nobody wants any more."""


def split_report(auto: AutoPlan, wall_s: float, ttft_s: float,
                 generation: Generation | None) -> dict[str, Any]:
    """The response's `splitllm` object: the plan, what it predicted, what was measured."""
    plan, instance = auto.plan, auto.instance
    server_only = evaluate(instance, Placement("S" * len(instance))).server_work
    report: dict[str, Any] = {
        "placement": str(plan.placement), "source": auto.source, "sla_s": instance.sla_s,
        "predicted_latency_s": plan.latency_s, "measured_latency_s": wall_s,
        "measured_ttft_s": ttft_s, "server_work_s": float(plan.server_work),
        "server_only_work_s": server_only,
        "server_work_saved": 1.0 - plan.server_work / server_only if server_only > 0 else 0.0,
    }
    if generation is not None:  # a run cut short (stop sequence) has no server stats
        report["measured_server_cpu_s"] = generation.server_cpu_s
    return report


class ProxyBackend:
    """A connection to the server and the client's copy of the model."""

    def __init__(self, loaded: LoadedModel, config: ProxyConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.session = self._connect()
        self.max_context = int(self.session.info.get("limits", {}).get("max_context", 0))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitllm-proxy")
        self.queued = 0
        self.lost = False  # the connection broke: reconnect before the next request

    def _connect(self) -> Session:
        cfg = self.config
        session = connect(cfg.server, self.loaded, token=cfg.token, wire_dtype=cfg.wire_dtype,
                          emulate_link=cfg.emulate_link,
                          emulate_client_slowdown=cfg.emulate_client_slowdown)
        if cfg.placement != AUTO:
            Placement.parse(cfg.placement, session.stack.n_units)  # a bad one fails at start
        if not session.info.get("profile"):
            session.close()
            raise UserError(f"{cfg.server} publishes no measured profile, which auto placement "
                            "needs: serve it with --device measured (the default)")
        session.measure_link()
        session.client_profile()  # measured once, here, rather than in the first request
        session.plan(8, 8)  # the planner's compiled kernels too (~10-20 s the very first time)
        return session

    def current_session(self) -> Session:
        """The connection, made again if the last one broke."""
        if self.lost:
            self.session.close()
            self.session = self._connect()
            self.lost = False
        return self.session

    def authorized(self, header_value: str | None) -> bool:
        return True  # the proxy serves this machine; the server checks the token

    async def start(self, job: Job, authorization: str | None) -> TokenRun:
        if self.queued >= self.config.max_queued:
            raise ApiError(503, f"the proxy has {self.queued} requests queued; retry later",
                           "server_busy")
        return ProxyRun(self, job)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.session.close()


class ProxyRun:
    """One request, generated in the proxy's worker thread in step with its reader.

    The worker waits for the reader to ask for each next token, so a reader that stops (a stop
    sequence, a client gone) ends the generation before another token is computed.
    """

    def __init__(self, backend: ProxyBackend, job: Job) -> None:
        self.backend, self.job = backend, job
        self.loop = asyncio.get_running_loop()
        self.items: asyncio.Queue[int | ApiError | None] = asyncio.Queue()
        self.wanted = threading.Semaphore(0)
        self.cancelled = threading.Event()
        self.splitllm: dict[str, Any] | None = None
        self.clock = time.perf_counter()
        self.first_s: float | None = None  # time to the first token, once it came
        backend.queued += 1
        self.future = self.loop.run_in_executor(backend.executor, self._work)
        self.future.add_done_callback(self._done)
        self.tokens = self._tokens()

    def __aiter__(self) -> AsyncIterator[int]:
        return self.tokens

    async def _tokens(self) -> AsyncGenerator[int, None]:
        while True:
            self.wanted.release()
            item = await self.items.get()
            if item is None:
                return
            if isinstance(item, ApiError):
                raise item
            yield item

    async def aclose(self) -> None:
        self.cancelled.set()  # first, and without waiting: a cancelled reader may not await
        self.wanted.release()
        await self.tokens.aclose()
        await asyncio.shield(self.future)

    def report(self) -> dict[str, Any] | None:
        return self.splitllm

    def _done(self, _: object) -> None:
        self.backend.queued -= 1

    def _put(self, item: int | ApiError | None) -> None:
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)

    def _give(self, token: int) -> None:
        """Worker side: hand one token over, then wait until the reader wants another."""
        if self.cancelled.is_set():
            raise _Cancelled
        if self.first_s is None:
            self.first_s = time.perf_counter() - self.clock
        self._put(token)
        self.wanted.acquire()
        if self.cancelled.is_set():
            raise _Cancelled

    def _plan(self, session: Session) -> AutoPlan:
        """The request's plan: the planner's (auto) or the configured placement's."""
        prompt_tokens, placement = len(self.job.prompt_ids), self.backend.config.placement
        if placement == AUTO:
            return session.plan(prompt_tokens, self.job.max_tokens, self.job.sla_s)
        instance, source = session.instance(prompt_tokens, self.job.max_tokens)
        instance = with_sla(instance, self.job.sla_s or default_sla_s(instance))
        fixed = Placement.parse(placement, session.stack.n_units)
        return AutoPlan(evaluate(instance, fixed), instance, f"fixed ({source} times)")

    def _work(self) -> None:
        generation: Generation | None = None
        try:
            self.wanted.acquire()
            if self.cancelled.is_set():
                return
            session = self.backend.current_session()
            auto = self._plan(session)
            self.clock = time.perf_counter()
            with contextlib.suppress(_Cancelled):  # the reader stopped: a cut-short run
                generation = session.generate(
                    list(self.job.prompt_ids), self.job.max_tokens,
                    placement=auto.plan.placement, sampling=self.job.sampling,
                    on_token=self._give)
            self.splitllm = split_report(auto, time.perf_counter() - self.clock,
                                         self.first_s or 0.0, generation)
        except UserError as exc:  # the SLA cannot be met
            message = str(exc).replace("--sla-s", "splitllm.sla_s")
            self._put(ApiError(400, message, "sla_infeasible", "splitllm.sla_s"))
        except ServerError as exc:
            self.backend.lost = self.backend.lost or exc.code in LOST_CONNECTION
            status = 503 if exc.code in ("busy", *LOST_CONNECTION) else 502
            self._put(ApiError(status, f"the splitllm server: {exc}", exc.code))
        except Exception as exc:  # a broken connection or a bug: the next request reconnects
            self.backend.lost = True
            self._put(ApiError(502, f"the split failed: {type(exc).__name__}: {exc}",
                               "upstream_error"))
        finally:
            self._put(None)


def create_proxy_app(backend: ProxyBackend) -> FastAPI:
    """The proxy's app: the OpenAI routes and /health."""
    app = FastAPI(title="splitllm proxy")
    app.include_router(openai_router(backend))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "server": backend.config.server, "queued": backend.queued}

    return app


def run_proxy(loaded: LoadedModel, config: ProxyConfig, listener: socket.socket,
              ready: Callable[[], None] | None = None) -> None:
    """Serve the proxy on `listener` (`hosting.listening_socket`) in the foreground until
    interrupted; `ready` runs once connected."""
    import uvicorn

    backend = ProxyBackend(loaded, config)
    freeze_heap()  # the model loaded, connected: no collection walks them again
    if ready is not None:
        ready()
    try:
        uvicorn.Server(uvicorn.Config(create_proxy_app(backend), log_level="warning")).run(
            sockets=[listener])
    finally:
        backend.close()
