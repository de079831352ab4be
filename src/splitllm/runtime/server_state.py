"""What a splitllm server holds: its configuration, its model's units, its sessions and their
owners, its tokens' quotas, its engine, and what /v1/info announces.

A session's owner is a WebSocket connection (runtime/connection.py) or an OpenAI API request
(runtime/openai_api.py): anything that keeps its sessions, counts against a token's quota and
can be told, in the background, that the server closed one of them.
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from splitllm.runtime import protocol as wire
from splitllm.runtime.engine import Engine, EngineConfig
from splitllm.runtime.guards import TransportLimits
from splitllm.runtime.live_steps import START_UP, LiveStepModel, StepModels
from splitllm.runtime.metrics import ServerMetrics, gauge
from splitllm.runtime.models import LoadedModel, weights_fingerprint
from splitllm.runtime.profile import UnitProfile, measure_step_models, profile_units
from splitllm.runtime.quota import TokenQuota
from splitllm.runtime.session import (
    ForwardResult,
    KvBudget,
    Limits,
    ServerSession,
    default_max_kv_bytes,
)
from splitllm.runtime.units import UnitStack


class SessionOwner(Protocol):
    """Who opened a session: it keeps its sessions, counts against its token's quota (None:
    no tokens), and hears of a session the server closed (never blocking the server)."""

    sessions: dict[str, ServerSession]
    quota: TokenQuota | None

    def notify(self, data: str) -> None: ...


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs and what it allows."""

    tokens: tuple[str, ...] = ()  # any one of them authorizes a client (none: no auth)
    max_sessions: int = 64
    # A connection's share of the sessions and of the engine: with 64 sessions and 8 per
    # connection, a few greedy connections still leave slots for others.
    max_sessions_per_connection: int = 8
    max_in_flight_per_connection: int = 8  # forwards a connection may have queued or running
    # The same two limits over all connections of one token (None: max_sessions shared
    # equally between the tokens, and that many forwards): one token's clients cannot crowd
    # out another token's, however many connections they open.
    max_sessions_per_token: int | None = None
    max_in_flight_per_token: int | None = None
    max_kv_bytes: int | None = None  # the KV cache of all sessions (None: half the device)
    idle_timeout_s: float = 300.0
    max_frame_bytes: int = 64 * 1024 * 1024
    auth_timeout_s: float = 10.0  # a connection without the token must authenticate within this
    transport: TransportLimits = field(default_factory=TransportLimits)
    limits: Limits = field(default_factory=Limits)
    threads: int | None = None  # torch intra-op threads for model compute
    engine: EngineConfig = field(default_factory=EngineConfig)
    profile: bool = True  # measure per-unit times and the step model at start
    announce_device: str = "measured"  # or a device preset name clients' auto placement assumes


class ServerState:
    """Everything the app serves: the model's units, sessions, counters, the engine."""

    def __init__(self, loaded: LoadedModel, config: ServerConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.stack = UnitStack(loaded.model)
        self.limits = replace(config.limits, max_context=min(config.limits.max_context,
                                                             self.stack.max_positions))
        self.metrics = ServerMetrics(self.stack.names)
        self.sessions: dict[str, tuple[ServerSession, SessionOwner]] = {}
        fair_share = math.ceil(config.max_sessions / max(1, len(config.tokens)))
        self.sessions_per_token = config.max_sessions_per_token or fair_share
        self.in_flight_per_token = config.max_in_flight_per_token or self.sessions_per_token
        # One quota per token (by the token's index), shared by its connections and requests.
        self.quotas = tuple(TokenQuota(self.sessions_per_token, self.in_flight_per_token)
                            for _ in config.tokens)
        self.fingerprint = weights_fingerprint(loaded.model)
        # The engine thread gets this many intra-op threads; the caller's own setting is left
        # alone (a test or the demo may run a client in the same process).
        self.threads = config.threads or torch.get_num_threads()
        self.engine = Engine(self.stack, self.metrics, config.engine, self.threads)
        self.kv_budget = KvBudget(config.max_kv_bytes or default_max_kv_bytes(self.engine.device))
        self.profile: UnitProfile | None = None
        models = None
        if config.profile:  # timed with the engine's threads: the fast paths take one only
            caller_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                self.profile = profile_units(self.stack)
                # The engine's step in wall seconds (latency) and in CPU seconds (its work).
                models = measure_step_models(self.stack)
            finally:
                torch.set_num_threads(caller_threads)
        # Announced as timed at start until the engine has run steps, then refitted on them.
        self.step_models: LiveStepModel | None = None
        if models:
            self.step_models = LiveStepModel(StepModels(*models, START_UP, 0),
                                             self.stack.n_units)
            self.engine.on_step = self.step_models.record

    def info(self) -> dict[str, Any]:
        """The /v1/info document."""
        cfg = self.config
        return {
            "protocol": wire.PROTOCOL_VERSION,
            "session_path": wire.SESSION_PATH,
            "model": self.loaded.model_id,
            "family": self.stack.family,
            "fingerprint": self.fingerprint,
            "dtype": self.loaded.dtype,
            "units": list(self.stack.names),
            "n_units": self.stack.n_units,
            "hidden_size": self.stack.hidden_size,
            "vocab_size": self.stack.vocab_size,
            "eos_token_ids": list(self.loaded.eos_token_ids),
            "wire_dtypes": list(wire.WIRE_DTYPES),
            "device": cfg.announce_device,  # what clients' auto placement assumes of this server
            "compute": str(self.engine.device),
            "threads": self.threads,
            **self._step_model_json(),
            "engine": {"max_batch_tokens": cfg.engine.max_batch_tokens,
                       "max_batch_rows": cfg.engine.max_batch_rows},
            "limits": {
                "max_frame_bytes": cfg.max_frame_bytes,
                "max_header_bytes": wire.MAX_HEADER_BYTES,
                "max_probe_reply_bytes": wire.MAX_PROBE_REPLY_BYTES,
                "max_tokens_per_message": cfg.limits.max_tokens_per_message,
                "max_context": self.limits.max_context,
                "max_sessions": cfg.max_sessions,
                "max_sessions_per_connection": cfg.max_sessions_per_connection,
                "max_in_flight_per_connection": cfg.max_in_flight_per_connection,
                "max_sessions_per_token": self.sessions_per_token if cfg.tokens else None,
                "max_in_flight_per_token": self.in_flight_per_token if cfg.tokens else None,
                "max_kv_bytes": self.kv_budget.limit_bytes,
                "idle_timeout_s": cfg.idle_timeout_s,
            },
        }

    def _step_model_json(self) -> dict[str, Any]:
        """/v1/info's step models (wall, CPU), which fit they are (start-up or live), and the
        unit profile at the speed the blocks' recent steps show."""
        profile = self.profile
        if self.step_models is None:
            return {"profile": profile.to_json() if profile else None, "step_model": None,
                    "step_model_cpu": None, "step_model_fit": None}
        models = self.step_models.models()
        if profile is not None:
            profile = profile.scaled(*models.block_slowdown)
        return {"profile": profile.to_json() if profile else None,
                "step_model": models.wall.to_json(), "step_model_cpu": models.cpu.to_json(),
                "step_model_fit": models.fit_json()}

    async def run_forward(self, session: ServerSession, header: wire.ForwardHeader,
                          payload: bytes | memoryview) -> ForwardResult:
        """Run one forward of a session in the engine's next steps: the one way compute runs.

        Only a forward that succeeds refreshes the session's idle timer (ServerSession.record):
        a client sending rejected forwards cannot hold its slot forever.
        """
        session.in_flight += 1  # the idle sweeper leaves a session alone while it computes
        try:
            result = await self.engine.submit(session, header, payload)
        except wire.ProtocolError:
            raise
        except Exception as exc:  # a bug or an out-of-memory: this session's state is suspect
            self.close_session(session.session_id, "error")
            raise wire.ProtocolError("internal", f"forward failed ({type(exc).__name__}: {exc}); "
                                     "the session was closed") from exc
        finally:
            session.in_flight -= 1
        p0, p1 = header.positions
        self.metrics.record_forward(p1 - p0, result.token is not None)
        if header.verify or result.rolled_back:
            self.metrics.record_speculation(verified=p1 - p0 if header.verify else 0,
                                            rolled_back=result.rolled_back)
        return result

    def authorized(self, header_value: str | None) -> bool:
        """Whether an `Authorization` header value (`Bearer <token>`, nothing else) is good."""
        return not self.config.tokens or self.token_index(bearer(header_value)) is not None

    def token_index(self, given: str | None) -> int | None:
        """Which of the server's tokens `given` is (None: none of them)."""
        if given is None:
            return None
        found = None
        for index, token in enumerate(self.config.tokens):  # all compared: no timing hint
            if hmac.compare_digest(given.encode(), token.encode()):
                found = index
        return found

    def quota(self, header_value: str | None) -> TokenQuota | None:
        """The quota of the token in an `Authorization` header value (None: no such token)."""
        index = self.token_index(bearer(header_value))
        return None if index is None else self.quotas[index]

    def admit(self, quota: TokenQuota | None) -> None:
        """Raise `busy` if no session may open now: the server is full, or the token's quota."""
        if len(self.sessions) >= self.config.max_sessions:
            raise wire.ProtocolError("busy", f"the server holds {self.config.max_sessions} "
                                     "sessions already; retry later")
        if quota is not None:
            quota.check_open()

    def add_session(self, session: ServerSession, owner: SessionOwner) -> None:
        """Count a session opened for `owner` (a connection or an API request) as open."""
        self.sessions[session.session_id] = (session, owner)
        owner.sessions[session.session_id] = session
        if owner.quota is not None:
            owner.quota.sessions.add(session.session_id)
        self.metrics.record_open()

    def close_session(self, session_id: str, reason: str) -> ServerSession | None:
        """Forget a session and free its caches."""
        entry = self.sessions.pop(session_id, None)
        if entry is None:
            return None
        session, conn = entry
        session.close()
        conn.sessions.pop(session_id, None)
        if conn.quota is not None:
            conn.quota.sessions.discard(session_id)
        self.metrics.record_close(reason)
        return session

    def render_metrics(self) -> str:
        sessions = [s for s, _ in list(self.sessions.values())]
        return self.metrics.render(len(sessions), sum(s.cache_bytes() for s in sessions),
                                   extra=self._quota_metrics)

    def _quota_metrics(self) -> list[str]:
        # By the token's index: /metrics never shows a token itself.
        return [*gauge("splitllm_token_sessions", "Open sessions of each token (connections "
                       "and API requests).",
                       [(f'token="{i}"', len(q.sessions)) for i, q in enumerate(self.quotas)]),
                *gauge("splitllm_token_in_flight", "Forwards in flight of each token.",
                       [(f'token="{i}"', q.in_flight) for i, q in enumerate(self.quotas)])]


def bearer(header_value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value (None: none, or another
    scheme)."""
    scheme, _, given = (header_value or "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else None
