"""The splitllm client: `connect(...)` returns a Session whose `generate(...)` runs a split.

The client drives every forward pass: it runs its own segments and, at each switch to the
server, sends the hidden states (or token ids) up and waits for the server segment's output.
The pieces: reaching a server (dialer.py), the wire session (remote.py), surviving a lost
server (resume.py), link measurement (link_probe.py), streaming text (textstream.py) and
planning (autoplace.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from splitllm.errors import UserError
from splitllm.placement import CLIENT, SERVER, Placement
from splitllm.planner.hardware import link_preset
from splitllm.planner.instance import Instance
from splitllm.planner.network import Link
from splitllm.planner.speculation import Speculation
from splitllm.runtime import protocol as wire
from splitllm.runtime.autoplace import (
    DEFAULT_HEADROOM,
    MEASURED,
    AutoPlan,
    Request,
    plan_request,
    request_instance,
)
from splitllm.runtime.decoding import ClientClock, SplitPipe
from splitllm.runtime.dialer import (
    DEFAULT_SERVER,
    Connection,
    Dialer,
    fetch_info,
    fetch_rows_per_step,
)
from splitllm.runtime.link_probe import measure_link, measure_visit_s
from splitllm.runtime.models import LoadedModel, encode_prompt, load_model, weights_fingerprint
from splitllm.runtime.profile import UnitProfile, profile_units
from splitllm.runtime.remote import REPLY_TIMEOUT_S, RemoteSession
from splitllm.runtime.resume import DEFAULT_RETRY_S, Backoff, Resumable, is_lost, redial
from splitllm.runtime.textstream import TextStream
from splitllm.runtime.transport import CONNECT_TIMEOUT_S, ServerError, Transport
from splitllm.runtime.units import UnitStack

__all__ = ["DEFAULT_SERVER", "Generation", "GenerationInterrupted", "Session", "connect",
           "fetch_info"]


@dataclass(frozen=True, kw_only=True)
class Generation:
    """One generation and what it cost; `error` says why it stopped early (None: complete)."""

    tokens: tuple[int, ...]
    text: str
    placement: str
    ttft_s: float
    tpot_s: float
    wall_s: float
    prompt_tokens: int
    server_busy_s: float  # wall seconds the server computed for this generation
    server_cpu_s: float  # CPU seconds of that (robust to other load on the server machine)
    client_busy_s: float
    bytes_sent: int
    bytes_received: int
    emulation: str | None = None
    round_trips: int = 0  # messages to server segments and back
    drafted: int = 0  # speculative decoding: draft tokens verified...
    accepted: int = 0  # ... and accepted
    reconnects: int = 0  # lost connections survived by reconnecting and replaying
    replay_mismatches: int = 0  # replayed tokens sampled differently (0: the replay was exact)
    error: str | None = None
    auto: AutoPlan | None = field(default=None, repr=False)  # what placement="auto" decided
    logits: tuple[torch.Tensor, ...] = field(default=(), repr=False)

    @property
    def complete(self) -> bool:
        return self.error is None

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The `--json` document."""
        return {"tokens": list(self.tokens), "text": self.text, "placement": self.placement,
                "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "wall_s": self.wall_s,
                "prompt_tokens": self.prompt_tokens, "server_busy_s": self.server_busy_s,
                "server_cpu_s": self.server_cpu_s,
                "client_busy_s": self.client_busy_s, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "emulation": self.emulation,
                "round_trips": self.round_trips, "drafted": self.drafted,
                "accepted": self.accepted,
                "complete": self.complete, "error": self.error, "reconnects": self.reconnects,
                "replay_mismatches": self.replay_mismatches}


class GenerationInterrupted(ServerError):
    """The server failed mid-generation and none came back in time; `partial` has the tokens."""

    def __init__(self, cause: ServerError, partial: Generation) -> None:
        super().__init__(cause.code, cause.message)
        self.partial = partial


class Session:
    """A connection to a splitllm server (or the next of several), with the client's model."""

    def __init__(self, loaded: LoadedModel, dialer: Dialer, *, wire_dtype: str = "float32",
                 slowdown: float = 1.0, client_clock: ClientClock | None = None,
                 emulation: str | None = None, compute_units: bool = True,
                 timeout_s: float = REPLY_TIMEOUT_S, backoff: Backoff = Backoff()) -> None:
        self.loaded = loaded
        self.stack = UnitStack(loaded.model)
        self.dialer = dialer
        self.wire_dtype = wire.wire_dtype_name(wire_dtype)
        self.slowdown = slowdown
        self.client_clock = client_clock  # an EMULATED device model's unit times (or None)
        self.emulation = emulation
        self.compute_units = compute_units  # False: client units only timed (SplitPipe's)
        self.timeout_s = timeout_s  # for each reply: longer without one counts as a lost server
        self.backoff = backoff
        self.link: Link | None = None
        self._client_profile: UnitProfile | None = None
        self.connection: Connection = dialer.dial()
        self._transports: list[Transport] = [self.connection.transport]  # for byte counts

    @property
    def server(self) -> str:
        return self.connection.server

    @property
    def transport(self) -> Transport:
        return self.connection.transport

    @property
    def info(self) -> dict[str, Any]:
        return self.connection.info

    @property
    def bytes_sent(self) -> int:
        return sum(transport.bytes_sent for transport in self._transports)

    @property
    def bytes_received(self) -> int:
        return sum(transport.bytes_received for transport in self._transports)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the server frees any session left open)."""
        self.transport.close()

    def reconnect(self, deadline: float) -> None:
        """Drop the connection and dial again, servers in order with backoff, until `deadline`
        (time.monotonic()); the last dial's error if none answered by then."""
        with contextlib.suppress(Exception):  # it is already broken
            self.transport.close()
        self.connection = redial(self.dialer.dial, self.backoff, deadline)
        self._transports.append(self.connection.transport)

    def measure_link(self) -> Link:
        """Measure (once) the RTT, bandwidths and per-visit cost of the path to the server,
        through any emulation."""
        if self.link is None:
            link = measure_link(self.transport, self.timeout_s)
            self.link = replace(link, visit_s=measure_visit_s(
                self.transport, self.stack.n_units, self.timeout_s))
        return self.link

    def client_profile(self) -> UnitProfile:
        """This client's measured per-unit times (times the emulated slowdown) and its loop's
        own cost per pass."""
        if self._client_profile is None:
            units = profile_units(self.stack).emulated(self.slowdown)
            self._client_profile = replace(units, pass_s=self._loop_pass_s())
        return self._client_profile

    def _loop_pass_s(self, new_tokens: int = 4) -> float:
        """The generation loop's seconds per pass beyond its units' time: a short generation
        on the client alone, less what its units took (sampling, bookkeeping, the stream)."""
        placement = CLIENT * self.stack.n_units
        generated = self.generate([1, 2, 3, 4], new_tokens, placement=placement, chat=False,
                                  stop_at_eos=False)
        return max(generated.wall_s - generated.client_busy_s, 0.0) / new_tokens

    def plan(self, prompt_tokens: int, new_tokens: int, sla_s: float | None = None,
             client_device: str = MEASURED, server_device: str | None = None,
             headroom: float = DEFAULT_HEADROOM) -> AutoPlan:
        """Ask the planner for the least-server-work placement that meets the SLA, with
        `headroom` to spare where one does (autoplace.plan_request)."""
        instance, source = self.instance(prompt_tokens, new_tokens, client_device, server_device)
        return plan_request(instance, source, sla_s, headroom)

    def instance(self, prompt_tokens: int, new_tokens: int, client_device: str = MEASURED,
                 server_device: str | None = None, speculation: Speculation | None = None
                 ) -> tuple[Instance, str]:
        """The planner's instance for this request (no SLA yet) and where its times come from.

        The server's unit times are taken from the step model it announces now (refitted on
        its engine's recent steps), at the rows per step it reports now (its load).
        """
        link = self.measure_link()  # first: its probes are steps the announced model sees
        rows, info = 1.0, self.info
        if client_device == MEASURED:
            with contextlib.suppress(UserError):  # an older server without the engine's metrics
                rows = fetch_rows_per_step(self.server, self.dialer.token, self.timeout_s)
                info = fetch_info(self.server, self.dialer.token, self.timeout_s)
        return request_instance(
            stack=self.stack, model_config=self.loaded.model.config.to_dict(),
            link=link, request=Request(prompt_tokens=prompt_tokens,
                                       output_tokens=new_tokens, speculation=speculation),
            wire_dtype=self.wire_dtype, server_info=info,
            client_profile=self.client_profile, client_device=client_device,
            server_device=server_device, server_rows=rows)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *,
                 placement: str | Placement = "auto", sampling: wire.Sampling | None = None,
                 sla_s: float | None = None, headroom: float = DEFAULT_HEADROOM,
                 client_device: str = MEASURED, server_device: str | None = None,
                 chat: bool = True, stop_at_eos: bool = True,
                 prefill_chunk: int = 512, return_logits: bool = False, speculate: int | str = 0,
                 on_plan: Callable[[AutoPlan], None] | None = None,
                 on_text: Callable[[str], None] | None = None,
                 on_token: Callable[[int], None] | None = None,
                 on_notice: Callable[[str], None] | None = None) -> Generation:
        """Generate up to max_new_tokens tokens with a split; on_text receives text as it comes.

        placement="auto" asks the planner (sla_s, headroom, client_device and server_device
        say how) and passes its decision to on_plan before generating. on_token receives each
        token id as it comes; an exception it raises ends the generation (the server's session
        is closed). speculate: speculative decoding (the same tokens, greedy or seeded) with
        that many prompt-lookup drafts per pass, or 'auto' (tuned to the running acceptance).
        A lost connection is survived (resume.py): on_notice hears of it in one line. A server
        error, or no server back within the backoff's retry_s, raises GenerationInterrupted
        with the partial generation.
        """
        if return_logits and speculate != 0:
            raise UserError("return_logits is one row per token: it does not combine with "
                            "speculative decoding")
        prompt_ids = (encode_prompt(self.loaded, prompt, chat) if isinstance(prompt, str)
                      else list(prompt))
        auto = None
        if str(placement).lower() == "auto":
            auto = self.plan(len(prompt_ids), max_new_tokens, sla_s, client_device,
                             server_device, headroom)
            placement = auto.plan.placement
            if on_plan is not None:
                on_plan(auto)
        chosen = (placement if isinstance(placement, Placement)
                  else Placement.parse(placement, self.stack.n_units))
        run = _Run(self, chosen, sampling or wire.Sampling(), return_logits, on_notice)
        # Beside the run, not in it: no reference cycle, so the client's caches go when the
        # generation returns (a cycle held them, and every request's, until a collection).
        resumable = Resumable(run.start, run.recover)
        sent, received = self.bytes_sent, self.bytes_received
        logits: list[torch.Tensor] = []
        stream = TextStream(self.loaded, on_text)
        clock = time.perf_counter()
        first_s = 0.0

        def result(stats: dict[str, Any], error: str | None = None) -> Generation:
            stream.finish()
            tokens, wall_s = resumable.kept, time.perf_counter() - clock
            return Generation(
                tokens=tuple(tokens), text=stream.text, placement=str(chosen), ttft_s=first_s,
                tpot_s=(wall_s - first_s) / (len(tokens) - 1) if len(tokens) > 1 else 0.0,
                wall_s=wall_s, prompt_tokens=len(prompt_ids),
                server_busy_s=float(stats.get("busy_s", 0.0)),
                server_cpu_s=float(stats.get("cpu_s", 0.0)),
                client_busy_s=sum(pipe.client_busy_s for pipe in run.pipes),
                bytes_sent=self.bytes_sent - sent, bytes_received=self.bytes_received - received,
                emulation=self.emulation, reconnects=resumable.reconnects,
                replay_mismatches=resumable.mismatches, error=error, auto=auto,
                logits=tuple(logits), round_trips=sum(pipe.round_trips for pipe in run.pipes),
                drafted=sum(pipe.drafted for pipe in run.pipes),
                accepted=sum(pipe.accepted for pipe in run.pipes))

        eos = self.loaded.eos_token_ids if stop_at_eos else ()
        try:
            for token in resumable.tokens(prompt_ids, max_new_tokens, eos_token_ids=eos,
                                          chunk_tokens=prefill_chunk, speculate=speculate):
                first_s = first_s or time.perf_counter() - clock
                if return_logits and run.pipes[-1].last_logits is not None:
                    logits.append(run.pipes[-1].last_logits)
                if on_token is not None:
                    on_token(token)
                stream.push(token)
            stats = run.finish()
        except ServerError as exc:
            run.abandon()
            raise GenerationInterrupted(exc, result({}, str(exc))) from None
        except BaseException:
            run.abandon()  # free the server's caches; the first error is the news
            raise
        return result(stats)


class _Run:
    """One generation's pipes and server sessions, across reconnections."""

    def __init__(self, session: Session, placement: Placement, sampling: wire.Sampling,
                 return_logits: bool, on_notice: Callable[[str], None] | None) -> None:
        self.session = session
        self.placement = placement
        self.sampling = sampling
        self.return_logits = return_logits
        self.notice = on_notice or (lambda line: None)
        self.remote: RemoteSession | None = None
        self.pipes: list[SplitPipe] = []
        self.deadline: float | None = None  # of the current outage
        self.kept_at_loss = -1

    def start(self) -> SplitPipe:
        """A fresh pipe, with a new server session if the placement has server units."""
        session = self.session
        self.remote = None
        if SERVER in self.placement.sides:
            self.remote = RemoteSession(session.transport, self.placement, session.stack.n_units,
                                        wire_dtype=session.wire_dtype, sampling=self.sampling,
                                        timeout_s=session.timeout_s)
        pipe = SplitPipe(session.stack, self.placement, self.remote, sampling=self.sampling,
                         slowdown=session.slowdown, client_clock=session.client_clock,
                         compute_units=session.compute_units, return_logits=self.return_logits)
        self.pipes.append(pipe)
        return pipe

    def recover(self, lost: ServerError, kept: int) -> None:
        """Reconnect within retry_s of the loss (a new token renews it), or raise why not."""
        retry_s = self.session.backoff.retry_s
        if self.deadline is None or kept > self.kept_at_loss:
            self.deadline = time.monotonic() + retry_s
        self.kept_at_loss = kept
        lost_server = self.session.server
        self.notice(f"lost {lost_server} ({lost}) after {kept} tokens; reconnecting for up to "
                    f"{retry_s:g} s")
        try:
            self.session.reconnect(self.deadline)
        except (UserError, ServerError) as exc:
            raise ServerError(lost.code, f"lost {lost_server}: {lost.message}; no server came "
                                         f"back within {retry_s:g} s ({exc})") from None
        self.notice(f"reconnected to {self.session.server}; replaying {kept} tokens")

    def finish(self) -> dict[str, Any]:
        """Close the server session: its stats (none if the connection was lost at the end)."""
        if self.remote is None:
            return {}
        try:
            return self.remote.close()
        except ServerError as exc:
            if is_lost(exc):
                return {}
            raise

    def abandon(self) -> None:
        """Close the server session, if the connection still works."""
        if self.remote is not None:
            with contextlib.suppress(Exception):
                self.remote.close()


def connect(server: str | Sequence[str] = DEFAULT_SERVER,
            model: str | Path | LoadedModel = "smollm2", *, token: str | None = None,
            wire_dtype: str = "float32", emulate_link: str | None = None,
            emulate_client_slowdown: float = 1.0, timeout_s: float = REPLY_TIMEOUT_S,
            retry_s: float = DEFAULT_RETRY_S) -> Session:
    """Connect to a server (the first of several that answers) with the client's copy of the
    same model; returns a Session. After a lost connection it reconnects for up to retry_s."""
    servers = (server,) if isinstance(server, str) else tuple(server)
    if not servers:
        raise UserError("no server given")
    if emulate_client_slowdown < 1.0 or not math.isfinite(emulate_client_slowdown):
        raise UserError("--emulate-client-slowdown must be a number >= 1")
    if not (0 < timeout_s < math.inf and 0 <= retry_s < math.inf):
        raise UserError("--timeout-s must be a number > 0 and --retry-s a number >= 0")
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    link = link_preset(emulate_link) if emulate_link else None  # bad names fail before connecting
    emulation = None
    if link is not None:
        emulation = (f"EMULATED link {link.name}: rtt {link.rtt_s * 1e3:.0f} ms, up "
                     f"{link.uplink_bytes_per_s * 8 / 1e6:.0f} Mbit/s, down "
                     f"{link.downlink_bytes_per_s * 8 / 1e6:.0f} Mbit/s")
    if emulate_client_slowdown > 1.0:
        slow = f"EMULATED client slowdown x{emulate_client_slowdown:g}"
        emulation = f"{emulation}; {slow}" if emulation else slow
    dialer = Dialer(servers=servers, fingerprint=weights_fingerprint(loaded.model),
                    model_id=loaded.model_id, token=token, link=link,
                    connect_timeout_s=min(timeout_s, CONNECT_TIMEOUT_S))
    return Session(loaded, dialer, wire_dtype=wire_dtype, slowdown=emulate_client_slowdown,
                   emulation=emulation, timeout_s=timeout_s, backoff=Backoff(retry_s=retry_s))
