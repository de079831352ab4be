"""The splitllm client: `connect(...)` returns a Session whose `generate(...)` runs a split.

The client drives every forward pass: it runs its own segments and, at each switch to the
server, sends the hidden states (or token ids) up and waits for the server segment's output.
The pieces: the wire session (remote.py), link measurement (link_probe.py), streaming text
(textstream.py) and planning (autoplace.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splitllm.errors import UserError
from splitllm.placement import Placement
from splitllm.planner.hardware import link_preset
from splitllm.planner.instance import Instance
from splitllm.planner.network import Link
from splitllm.runtime import protocol as wire
from splitllm.runtime.autoplace import (
    MEASURED,
    AutoPlan,
    Request,
    plan_request,
    request_instance,
)
from splitllm.runtime.decoding import SplitPipe, timed_generation
from splitllm.runtime.link_probe import measure_link
from splitllm.runtime.models import LoadedModel, encode_prompt, load_model, weights_fingerprint
from splitllm.runtime.profile import UnitProfile, profile_units
from splitllm.runtime.remote import REPLY_TIMEOUT_S, RemoteSession
from splitllm.runtime.textstream import TextStream
from splitllm.runtime.transport import EmulatedLink, Transport, WebSocketTransport
from splitllm.runtime.units import UnitStack

DEFAULT_SERVER = "ws://127.0.0.1:8765"


@dataclass(frozen=True, kw_only=True)
class Generation:
    """One finished generation and what it cost."""

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
    auto: AutoPlan | None = field(default=None, repr=False)  # what placement="auto" decided
    logits: tuple[torch.Tensor, ...] = field(default=(), repr=False)

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
                "bytes_received": self.bytes_received, "emulation": self.emulation}


class Session:
    """A connection to a splitllm server, with the client's copy of the model."""

    def __init__(self, server: str, loaded: LoadedModel, transport: Transport,
                 info: dict[str, Any], *, wire_dtype: str = "float32", slowdown: float = 1.0,
                 emulation: str | None = None, timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self.server = server
        self.loaded = loaded
        self.stack = UnitStack(loaded.model)
        self.transport = transport
        self.info = info
        self.wire_dtype = wire.wire_dtype_name(wire_dtype)
        self.slowdown = slowdown
        self.emulation = emulation
        self.timeout_s = timeout_s
        self.link: Link | None = None
        self._client_profile: UnitProfile | None = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the server frees any session left open)."""
        self.transport.close()

    def measure_link(self) -> Link:
        """Measure (once) the RTT and bandwidths to the server, through any emulation."""
        if self.link is None:
            self.link = measure_link(self.transport, self.timeout_s)
        return self.link

    def client_profile(self) -> UnitProfile:
        """This client's measured per-unit times (times the emulated slowdown)."""
        if self._client_profile is None:
            self._client_profile = profile_units(self.stack).scaled(max(self.slowdown, 1.0))
        return self._client_profile

    def plan(self, prompt_tokens: int, new_tokens: int, sla_s: float | None = None,
             client_device: str = MEASURED, server_device: str | None = None) -> AutoPlan:
        """Ask the planner for the least-server-work placement that meets the SLA."""
        instance, source = self.instance(prompt_tokens, new_tokens, client_device, server_device)
        return plan_request(instance, source, sla_s)

    def instance(self, prompt_tokens: int, new_tokens: int, client_device: str = MEASURED,
                 server_device: str | None = None) -> tuple[Instance, str]:
        """The planner's instance for this request (no SLA yet) and where its times come from."""
        return request_instance(
            stack=self.stack, model_config=self.loaded.model.config.to_dict(),
            link=self.measure_link(),
            request=Request(prompt_tokens=prompt_tokens, output_tokens=new_tokens),
            wire_dtype=self.wire_dtype, server_info=self.info,
            client_profile=self.client_profile, client_device=client_device,
            server_device=server_device)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *,
                 placement: str | Placement = "auto", sampling: wire.Sampling | None = None,
                 sla_s: float | None = None, client_device: str = MEASURED,
                 server_device: str | None = None, chat: bool = True, stop_at_eos: bool = True,
                 prefill_chunk: int = 512, return_logits: bool = False,
                 on_plan: Callable[[AutoPlan], None] | None = None,
                 on_text: Callable[[str], None] | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """Generate up to max_new_tokens tokens with a split; on_text receives text as it comes.

        placement="auto" asks the planner (sla_s, client_device and server_device say how) and
        passes its decision to on_plan before generating. on_token receives each token id as it
        comes; an exception it raises ends the generation (the server's session is closed).
        """
        prompt_ids = (encode_prompt(self.loaded, prompt, chat) if isinstance(prompt, str)
                      else list(prompt))
        auto = None
        if str(placement).lower() == "auto":
            auto = self.plan(len(prompt_ids), max_new_tokens, sla_s, client_device,
                             server_device)
            placement = auto.plan.placement
            if on_plan is not None:
                on_plan(auto)
        chosen = (placement if isinstance(placement, Placement)
                  else Placement.parse(placement, self.stack.n_units))
        remote = None
        if "S" in chosen.sides:
            remote = RemoteSession(self.transport, chosen, self.stack.n_units,
                                   wire_dtype=self.wire_dtype, sampling=sampling,
                                   timeout_s=self.timeout_s)
        pipe = SplitPipe(self.stack, chosen, remote, sampling=sampling or wire.Sampling(),
                         slowdown=self.slowdown, return_logits=return_logits)
        sent, received = self.transport.bytes_sent, self.transport.bytes_received
        logits: list[torch.Tensor] = []
        stream = TextStream(self.loaded, on_text)

        def record(token: int) -> None:
            if return_logits and pipe.last_logits is not None:
                logits.append(pipe.last_logits)
            if on_token is not None:
                on_token(token)
            stream.push(token)

        eos = self.loaded.eos_token_ids if stop_at_eos else ()
        try:
            timed = timed_generation(pipe, prompt_ids, max_new_tokens, eos_token_ids=eos,
                                     chunk_tokens=prefill_chunk, on_token=record)
        except BaseException:
            if remote is not None:  # free the server's caches; the first error is the news
                with contextlib.suppress(Exception):
                    remote.close()
            raise
        stats = remote.close() if remote is not None else {}
        stream.finish()
        return Generation(
            tokens=timed.tokens, text=stream.text, placement=str(chosen), ttft_s=timed.ttft_s,
            tpot_s=timed.tpot_s, wall_s=timed.wall_s, prompt_tokens=len(prompt_ids),
            server_busy_s=float(stats.get("busy_s", 0.0)),
            server_cpu_s=float(stats.get("cpu_s", 0.0)), client_busy_s=pipe.client_busy_s,
            bytes_sent=self.transport.bytes_sent - sent,
            bytes_received=self.transport.bytes_received - received, emulation=self.emulation,
            auto=auto, logits=tuple(logits),
        )


def http_url(ws_url: str) -> str:
    """The HTTP base URL of a ws:// or wss:// server URL."""
    base = ws_url.rstrip("/").removesuffix(wire.SESSION_PATH)
    return "https://" + base[6:] if base.startswith("wss://") else "http://" + base[5:]


def fetch_info(server: str, token: str | None, timeout_s: float = 10.0) -> dict[str, Any]:
    """GET /v1/info of a server."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(http_url(server) + "/v1/info", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach {server}: {exc}") from None
    if response.status_code == 401:
        raise UserError(f"{server}: unauthorized (pass --token or set SPLITLLM_TOKEN)")
    if response.status_code != 200:
        raise UserError(f"{server}: /v1/info answered HTTP {response.status_code}")
    return dict(response.json())


def connect(server: str = DEFAULT_SERVER, model: str | Path | LoadedModel = "smollm2", *,
            token: str | None = None, wire_dtype: str = "float32",
            emulate_link: str | None = None, emulate_client_slowdown: float = 1.0,
            timeout_s: float = REPLY_TIMEOUT_S) -> Session:
    """Connect to a server with the client's copy of the same model; returns a Session."""
    if emulate_client_slowdown < 1.0 or not math.isfinite(emulate_client_slowdown):
        raise UserError("--emulate-client-slowdown must be a number >= 1")
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    info = fetch_info(server, token)
    mine = weights_fingerprint(loaded.model)
    if info.get("fingerprint") != mine:
        raise UserError(f"the server runs another model ({info.get('model')}, fingerprint "
                        f"{info.get('fingerprint')}) than this client ({loaded.model_id}, {mine})")
    link = link_preset(emulate_link) if emulate_link else None  # bad names fail before connecting
    limit = int(info.get("limits", {}).get("max_frame_bytes", 64 * 2**20))
    transport: Transport = WebSocketTransport(server, token, limit + 2 * wire.MAX_HEADER_BYTES)
    emulation = None
    if link is not None:
        transport = EmulatedLink(transport, link)
        emulation = (f"EMULATED link {link.name}: rtt {link.rtt_s * 1e3:.0f} ms, up "
                     f"{link.uplink_bytes_per_s * 8 / 1e6:.0f} Mbit/s, down "
                     f"{link.downlink_bytes_per_s * 8 / 1e6:.0f} Mbit/s")
    if emulate_client_slowdown > 1.0:
        slow = f"EMULATED client slowdown x{emulate_client_slowdown:g}"
        emulation = f"{emulation}; {slow}" if emulation else slow
    return Session(server, loaded, transport, info, wire_dtype=wire_dtype,
                   slowdown=emulate_client_slowdown, emulation=emulation, timeout_s=timeout_s)
