"""The splitllm client: `connect(...)` returns a Session whose `generate(...)` runs a split.

The client drives every forward pass: it runs its own segments and, at each switch to the
server, sends the hidden states (or token ids) up and waits for the server segment's output.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splitllm.errors import UserError
from splitllm.placement import Placement
from splitllm.planner.hardware import link_preset
from splitllm.planner.instance import Instance, Plan
from splitllm.planner.network import Link
from splitllm.runtime import protocol as wire
from splitllm.runtime.autoplace import (
    MEASURED,
    Request,
    default_sla_s,
    measured_instance,
    plan_placement,
    preset_instance,
    with_sla,
)
from splitllm.runtime.generate import RemoteResult, SplitPipe, timed_generate
from splitllm.runtime.models import LoadedModel, encode_prompt, load_model, weights_fingerprint
from splitllm.runtime.profile import UnitProfile, profile_units
from splitllm.runtime.transport import (
    EmulatedLink,
    ServerError,
    Transport,
    WebSocketTransport,
)
from splitllm.runtime.units import UnitStack

DEFAULT_SERVER = "ws://127.0.0.1:8765"
REPLY_TIMEOUT_S = 120.0
PROBE_BYTES = 128 * 1024


def receive(transport: Transport, kind: str, timeout_s: float) -> tuple[dict[str, Any], bytes]:
    """The next message, which must be of type `kind`; ServerError on an `error` message."""
    data = transport.recv(timeout_s)
    try:
        header, payload = wire.frame_header(data)
    except wire.ProtocolError as exc:
        raise ServerError("bad_reply", f"unreadable reply from the server: {exc}") from None
    if header.get("type") == "error":
        raise ServerError(str(header.get("code")), str(header.get("message")))
    if header.get("type") != kind:
        raise ServerError("bad_reply", f"expected {kind!r}, got {header.get('type')!r}")
    return header, bytes(payload)


class RemoteSession:
    """The server's half of one generation, spoken over a transport (see docs/protocol.md)."""

    def __init__(self, transport: Transport, placement: Placement, n_units: int,
                 wire_dtype: str = "float32", sampling: wire.Sampling | None = None,
                 timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self.transport = transport
        self.n_units = n_units
        self.wire_dtype = wire.WIRE_DTYPES[wire.wire_dtype_name(wire_dtype)]
        self.timeout_s = timeout_s
        self.seq = 0
        opened = {"type": "open", "protocol": wire.PROTOCOL_VERSION, "placement": str(placement),
                  "wire_dtype": wire.DTYPE_NAMES[self.wire_dtype],
                  "sampling": (sampling or wire.Sampling()).model_dump()}
        transport.send(wire.text(opened))
        reply, _ = receive(transport, "opened", timeout_s)
        self.session_id = str(reply["session"])
        self.stats: dict[str, Any] = {}

    def forward(self, units: tuple[int, int], x: torch.Tensor, positions: tuple[int, int],
                return_logits: bool, return_hidden: bool = True) -> RemoteResult:
        """Run server units [start, stop) on x (ids [1, T] or hidden [1, T, D])."""
        self.seq += 1
        tensor = x if units[0] == 0 else x.to(self.wire_dtype)
        header = {"type": "forward", "session": self.session_id, "seq": self.seq,
                  "units": list(units), "positions": list(positions),
                  "return_logits": return_logits, "return_hidden": return_hidden}
        self.transport.send(wire.encode_tensor(header, tensor))
        if units[1] < self.n_units and not return_hidden:
            receive(self.transport, "done", self.timeout_s)
            return RemoteResult()
        if units[1] < self.n_units:
            reply, payload = receive(self.transport, "hidden", self.timeout_s)
            return RemoteResult(hidden=self._tensor(reply, payload))  # [1, T, D]
        logits = None
        if return_logits:
            reply, payload = receive(self.transport, "logits", self.timeout_s)
            logits = self._tensor(reply, payload)  # [1, V]
        reply, _ = receive(self.transport, "token", self.timeout_s)
        return RemoteResult(token=int(reply["token"]), logits=logits)

    def _tensor(self, reply: dict[str, Any], payload: bytes) -> torch.Tensor:
        if reply.get("seq") != self.seq:
            raise ServerError("bad_reply", f"reply to seq {reply.get('seq')}, expected {self.seq}")
        try:
            header = wire.TensorHeader(dtype=reply["dtype"], shape=reply["shape"])
            wire.check_tensor_header(header, len(payload))
        except (KeyError, ValueError, wire.ProtocolError) as exc:
            raise ServerError("bad_reply", f"bad tensor from the server: {exc}") from None
        return wire.decode_tensor(header, payload)

    def close(self) -> dict[str, Any]:
        """End the session on the server; returns its stats (busy seconds, tokens)."""
        self.transport.send(wire.text({"type": "close", "session": self.session_id}))
        reply, _ = receive(self.transport, "closed", self.timeout_s)
        self.stats = dict(reply.get("stats") or {})
        return self.stats


def measure_link(transport: Transport, timeout_s: float = 30.0, pings: int = 5,
                 probe_bytes: int = PROBE_BYTES) -> Link:
    """RTT (median of pings) and both bandwidths (timed probes) of the path to the server."""
    rtts = []
    for i in range(pings):
        clock = time.perf_counter()
        transport.send(wire.text({"type": "ping", "t": i}))
        receive(transport, "pong", timeout_s)
        rtts.append(time.perf_counter() - clock)
    rtt_s = statistics.median(rtts)
    clock = time.perf_counter()
    transport.send(wire.encode_frame({"type": "probe", "reply_bytes": 0}, bytes(probe_bytes)))
    receive(transport, "probe_reply", timeout_s)
    up_s = max(time.perf_counter() - clock - rtt_s, 1e-6)
    clock = time.perf_counter()
    transport.send(wire.encode_frame({"type": "probe", "reply_bytes": probe_bytes}))
    receive(transport, "probe_reply", timeout_s)
    down_s = max(time.perf_counter() - clock - rtt_s, 1e-6)
    return Link(uplink_bytes_per_s=probe_bytes / up_s,
                downlink_bytes_per_s=probe_bytes / down_s, rtt_s=rtt_s, name="measured")


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class AutoPlan:
    """What `--placement auto` decided, and on which instance."""

    plan: Plan
    instance: Instance
    source: str  # "measured" or "presets client/server"


class Session:
    """A connection to a splitllm server, with the client's copy of the model."""

    def __init__(self, server: str, loaded: LoadedModel, transport: Transport,
                 info: dict[str, Any], wire_dtype: str = "float32", slowdown: float = 1.0,
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
        instance = with_sla(instance, sla_s if sla_s is not None else default_sla_s(instance))
        return AutoPlan(plan_placement(instance), instance, source)

    def instance(self, prompt_tokens: int, new_tokens: int, client_device: str = MEASURED,
                 server_device: str | None = None) -> tuple[Instance, str]:
        """The planner's instance for this request (no SLA yet) and where its times come from."""
        link = self.measure_link()
        server_device = server_device or str(self.info.get("device") or MEASURED)
        request = Request(prompt_tokens=prompt_tokens, output_tokens=new_tokens)
        wire_bytes = wire.WIRE_DTYPES[self.wire_dtype].itemsize
        if client_device == MEASURED and server_device == MEASURED:
            if not self.info.get("profile"):
                raise UserError("the server publishes no measured profile: pass device presets "
                                "(--client-device and --server-device)")
            server_profile = UnitProfile.from_json(self.info["profile"])
            context = prompt_tokens + new_tokens
            memory = [float(self.stack.parameter_bytes(u) + self.stack.kv_bytes(u, context))
                      for u in range(self.stack.n_units)]
            instance = measured_instance(self.client_profile(), server_profile, link, request,
                                         self.stack.hidden_size * wire_bytes,
                                         client_mem_bytes=memory)
            source = MEASURED
        elif MEASURED in (client_device, server_device):
            raise UserError("mixing a measured profile with a device preset is not supported: "
                            "name presets for both --client-device and --server-device")
        else:
            weight_bytes = self.stack.dtype.itemsize
            instance = preset_instance(self.loaded.model.config.to_dict(), client_device,
                                       server_device, link, request, weight_bytes, wire_bytes)
            source = f"presets {client_device}/{server_device}"
        return instance, source

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *,
                 placement: str | Placement = "auto", sampling: wire.Sampling | None = None,
                 sla_s: float | None = None, chat: bool = True, stop_at_eos: bool = True,
                 prefill_chunk: int = 512, return_logits: bool = False,
                 on_text: Callable[[str], None] | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """Generate up to max_new_tokens tokens with a split; on_text receives text as it comes.

        on_token receives each token id as it comes; an exception it raises ends the generation
        (the server's session is closed) and propagates.
        """
        prompt_ids = (encode_prompt(self.loaded, prompt, chat) if isinstance(prompt, str)
                      else list(prompt))
        if str(placement).lower() == "auto":
            placement = self.plan(len(prompt_ids), max_new_tokens, sla_s).plan.placement
        chosen = (placement if isinstance(placement, Placement)
                  else Placement.parse(placement, self.stack.n_units))
        remote = None
        if "S" in chosen.sides:
            remote = RemoteSession(self.transport, chosen, self.stack.n_units, self.wire_dtype,
                                   sampling, self.timeout_s)
        pipe = SplitPipe(self.stack, chosen, remote, sampling or wire.Sampling(), self.slowdown,
                         return_logits)
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
            timed = timed_generate(pipe, prompt_ids, max_new_tokens, eos, prefill_chunk, record)
        except BaseException:
            if remote is not None:  # free the server's caches; the first error is the news
                with contextlib.suppress(Exception):
                    remote.close()
            raise
        stats = remote.close() if remote is not None else {}
        stream.finish()
        return Generation(
            timed.tokens, stream.text, str(chosen), timed.ttft_s, timed.tpot_s, timed.wall_s,
            len(prompt_ids), float(stats.get("busy_s", 0.0)), float(stats.get("cpu_s", 0.0)),
            pipe.client_busy_s,
            self.transport.bytes_sent - sent, self.transport.bytes_received - received,
            self.emulation, tuple(logits),
        )


class TextStream:
    """Turns tokens into text deltas as they arrive, holding back incomplete UTF-8.

    Each token decodes only a window of recent tokens (from the last token already shown, as in
    text-generation-inference's decode_token), not the whole output: the streamed text is that
    of decoding the whole sequence, at a constant cost per token.
    """

    def __init__(self, loaded: LoadedModel, on_text: Callable[[str], None] | None) -> None:
        self.tokenizer = loaded.tokenizer
        self.on_text = on_text
        self.tokens: list[int] = []
        self._pieces: list[str] = []  # what on_text got, in order
        self._shown = 0  # characters in them
        self._text: str | None = None  # the whole decode, once finished
        self._prefix = 0  # the window starts here: tokens[_prefix:_read] are already shown
        self._read = 0  # tokens before this are in self.text

    def push(self, token: int) -> None:
        self.tokens.append(token)
        if self.tokenizer is None:
            return
        shown = self._decode(self.tokens[self._prefix:self._read])
        text = self._decode(self.tokens[self._prefix:])
        if len(text) <= len(shown) or text.endswith("\ufffd"):  # nothing new, or an incomplete
            return  # multi-byte character: wait for more
        self._prefix, self._read = self._read, len(self.tokens)
        self._emit(text[len(shown):])

    def finish(self) -> None:
        """Flush what is left (a generation may end inside a multi-byte character)."""
        if self.tokenizer is not None:
            self._text = self._decode(self.tokens)
            self._emit(self._text[self._shown:])

    @property
    def text(self) -> str:
        """The text so far; once finished, the decode of all tokens."""
        return self._text if self._text is not None else "".join(self._pieces)

    def _decode(self, tokens: list[int]) -> str:
        assert self.tokenizer is not None
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True)) if tokens else ""

    def _emit(self, delta: str) -> None:
        if delta:
            self._pieces.append(delta)
            self._shown += len(delta)
            if self.on_text is not None:
                self.on_text(delta)


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
    shape = link_preset(emulate_link) if emulate_link else None  # bad names fail before connecting
    limit = int(info.get("limits", {}).get("max_frame_bytes", 64 * 2**20))
    transport: Transport = WebSocketTransport(server, token, limit + 2 * wire.MAX_HEADER_BYTES)
    emulation = None
    if shape is not None:
        transport = EmulatedLink(transport, shape)
        emulation = (f"EMULATED link {shape.name}: rtt {shape.rtt_s * 1e3:.0f} ms, up "
                     f"{shape.uplink_bytes_per_s * 8 / 1e6:.0f} Mbit/s, down "
                     f"{shape.downlink_bytes_per_s * 8 / 1e6:.0f} Mbit/s")
    if emulate_client_slowdown > 1.0:
        slow = f"EMULATED client slowdown x{emulate_client_slowdown:g}"
        emulation = f"{emulation}; {slow}" if emulation else slow
    return Session(server, loaded, transport, info, wire_dtype, emulate_client_slowdown,
                   emulation, timeout_s)
