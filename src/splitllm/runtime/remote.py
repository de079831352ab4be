"""The server's half of a generation, spoken over a transport (docs/protocol.md is the spec)."""

from __future__ import annotations

from typing import Any

import torch

from splitllm.placement import Placement
from splitllm.runtime import protocol as wire
from splitllm.runtime.decoding import RemoteResult
from splitllm.runtime.transport import ServerError, Transport

REPLY_TIMEOUT_S = 120.0


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


def open_message(placement: Placement, wire_dtype: str, sampling: wire.Sampling
                 ) -> dict[str, Any]:
    """The `open` message that starts a generation's session on the server."""
    return {"type": "open", "protocol": wire.PROTOCOL_VERSION, "placement": str(placement),
            "wire_dtype": wire_dtype, "sampling": sampling.model_dump()}


def close_message(session_id: str) -> dict[str, Any]:
    """The `close` message that ends it (the server answers `closed` with its stats)."""
    return {"type": "close", "session": session_id}


class RemoteSession:
    """One session on the server: opened at construction, runs the server's segments."""

    def __init__(self, transport: Transport, placement: Placement, n_units: int, *,
                 wire_dtype: str = "float32", sampling: wire.Sampling | None = None,
                 timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self.transport = transport
        self.n_units = n_units
        self.wire_dtype = wire.WIRE_DTYPES[wire.wire_dtype_name(wire_dtype)]
        self.timeout_s = timeout_s
        self.seq = 0
        transport.send(wire.text(open_message(placement, wire.DTYPE_NAMES[self.wire_dtype],
                                              sampling or wire.Sampling())))
        reply, _ = receive(transport, "opened", timeout_s)
        self.session_id = str(reply["session"])
        self.stats: dict[str, Any] = {}

    def forward(self, units: tuple[int, int], x: torch.Tensor, positions: tuple[int, int],
                return_logits: bool, return_hidden: bool = True, *, rollback: bool = False,
                verify: bool = False) -> RemoteResult:
        """Run server units [start, stop) on x (ids [1, T] or hidden [1, T, D]).

        rollback: the segment first forgets positions from positions[0] on; verify: the
        head returns its token after every position (speculative decoding).
        """
        self.seq += 1
        tensor = x if units[0] == 0 else x.to(self.wire_dtype)
        header = {"type": "forward", "session": self.session_id, "seq": self.seq,
                  "units": list(units), "positions": list(positions),
                  "return_logits": return_logits, "return_hidden": return_hidden}
        header.update({k: True for k, on in (("rollback", rollback), ("verify", verify)) if on})
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
            logits = self._tensor(reply, payload)  # [1, V] ([T, V] when verifying)
        reply, _ = receive(self.transport, "token", self.timeout_s)
        tokens = reply.get("tokens")
        return RemoteResult(token=int(reply["token"]), logits=logits,
                            tokens=tuple(int(t) for t in tokens) if tokens is not None else None)

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
        self.transport.send(wire.text(close_message(self.session_id)))
        reply, _ = receive(self.transport, "closed", self.timeout_s)
        self.stats = dict(reply.get("stats") or {})
        return self.stats
